"""INT8 graphs from fp32 ones, with ONNX Runtime's quantization tools.

Two forms of the same quantization choices:

* **Q/DQ** for TensorRT, symmetric INT8 (zero points 0) with weights per output channel, in one
  of two kinds. W8A8 (:func:`quantize_qdq`): activations per tensor too, with ranges from
  calibration data after SmoothQuant has moved activation outliers into the weights; INT8 tensor
  core GEMMs. W8A16 (:func:`quantize_weights`): weight-only, the layer runs in fp16 on weights
  dequantized from INT8; half the weight traffic of fp16, which is what batch-1 generation on an
  edge GPU waits for, and no activation ranges to get wrong. ONNX Runtime runs both, which is how
  they are checked here (:func:`teacher_agreement`).
* **CPU** (:func:`quantize_cpu`): ``MatMulNBits`` with 8-bit symmetric weights per block of
  inputs and activations quantized per block on the fly, which ONNX Runtime's CPU kernels run
  faster than Q/DQ (and which loses less than per-tensor activation ranges).

Scope ``linear`` (default) quantizes the linear layers except the vocabulary head; attention
(its two matrix products, softmax), the L2-normalisation, LayerNorm, the head and sampling stay
fp32. Scope ``all`` also quantizes the head and the attention products. The large weights left
in fp32 (head, embeddings) are stored as fp16 and widened once when the graph is loaded.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from ecm.calibration.options import SMOOTH_ALPHA, check_scope
from ecm.export.onnx_files import load_onnx, save_onnx
from ecm.export.quiet import quiet
from ecm.runtime.errors import ECMError
from onnx import helper, numpy_helper

HALF_MIN_ELEMENTS = 1 << 16  # fp32 weights at least this large are stored as fp16
CPU_BLOCK = 128  # inputs per weight scale in the CPU form (32: 1.4x slower on d16, no clear accuracy gain)
CPU_ACCURACY = 4  # MatMulNBits: 4 = int8 products (activations quantized per block on the fly)
Feeds = Callable[[], Iterable[dict[str, np.ndarray]]]  # a fresh iterator of graph inputs per call


def set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes (a protobuf repeated field cannot be assigned)."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose nodes of weights by transposed weights, so the MatMul sees a weight; returns the count."""
    inits = {t.name: t for t in model.graph.initializer}
    kept, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            model.graph.initializer.append(numpy_helper.from_array(np.transpose(arr, perm), node.output[0]))
            folded += 1
        else:
            kept.append(node)
    set_nodes(model, kept)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    return folded


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite Gemm layers (alpha = beta = 1) as MatMul + Add, the form weight-only INT8 takes; returns the count."""
    inits = {t.name: t for t in model.graph.initializer}
    out, count = [], 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            out.append(n)
            continue
        w = inits[n.input[1]]
        if attrs.get("transB", 0):
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        has_bias = len(n.input) > 2 and n.input[2]
        product = n.output[0] + "_product" if has_bias else n.output[0]
        out.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [product], name=n.name))
        out[-1].metadata_props.extend(n.metadata_props)  # the module it came from
        if has_bias:
            out.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=n.name + "_bias"))
        count += 1
    set_nodes(model, out)
    if count:
        del model.graph.value_info[:]  # the exporter's shape annotations describe the Gemm form
    return count


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D weight: the linear layers (after :func:`gemms_to_matmuls`)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def head_matmul(model: onnx.ModelProto, output: str = "logits") -> str:
    """Name of the linear layer that makes ``output`` (the vocabulary head), found by walking back from it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {n.name for n in weight_matmuls(model)}
    todo, seen = [output], set()
    while todo:
        node = producer.get(todo.pop(0))
        if node is None or node.name in seen:
            continue
        if node.name in weights:
            return node.name
        seen.add(node.name)
        todo += list(node.input)
    raise ECMError(f"no linear layer makes {output!r}; is this a step graph of ecm-export?")


def quantized_nodes(model: onnx.ModelProto, scope: str) -> list[str]:
    """The nodes quantized in ``scope`` (see the module docstring)."""
    check_scope(scope)
    linear = [n.name for n in weight_matmuls(model)]
    if scope == "all":
        return linear + [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in linear]
    heads = {head_matmul(model)} if any(o.name == "logits" for o in model.graph.output) else set()
    return [n for n in linear if n not in heads]


def store_half(model: onnx.ModelProto, min_elements: int = HALF_MIN_ELEMENTS) -> int:
    """Store large fp32 weights as fp16 followed by a Cast to fp32; returns how many."""
    casts, count = [], 0
    for t in list(model.graph.initializer):
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < min_elements:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_fp16")
        model.graph.initializer.remove(t)
        model.graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [t.name], name=t.name + "_widen", to=onnx.TensorProto.FLOAT))
        count += 1
    set_nodes(model, casts + list(model.graph.node))  # before every consumer: still topologically sorted
    return count


def channel_absmax(model_path: Path, tensors: list[str],
                   feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Largest magnitude of every channel (last axis) of ``tensors`` over ``feeds``."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors if t not in known)
    probe = model_path.with_name("probe." + model_path.name)  # beside it: the same external weights
    onnx.save(model, str(probe))
    try:
        sess = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(tensors, sess.run(tensors, feed)):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def smoothable(model: onnx.ModelProto, nodes: list[str]) -> list[onnx.NodeProto]:
    """The products among ``nodes`` that SmoothQuant can rescale: linear layers, whose weight takes the s."""
    return [n for n in weight_matmuls(model) if n.name in nodes]


def smooth(model: onnx.ModelProto, nodes: list[str], absmax: dict[str, np.ndarray], alpha: float = 0.5) -> int:
    """SmoothQuant: move activation outliers into the weights, exactly (x / s) (s W) = x W.

    Per activation tensor feeding quantized linear layers, a Mul by 1/s goes before them and
    every weight row is scaled by s, with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha); per-tensor
    INT8 ranges of the activation then waste less on a few large channels. Returns the count.
    """
    inits = {t.name: t for t in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in smoothable(model, nodes):
        if n.input[0] in absmax:
            by_input.setdefault(n.input[0], []).append(n)
    muls = []
    for x, users in by_input.items():
        w_max = np.max([np.abs(numpy_helper.to_array(inits[n.input[1]])).max(axis=1) for n in users], axis=0)
        s = (np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        s = np.clip(s, 1e-2, 1e2)
        for n in users:
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * s[:, None]).astype(np.float32), t.name))
            n.input[0] = x + "_smooth"
        inv = numpy_helper.from_array((1 / s).astype(np.float32), x + "_smooth_inv")
        model.graph.initializer.append(inv)
        muls.append((x, helper.make_node("Mul", [x, inv.name], [x + "_smooth"], name=x + "_smooth")))
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    nodes_out = list(model.graph.node)
    for x, mul in sorted(muls, key=lambda xm: -producer.get(xm[0], -1)):
        nodes_out.insert(producer.get(x, -1) + 1, mul)
    set_nodes(model, nodes_out)
    return len(muls)


@dataclass
class Prepared:
    """An fp32 graph ready for both INT8 forms: weights explicit, the matrix products to quantize chosen."""

    path: Path
    nodes: list[str]  # the matrix products to quantize


def prepare(src: Path, work: Path, scope: str = "linear") -> Prepared:
    """Fold weight transposes and turn Gemms into MatMuls, into the folder ``work``."""
    model = load_onnx(src)
    fold_constant_transposes(model)
    gemms_to_matmuls(model)
    path = work / src.name
    save_onnx(model, path)
    return Prepared(path, quantized_nodes(model, scope))


def activation_ranges(model_path: Path, feeds: Iterable[dict[str, np.ndarray]], ranges_path: Path,
                      work: Path) -> None:
    """Symmetric min/max of every input and output of the matrix products over ``feeds``, saved to
    ``ranges_path`` (ONNX Runtime's calibration cache format).

    Ranges are merged after every feed, so memory holds one feed's activations however many
    there are (ONNX Runtime's own bounded mode drops the outputs it clears instead of merging).
    """
    from onnxruntime.quantization.calibrate import (
        CalibrationDataReader,
        CalibrationMethod,
        create_calibrator,
        save_tensors_data,
    )

    class SingleFeed(CalibrationDataReader):
        def __init__(self, feed: dict[str, np.ndarray]):
            self.feed: dict[str, np.ndarray] | None = feed

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed, self.feed = self.feed, None
            return feed

    calibrator = create_calibrator(model_path, ["MatMul"], augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                                   extra_options={"symmetric": True})
    count = 0
    for feed in feeds:
        calibrator.collect_data(SingleFeed(feed))
        count += 1
    if count == 0:
        raise ECMError("no calibration data: the calibration set is empty")
    save_tensors_data(calibrator.compute_data(), ranges_path)


def quantize_qdq(prep: Prepared, dst: Path, feeds: Feeds, alpha: float = SMOOTH_ALPHA) -> None:
    """Static symmetric INT8 Q/DQ of a prepared graph into ``dst``: smoothed (``alpha`` > 0), then
    activation ranges from ``feeds()`` (called once more for the channel maxima when smoothing)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="ecm-quant-") as tmp, quiet():
        path = Path(tmp) / prep.path.name
        model = load_onnx(prep.path)
        if alpha > 0:
            inputs = sorted({n.input[0] for n in smoothable(model, prep.nodes)})
            smooth(model, prep.nodes, channel_absmax(prep.path, inputs, feeds()), alpha)
        save_onnx(model, path)
        ranges = Path(tmp) / "ranges.json"
        activation_ranges(path, feeds(), ranges, Path(tmp))
        # ONNX Runtime saves its result through onnx with a data location that onnx checks against the current
        # directory: a name found nowhere else keeps that check from tripping over an export there
        qdq = Path(tmp) / f"qdq-{uuid.uuid4().hex}.onnx"
        quantize_static(str(path), str(qdq), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=prep.nodes,
                        op_types_to_quantize=["MatMul"], use_external_data_format=True,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(ranges),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False,  # TensorRT dequantizes INT8 only, not INT32 biases
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
        model = load_onnx(qdq)
    store_half(model)
    save_onnx(model, dst)


def quantize_cpu(prep: Prepared, dst: Path) -> None:
    """The CPU form of a prepared graph into ``dst``: ``MatMulNBits`` with 8-bit symmetric weights per
    block of ``CPU_BLOCK`` inputs, activations quantized per block on the fly (``CPU_ACCURACY``)."""
    model = load_onnx(prep.path)
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in prep.nodes]
    with quiet():  # nodes_to_include would only add to every MatMul: name what stays instead
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=CPU_BLOCK, is_symmetric=True,
                                         accuracy_level=CPU_ACCURACY, nodes_to_exclude=keep)
        quantizer.process()
        model = quantizer.model.model
    store_half(model)
    save_onnx(model, dst)


def quantize_weights(prep: Prepared, dst: Path) -> None:
    """Weight-only INT8 Q/DQ (W8A16) of a prepared graph (opset 19 or later) into ``dst``.

    Each quantized linear layer becomes Cast(x, fp16) -> MatMul(x, DequantizeLinear(W_int8, fp16
    scale per output channel)) -> Cast(fp32): the fp16 export's layer, with INT8 weights.
    """
    model = load_onnx(prep.path)
    inits = {t.name: t for t in model.graph.initializer}
    chosen = {n.name for n in weight_matmuls(model)} & set(prep.nodes)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    dequantized: dict[str, str] = {}  # weight -> its fp16 DequantizeLinear output
    halves: dict[str, str] = {}  # activation -> its fp16 Cast
    weights, nodes = [], []
    for n in model.graph.node:
        if n.name not in chosen:
            nodes.append(n)
            continue
        w = n.input[1]
        if w not in dequantized:
            w_KN = numpy_helper.to_array(inits[w])
            scale_N = np.maximum(np.abs(w_KN).max(axis=0) / 127, np.finfo(np.float16).tiny).astype(np.float16)
            q_KN = np.clip(np.round(w_KN / scale_N.astype(np.float32)), -127, 127).astype(np.int8)
            model.graph.initializer.remove(inits[w])
            model.graph.initializer.extend([numpy_helper.from_array(q_KN, w + "_int8"),
                                            numpy_helper.from_array(scale_N, w + "_scale"),
                                            numpy_helper.from_array(np.zeros_like(q_KN[0]), w + "_zero")])
            dequantized[w] = w + "_fp16"
            weights.append(helper.make_node("DequantizeLinear", [w + "_int8", w + "_scale", w + "_zero"],
                                            [dequantized[w]], name=w + "_dequantize", axis=1))
        x = n.input[0]
        if x not in halves:
            halves[x] = x + "_fp16"
            nodes.append(helper.make_node("Cast", [x], [halves[x]], name=x + "_to_fp16", to=f16))
        out = n.output[0]
        nodes.append(helper.make_node("MatMul", [halves[x], dequantized[w]], [out + "_fp16"], name=n.name))
        nodes[-1].metadata_props.extend(n.metadata_props)
        nodes.append(helper.make_node("Cast", [out + "_fp16"], [out], name=out + "_to_fp32", to=f32))
    set_nodes(model, weights + nodes)  # weights first: still topologically sorted
    store_half(model)
    save_onnx(model, dst)


def teacher_agreement(reference: Path, quantized: Path, feeds: Iterable[dict[str, np.ndarray]],
                      patch_nums: tuple[int, ...]) -> list[float]:
    """Per scale, how often the ``quantized`` step graph's guided top-1 token is the fp32
    ``reference`` graph's, both fed the same inputs (``feeds``: every scale of recorded generations)."""
    import onnxruntime as ort
    from ecm.export.verify import guided_argmax

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (reference, quantized)]
    same, total = np.zeros(len(patch_nums)), np.zeros(len(patch_nums))
    for feed in feeds:
        si = patch_nums.index(feed["x_in"].shape[-1])
        want, got = (guided_argmax(s.run(["logits"], feed)[0], float(feed["cfg"][0])) for s in sessions)
        same[si] += np.sum(want == got)
        total[si] += want.size
    return (same / np.maximum(total, 1)).tolist()
