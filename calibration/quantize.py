"""INT8 graphs from exported fp32 ones, written a tensor at a time (the fp32 graph is never loaded whole).

Two forms of the same choice of layers:

* **Q/DQ** for TensorRT, symmetric INT8 (zero points 0) with weights per output channel, in one
  of two kinds. W8A8 (:func:`quantize_qdq`): activations per tensor too, with ranges from
  calibration data after SmoothQuant has moved activation outliers into the weights; INT8 tensor
  core GEMMs. W8A16 (:func:`quantize_weights`): weight-only, the layer runs in fp16 on weights
  dequantized from INT8; half the weight traffic of fp16, which is what batch-1 generation on an
  edge GPU waits for, and no activation ranges to get wrong. ONNX Runtime runs both, which is how
  they are checked here.
* **CPU**, the forms ONNX Runtime's CPU kernels run fastest, in two kinds. Dynamic
  (:func:`quantize_dynamic`): ``DynamicQuantizeMatMul``, INT8 weights per output channel and each
  call's activations quantized per tensor on the fly, smoothed first where calibration data says
  how: the u8s8 GEMM of ONNX Runtime's VNNI kernels, about twice as fast as the next kind.
  Blockwise (:func:`quantize_cpu`): ``MatMulNBits`` with 8-bit symmetric weights per block of
  inputs, activations quantized per block on the fly (accuracy level 4): slower, but per-block
  activation ranges lose less. Its weights are packed as ONNX Runtime's own quantizer packs them
  (tested bit for bit).

Scope ``linear`` (default) quantizes the linear layers except the vocabulary head; attention
(its two matrix products, softmax), the L2-normalisation, LayerNorm, the head and sampling stay
fp32. Scope ``all`` also quantizes the head and the attention products. The large weights left
in fp32 (head, embeddings) are stored as fp16 and widened once when the graph is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from ecm.calibration.options import check_scope
from ecm.export.onnx_files import Graph
from ecm.runtime.errors import ECMError
from onnx import helper

HALF_MIN_ELEMENTS = 1 << 16  # fp32 weights at least this large are stored as fp16
CPU_BLOCK = 128  # inputs per weight scale in the CPU form (32: 1.4x slower on d16, no clear accuracy gain)
CPU_ACCURACY = 4  # MatMulNBits: 4 = int8 products (activations quantized per block on the fly)
INT8_MAX = 127  # symmetric INT8: [-127, 127], zero point 0, as TensorRT's explicit quantization takes it
F16, F32, I8 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT8


# ------------------------------------------------------------------------------------ preparing
def fold_constant_transposes(g: Graph) -> int:
    """Replace Transpose nodes of weights by transposed weights, so the MatMul sees a weight; returns the count."""
    inits = g.initializers
    kept, folded = [], 0
    for node in g.model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            src = inits[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(src.dims)))[::-1])
            read = g.reader(src.name)
            g.set_value(node.output[0], helper.tensor_dtype_to_np_dtype(src.data_type),
                        tuple(src.dims[p] for p in perm), lambda read=read, perm=perm: np.transpose(read(), perm))
            folded += 1
        else:
            kept.append(node)
    g.set_nodes(kept)
    g.drop_unused()
    return folded


def gemms_to_matmuls(g: Graph) -> int:
    """Rewrite Gemm layers (alpha = beta = 1) as MatMul + Add, the form weight-only INT8 takes; returns the count."""
    inits = g.initializers
    out, count = [], 0
    for n in g.model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            out.append(n)
            continue
        w = inits[n.input[1]]
        if attrs.get("transB", 0):
            read = g.reader(w.name)
            g.set_value(w.name, helper.tensor_dtype_to_np_dtype(w.data_type), tuple(w.dims[::-1]),
                        lambda read=read: read().T.copy())
        has_bias = len(n.input) > 2 and n.input[2]
        product = n.output[0] + "_product" if has_bias else n.output[0]
        out.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [product], name=n.name))
        out[-1].metadata_props.extend(n.metadata_props)  # the module it came from
        if has_bias:
            out.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=n.name + "_bias"))
        count += 1
    g.set_nodes(out)
    if count:
        del g.model.graph.value_info[:]  # the exporter's shape annotations describe the Gemm form
    return count


def weight_matmuls(g: Graph) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D weight: the linear layers (after :func:`gemms_to_matmuls`)."""
    inits = g.initializers
    return [n for n in g.model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def head_matmul(g: Graph, output: str = "logits") -> str:
    """Name of the linear layer that makes ``output`` (the vocabulary head), found by walking back from it."""
    producer = {o: n for n in g.model.graph.node for o in n.output}
    weights = {n.name for n in weight_matmuls(g)}
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


def quantized_nodes(g: Graph, scope: str) -> list[str]:
    """The nodes quantized in ``scope`` (see the module docstring)."""
    check_scope(scope)
    linear = [n.name for n in weight_matmuls(g)]
    if scope == "all":
        return linear + [n.name for n in g.model.graph.node if n.op_type == "MatMul" and n.name not in linear]
    heads = {head_matmul(g)} if any(o.name == "logits" for o in g.model.graph.output) else set()
    return [n for n in linear if n not in heads]


@dataclass
class Prepared:
    """An fp32 graph ready for every INT8 form: weights explicit, the matrix products to quantize chosen."""

    graph: Graph
    nodes: list[str]

    @property
    def activations(self) -> list[str]:
        """The inputs of the chosen products that are not weights: what calibration measures."""
        inits = self.graph.initializers
        chosen = set(self.nodes)
        return sorted({i for n in self.graph.model.graph.node if n.name in chosen for i in n.input if i not in inits})


def prepare(src: Path, scope: str = "linear") -> Prepared:
    """Fold weight transposes and turn Gemms into MatMuls (structure only: weights are read when written)."""
    g = Graph.open(src)
    fold_constant_transposes(g)
    gemms_to_matmuls(g)
    return Prepared(g, quantized_nodes(g, scope))


# ------------------------------------------------------------------------------------ shared pieces
def per_channel(w_KN: np.ndarray, scale_dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per output channel (column): codes in [-127, 127] and the scales, in ``scale_dtype``."""
    tiny = np.finfo(scale_dtype).tiny
    scale_N = np.maximum(np.abs(w_KN).max(axis=0) / INT8_MAX, tiny).astype(scale_dtype)
    q_KN = np.clip(np.round(w_KN / scale_N.astype(np.float32)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q_KN, scale_N


def rewritten(g: Graph, chosen: set[str], nodes: list[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """The nodes of ``g`` named in ``chosen``, in graph order, for a rewrite to replace; every other node is
    appended to ``nodes`` as it is, in its place."""
    for n in g.model.graph.node:
        if n.name in chosen:
            yield n
        else:
            nodes.append(n)


def save_with_microsoft_ops(g: Graph, nodes: list[onnx.NodeProto], dst: Path) -> None:
    """Give ``g`` the rewritten ``nodes`` (some from ONNX Runtime's com.microsoft domain) and save it to ``dst``
    without the weights no node reads any more, large fp32 ones stored fp16."""
    g.set_nodes(nodes)
    if not any(o.domain == "com.microsoft" for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    g.drop_unused()
    store_half(g)
    g.save(dst)


class Parts:
    """``fn(read())`` computed when its first part is written and dropped once all are: a weight is read once
    and its quantized form is held only while it is being written."""

    def __init__(self, read: Callable[[], np.ndarray], fn: Callable[[np.ndarray], tuple], count: int = 2):
        self.read, self.fn, self.count = read, fn, count
        self.value: tuple | None = None
        self.taken: set[int] = set()

    def __getitem__(self, i: int) -> Callable[[], np.ndarray]:
        def get() -> np.ndarray:
            if self.value is None:
                self.value, self.taken = self.fn(self.read()), set()
            part = self.value[i]
            self.taken.add(i)
            if len(self.taken) == self.count:
                self.value = None
            return part

        return get


def dequantized_weight(g: Graph, base: str, dims: tuple[int, int], read: Callable[[], np.ndarray],
                       scale_dtype: type) -> tuple[str, onnx.NodeProto]:
    """INT8 codes, scales and zero points of a (K, N) weight that ``read`` gives, as initializers named after
    ``base``; the DequantizeLinear node that restores it and its output."""
    K, N = dims
    parts = Parts(read, lambda arr: per_channel(arr, scale_dtype))
    g.set_value(base + "_int8", np.int8, (K, N), parts[0])
    g.set_value(base + "_scale", scale_dtype, (N,), parts[1])
    g.set_value(base + "_zero", np.int8, (N,), lambda: np.zeros(N, np.int8))
    node = helper.make_node("DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero"], [base + "_dq"],
                            name=base + "_dequantize", axis=1)
    return base + "_dq", node


def store_half(g: Graph, min_elements: int = HALF_MIN_ELEMENTS) -> int:
    """Store large fp32 weights as fp16 followed by a Cast to fp32; returns how many."""
    casts = []
    for t in list(g.model.graph.initializer):
        if t.data_type != F32 or int(np.prod(t.dims)) < min_elements:
            continue
        read = g.reader(t.name)
        g.remove(t.name)
        g.set_value(t.name + "_fp16", np.float16, tuple(t.dims), lambda read=read: read().astype(np.float16))
        casts.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], name=t.name + "_widen", to=F32))
    g.set_nodes(casts + list(g.model.graph.node))  # before every consumer: still topologically sorted
    return len(casts)


# ------------------------------------------------------------------------------------ SmoothQuant
def smoothing_scales(prep: Prepared, absmax: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """SmoothQuant's per-channel s of each activation feeding quantized linear layers:
    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), over every layer the activation feeds (reads their weights)."""
    g, chosen = prep.graph, set(prep.nodes)
    users: dict[str, list[str]] = {}
    for n in weight_matmuls(g):
        if n.name in chosen and n.input[0] in absmax:
            users.setdefault(n.input[0], []).append(n.input[1])
    scales = {}
    for x, weights in users.items():
        w_max = np.max([np.abs(g.value(w)).max(axis=1) for w in weights], axis=0)
        s = np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)
        scales[x] = np.clip(s, 1e-2, 1e2).astype(np.float32)
    return scales


def activation_ranges(absmax: dict[str, np.ndarray], smoothing: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-tensor symmetric range of each activation as quantized: after smoothing divides channel j by s_j."""
    return {x: float(np.max(m / smoothing[x] if x in smoothing else m)) for x, m in absmax.items()}


# ------------------------------------------------------------------------------------ the forms
def quantize_qdq(prep: Prepared, dst: Path, absmax: dict[str, np.ndarray], alpha: float) -> None:
    """Static symmetric INT8 Q/DQ (W8A8) of a prepared graph into ``dst``.

    ``absmax``: every activation's largest magnitude per channel (last axis) over the calibration
    data. With ``alpha`` > 0, SmoothQuant first moves activation outliers into the weights, exactly:
    (x / s) (s W) = x W; then each activation gets one Q/DQ pair with its per-tensor range and each
    weight INT8 codes per output channel, all zero points 0.
    """
    g = prep.graph.copy()
    smoothing = smoothing_scales(prep, absmax, alpha) if alpha > 0 else {}
    ranges = activation_ranges(absmax, smoothing)
    missing = sorted(set(prep.activations) - set(ranges))
    if missing:
        raise ECMError(f"no calibration range for {', '.join(missing[:3])}; record the calibration data again")
    inits, chosen = g.initializers, set(prep.nodes)
    readers = {w: g.reader(w) for w in inits}
    pairs: dict[str, list[onnx.NodeProto]] = {}  # activation -> the nodes that make its Q/DQ pair
    weights: dict[tuple[str, str | None], str] = {}  # (weight, the activation whose s it takes) -> its DQ output
    nodes = []
    for n in rewritten(g, chosen, nodes):
        ins = []
        for i in n.input:
            if i in inits:  # a weight; smoothed, its rows take the s its layer's input is divided by
                x = n.input[0] if n.input[0] in smoothing else None
                if (i, x) not in weights:
                    read = readers[i] if x is None else (lambda r=readers[i], s=smoothing[x]: r() * s[:, None])
                    base = i if x is None else f"{i}_smoothed_{len(weights)}"  # a shared weight: one per input
                    weights[i, x], dq = dequantized_weight(g, base, tuple(inits[i].dims), read, np.float32)
                    nodes.append(dq)
                ins.append(weights[i, x])
                continue
            if i not in pairs:
                pairs[i] = _qdq_pair(g, i, ranges[i], smoothing.get(i))
                nodes += pairs[i]
            ins.append(pairs[i][-1].output[0])
        nodes.append(_renamed(n, ins))
    g.set_nodes(nodes)
    g.drop_unused()
    store_half(g)
    g.save(dst)


def _qdq_pair(g: Graph, x: str, absmax: float, smooth_s: np.ndarray | None) -> list[onnx.NodeProto]:
    """(an optional smoothing Mul,) QuantizeLinear and DequantizeLinear of activation ``x``, per tensor."""
    nodes, src = [], x
    if smooth_s is not None:
        inv = 1 / smooth_s
        g.set_value(x + "_smooth_inv", np.float32, inv.shape, lambda inv=inv: inv)
        nodes.append(helper.make_node("Mul", [x, x + "_smooth_inv"], [x + "_smooth"], name=x + "_smooth"))
        src = x + "_smooth"
    scale = np.array(max(absmax, 1e-8) / INT8_MAX, np.float32)
    g.set_value(x + "_scale", np.float32, (), lambda: scale)
    g.set_value(x + "_zero", np.int8, (), lambda: np.array(0, np.int8))
    nodes.append(helper.make_node("QuantizeLinear", [src, x + "_scale", x + "_zero"], [x + "_q"], name=x + "_quantize"))
    nodes.append(helper.make_node("DequantizeLinear", [x + "_q", x + "_scale", x + "_zero"], [x + "_dq"],
                                  name=x + "_dequantize"))
    return nodes


def _renamed(n: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
    out = helper.make_node(n.op_type, inputs, list(n.output), name=n.name)
    out.attribute.extend(n.attribute)
    out.metadata_props.extend(n.metadata_props)
    return out


def quantize_weights(prep: Prepared, dst: Path) -> None:
    """Weight-only INT8 Q/DQ (W8A16) of a prepared graph (opset 19 or later) into ``dst``.

    Each quantized linear layer becomes Cast(x, fp16) -> MatMul(x, DequantizeLinear(W_int8, fp16
    scale per output channel)) -> Cast(fp32): the fp16 export's layer, with INT8 weights.
    """
    g = prep.graph.copy()
    chosen = {n.name for n in weight_matmuls(g)} & set(prep.nodes)
    dequantized: dict[str, str] = {}  # weight -> its fp16 DequantizeLinear output
    halves: dict[str, str] = {}  # activation -> its fp16 Cast
    weights, nodes = [], []
    for n in rewritten(g, chosen, nodes):
        w, x, out = n.input[1], n.input[0], n.output[0]
        if w not in dequantized:
            dims = tuple(g.initializers[w].dims)
            dequantized[w], dq = dequantized_weight(g, w, dims, g.reader(w), np.float16)
            weights.append(dq)
        if x not in halves:
            halves[x] = x + "_fp16"
            nodes.append(helper.make_node("Cast", [x], [halves[x]], name=x + "_to_fp16", to=F16))
        nodes.append(helper.make_node("MatMul", [halves[x], dequantized[w]], [out + "_fp16"], name=n.name))
        nodes[-1].metadata_props.extend(n.metadata_props)
        nodes.append(helper.make_node("Cast", [out + "_fp16"], [out], name=out + "_to_fp32", to=F32))
    g.set_nodes(weights + nodes)  # weights first: still topologically sorted
    g.drop_unused()
    store_half(g)
    g.save(dst)


def pack_nbits(w_KN: np.ndarray, block: int = CPU_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` 8-bit symmetric codes (N, blocks, block) as uint8 and scales (N, blocks) of a (K, N) weight.

    Per block of ``block`` inputs of one output, the value of largest magnitude maps to -128:
    scale = that value / -128, code = round(w / scale) + 128 (the op's default zero point); the
    padding past K holds code 0. ONNX Runtime's own 8-bit quantizer writes the same bytes.
    """
    K, N = w_KN.shape
    nb = -(-K // block)
    padded = np.zeros((nb * block, N), np.float32)
    padded[:K] = w_KN
    blocks = padded.reshape(nb, block, N)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]  # (nb, N)
    scale = (extreme / -128.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    codes = (np.clip(np.round(blocks / safe[:, None, :]), -128, 127) + 128).astype(np.uint8)  # (nb, block, N)
    codes = codes.transpose(2, 0, 1).reshape(N, nb * block)
    codes[:, K:] = 0
    return codes.reshape(N, nb, block), np.ascontiguousarray(scale.T)


def quantize_cpu(prep: Prepared, dst: Path) -> None:
    """The CPU form of a prepared graph into ``dst``: ``MatMulNBits`` over every quantized linear layer."""
    g = prep.graph.copy()
    chosen = {n.name for n in weight_matmuls(g)} & set(prep.nodes)
    inits, nodes = g.initializers, []
    for n in rewritten(g, chosen, nodes):
        w = n.input[1]
        K, N = inits[w].dims
        nb = -(-K // CPU_BLOCK)
        if w + "_q8" not in inits:  # a weight the graph shares is packed once
            parts = Parts(g.reader(w), pack_nbits)
            g.set_value(w + "_q8", np.uint8, (N, nb, CPU_BLOCK), parts[0])
            g.set_value(w + "_scales", np.float32, (N, nb), parts[1])
            inits = g.initializers
        nodes.append(helper.make_node("MatMulNBits", [n.input[0], w + "_q8", w + "_scales"], list(n.output),
                                      name=n.name, domain="com.microsoft", K=K, N=N, bits=8, block_size=CPU_BLOCK,
                                      accuracy_level=CPU_ACCURACY))
        nodes[-1].metadata_props.extend(n.metadata_props)
    save_with_microsoft_ops(g, nodes, dst)


def quantize_dynamic(prep: Prepared, dst: Path, smoothing: dict[str, np.ndarray] | None = None) -> None:
    """The dynamic CPU form of a prepared graph into ``dst``: ``DynamicQuantizeMatMul`` over every quantized
    linear layer (INT8 weights per output channel; activations per tensor per call), each input first divided
    by its SmoothQuant s where ``smoothing`` gives one (its layers' weight rows take the s)."""
    g = prep.graph.copy()
    smoothing = smoothing or {}
    chosen = {n.name for n in weight_matmuls(g)} & set(prep.nodes)
    inits = g.initializers
    readers = {w: g.reader(w) for w in inits}
    weights: dict[tuple[str, str | None], str] = {}  # (weight, the activation whose s it takes) -> its base name
    smoothed: dict[str, str] = {}  # activation -> its smoothed output
    nodes = []
    for n in rewritten(g, chosen, nodes):
        w = n.input[1]
        x = n.input[0] if n.input[0] in smoothing else None
        if (w, x) not in weights:
            read = readers[w] if x is None else (lambda r=readers[w], s=smoothing[x]: r() * s[:, None])
            base = w if x is None else f"{w}_smoothed_{len(weights)}"
            K, N = inits[w].dims
            parts = Parts(read, per_channel)
            g.set_value(base + "_int8", np.int8, (K, N), parts[0])
            g.set_value(base + "_scale", np.float32, (N,), parts[1])
            weights[w, x] = base
        if x is not None and x not in smoothed:
            inv = (1 / smoothing[x]).astype(np.float32)
            g.set_value(x + "_smooth_inv", np.float32, inv.shape, lambda inv=inv: inv)
            nodes.append(helper.make_node("Mul", [x, x + "_smooth_inv"], [x + "_smooth"], name=x + "_smooth"))
            smoothed[x] = x + "_smooth"
        base = weights[w, x]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [smoothed.get(n.input[0], n.input[0]), base + "_int8",
                                                                base + "_scale"], list(n.output), name=n.name,
                                      domain="com.microsoft"))
        nodes[-1].metadata_props.extend(n.metadata_props)
    save_with_microsoft_ops(g, nodes, dst)
