"""What the TensorRT ONNX parser accepts, and a check of exported graphs against it.

Source: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.8 (commit 554c9f1b7fc0, the
earliest 10.x table stored in our reference corpus), minus the operators its Changelog adds
after 10.3 (BlackmanWindow, HammingWindow, HannWindow in 10.4; STFT in 10.5), so the list holds
for TensorRT 10.3 (JetPack 6) onwards. TensorRT 10.0-10.3 document opsets 9..20.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from ecm.export.onnx_export import MAX_CANDIDATES, MAX_OPSET
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

TENSORRT_OPS: frozenset[str] = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
    "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish",
    "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
    "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RNN", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK",
    "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
))

#: Ops whose restrictions we check beyond presence: an input that must be a build-time constant.
_CONSTANT_INPUT = {"TopK": 1, "CumSum": 1, "QuantizeLinear": 1, "DequantizeLinear": 1}
_ZERO_POINT = {"QuantizeLinear": 2, "DequantizeLinear": 2}
_QUANTIZED_TYPES = {onnx.TensorProto.INT8}  # what our Q/DQ graphs may hold (TensorRT also takes FP8, INT4)


def graph_problems(path: str | Path) -> list[str]:
    """Everything in an ONNX file that TensorRT 10.3+ would refuse: opset, ops, restrictions."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            problems.append(f"opset {opset.version} > {MAX_OPSET}")
        elif opset.domain not in ("", "ai.onnx"):
            problems.append(f"custom op domain {opset.domain!r}")
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    for node in model.graph.node:
        where = f"{node.op_type} node {node.name!r}"
        if node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: not supported by the TensorRT ONNX parser")
        i = _CONSTANT_INPUT.get(node.op_type)
        if i is not None and node.input[i] not in constants:
            problems.append(f"{where}: input {i} must be a constant")
        if node.op_type == "TopK" and node.input[1] in constants:
            k = int(_array(constants[node.input[1]], path.parent).reshape(-1)[0])
            if k > MAX_CANDIDATES:
                problems.append(f"{where}: K = {k} > {MAX_CANDIDATES}")
        z = _ZERO_POINT.get(node.op_type)
        if z is not None and len(node.input) > z and node.input[z]:
            zp = constants.get(node.input[z])
            if zp is None or np.any(_array(zp, path.parent) != 0):
                problems.append(f"{where}: zero point must be a constant 0")
            elif zp.data_type not in _QUANTIZED_TYPES:
                problems.append(f"{where}: quantized type {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
    return problems + _qdq_pairs(model, constants)


def _qdq_pairs(model: onnx.ModelProto, constants: dict[str, onnx.TensorProto]) -> list[str]:
    """Explicit quantization as TensorRT reads it: every Q feeds only DQs; every DQ reads a Q or an INT8 weight."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    for node in model.graph.node:
        where = f"{node.op_type} node {node.name!r}"
        if node.op_type == "QuantizeLinear":
            if any(c.op_type != "DequantizeLinear" for c in consumers.get(node.output[0], [])):
                problems.append(f"{where}: feeds something other than a DequantizeLinear")
        elif node.op_type == "DequantizeLinear":
            src = node.input[0]
            weight = constants.get(src)
            if weight is not None and weight.data_type not in _QUANTIZED_TYPES:
                problems.append(f"{where}: dequantizes a {onnx.TensorProto.DataType.Name(weight.data_type)} weight")
            elif weight is None and getattr(producer.get(src), "op_type", None) != "QuantizeLinear":
                problems.append(f"{where}: reads neither a QuantizeLinear nor an INT8 weight")
    return problems


def _array(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """A tensor's values, read from its external data file (beside the graph) where it is stored there."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        t = copy.deepcopy(t)
        load_external_data_for_tensor(t, str(base))
    return numpy_helper.to_array(t)
