"""The VQVAE decoder's forms in an INT8 export: fp16 for TensorRT, INT8 for ONNX Runtime's CPU kernels.

At 256 px the decoder is a third of an image's time on a CPU (d16: 383 GFLOP of convolutions, 2 s
of 6). Its CPU form runs convolutions as INT8: our own Q/DQ rewrite (uint8 activations per tensor
with ranges measured on calibration latents, int8 weights per output channel, int32 biases), which
ONNX Runtime fuses into QLinearConv, its u8s8 VNNI kernel. Each quantized convolution costs some
image quality, so the form keeps all of them only if the images decoded from held-back calibration
latents stay within MIN_PSNR of the fp32 decoder's (a trained decoder does: the embedded default
keeps 43 dB); otherwise it quantizes the convolutions that buy the most time per unit of image
error, as many as keep MIN_PSNR. GPUs get the fp16 decoder instead.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from ecm.calibration.quantize import Parts, per_channel, rewritten
from ecm.export.onnx_files import Graph, Value
from ecm.runtime.controls import psnr
from ecm.runtime.ort_backend import session_options
from onnx import helper, shape_inference

MIN_PSNR = 40.0  # dB against the fp32 decoder on the same latents
RANGE_LATENTS = 16  # calibration latents that set the activation ranges
SENSITIVITY_LATENTS = 2  # check latents that measure one convolution's error alone (an ordering, not a bound)
MEASURED_SHARE = 0.05  # convolutions with this share of the FLOPs or more have their image error measured alone
F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
U8_MAX = 255


def convolutions(g: Graph) -> list[onnx.NodeProto]:
    """The convolutions with constant weights, in graph order."""
    inits = g.initializers
    return [n for n in g.model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def half_decoder(src: Path, dst: Path) -> None:
    """The decoder with its convolutions in fp16 (weights stored fp16, Cast in and out), for TensorRT."""
    g = Graph.open(src)
    inits, nodes, halves = g.initializers, [], {}
    chosen = {n.name for n in convolutions(g)}
    for n in rewritten(g, chosen, nodes):
        x = n.input[0]
        if x not in halves:  # an activation several convolutions read is cast once
            halves[x] = x + "_as_fp16"
            nodes.append(helper.make_node("Cast", [x], [halves[x]], name=f"{x}_to_fp16", to=F16))
        for name in n.input[1:]:
            if f"{name}_fp16" not in g.initializers:
                read = g.reader(name)
                g.set_value(f"{name}_fp16", np.float16, tuple(inits[name].dims),
                            lambda read=read: read().astype(np.float16))
        conv = helper.make_node("Conv", [halves[x], *(f"{name}_fp16" for name in n.input[1:])],
                                [n.output[0] + "_in_fp16"], name=n.name)
        conv.attribute.extend(n.attribute)
        nodes += [conv, helper.make_node("Cast", [conv.output[0]], [n.output[0]], name=f"{n.name}_to_fp32", to=F32)]
    g.set_nodes(nodes)
    g.drop_unused()
    g.save(dst)


def conv_costs(src: Path) -> dict[str, float]:
    """The FLOPs of each convolution of the decoder for one image."""
    g = Graph.open(src)
    inits, model = g.initializers, g.model
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # one image
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*shape_inference.infer_shapes(model).graph.value_info, *model.graph.output]}
    return {n.name: 2.0 * np.prod(inits[n.input[1]].dims) * np.prod(shapes[n.output[0]][2:])
            for n in convolutions(g)}


def ort_session(path: Path) -> Any:
    """A CPU session of ONNX Runtime for one decoder graph, with the runtime's options."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])


def decode(path: Path, latents: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The images a decoder graph makes of ``latents`` (C, hw, hw), one at a time, with ONNX Runtime."""
    sess = ort_session(path)
    return [sess.run(None, {"f_hat": f[None]})[0] for f in latents]


def conv_ranges(src: Path, latents: Iterable[np.ndarray]) -> dict[str, tuple[float, float]]:
    """The smallest and largest value of every convolution's input and output over ``latents``: one run per
    latent of a copy of the graph that reduces each of those tensors to its two extremes inside the graph."""
    g = Graph.open(src)
    names = sorted({t for n in convolutions(g) for t in (n.input[0], n.output[0])})
    model = g.model
    for t in names:
        for op in ("ReduceMin", "ReduceMax"):
            model.graph.node.append(helper.make_node(op, [t], [f"{t}__{op}"], keepdims=0))
            model.graph.output.append(helper.make_tensor_value_info(f"{t}__{op}", F32, []))
    path = src.parent / f"ranges.{src.name}"  # shares src's weights file
    onnx.save(model, str(path))
    try:
        sess = ort_session(path)
        outs = [f"{t}__{op}" for t in names for op in ("ReduceMin", "ReduceMax")]
        lo, hi = dict.fromkeys(names, np.inf), dict.fromkeys(names, -np.inf)
        for f in latents:
            got = dict(zip(outs, sess.run(outs, {"f_hat": f[None]})))
            for t in names:
                lo[t], hi[t] = min(lo[t], float(got[f"{t}__ReduceMin"])), max(hi[t], float(got[f"{t}__ReduceMax"]))
    finally:
        path.unlink(missing_ok=True)
    return {t: (lo[t], hi[t]) for t in names}


def u8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of asymmetric uint8 over [lo, hi] widened to hold 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max((hi - lo) / U8_MAX, np.finfo(np.float32).tiny))
    return scale, np.uint8(np.clip(round(-lo / scale), 0, U8_MAX))


def conv_weight_int8(w_OIHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per output channel (the linear layers' :func:`per_channel` on the (I*H*W, O) view): codes in
    [-127, 127] and the fp32 scales."""
    q_KO, scale_O = per_channel(w_OIHW.reshape(len(w_OIHW), -1).T)
    return q_KO.T.reshape(w_OIHW.shape), scale_O


def quantize_convs(src: Path, dst: Path, ranges: dict[str, tuple[float, float]], chosen: Iterable[str]) -> None:
    """The decoder with the ``chosen`` convolutions in Q/DQ form into ``dst``: input and output quantized per
    tensor to uint8 (an activation several convolutions read is quantized once), weights int8 per output
    channel, bias int32 at the input scale times the weight scale. The others keep fp32 weights: ONNX Runtime
    computes them in fp32 and would hold an upcast copy of fp16 ones (d16: 90 MB more at load, measured)."""
    g = Graph.open(src)
    inits, chosen = g.initializers, set(chosen)
    nodes: list[onnx.NodeProto] = []
    dequantized: dict[str, tuple[str, np.float32]] = {}  # activation -> (its Q/DQ'd name, its scale)

    def qdq(t: str, src_name: str, out: str) -> np.float32:
        scale, zero = u8_params(*ranges[t])
        g.set_value(t + "_qscale", np.float32, (), lambda: np.array(scale))
        g.set_value(t + "_qzero", np.uint8, (), lambda: np.array(zero))
        nodes.extend([helper.make_node("QuantizeLinear", [src_name, t + "_qscale", t + "_qzero"], [t + "_u8"]),
                      helper.make_node("DequantizeLinear", [t + "_u8", t + "_qscale", t + "_qzero"], [out])])
        dequantized[t] = out, scale
        return scale

    def dequantize(name: str, codes: Value, dtype: type, dims: tuple[int, ...], scale: Value, tag: str) -> str:
        O = dims[0]
        g.set_value(name + tag, dtype, dims, codes)
        g.set_value(name + "_dqscale", np.float32, (O,), scale)
        g.set_value(name + "_dqzero", dtype, (O,), lambda: np.zeros(O, dtype))
        nodes.append(helper.make_node("DequantizeLinear", [name + tag, name + "_dqscale", name + "_dqzero"],
                                      [name + "_dq"], axis=0))
        return name + "_dq"

    for n in rewritten(g, chosen, nodes):
        x, w, y = n.input[0], n.input[1], n.output[0]
        if x not in dequantized:
            qdq(x, x, x + "_dq")
        x_dq, x_scale = dequantized[x]
        O, b = inits[w].dims[0], (n.input[2] if len(n.input) > 2 else "")
        read_b = g.reader(b) if b else None

        def codes(w_OIHW: np.ndarray, s: np.float32 = x_scale, read_b=read_b) -> tuple[np.ndarray, ...]:
            q, scale_O = conv_weight_int8(w_OIHW)
            if read_b is None:
                return q, scale_O
            bias_scale_O = scale_O * s  # what the int32 accumulator counts in
            return q, scale_O, bias_scale_O, np.round(read_b() / bias_scale_O).astype(np.int32)

        parts = Parts(g.reader(w), codes, count=4 if b else 2)
        inputs = [x_dq, dequantize(w, parts[0], np.int8, tuple(inits[w].dims), parts[1], "_int8")]
        if b:
            inputs.append(dequantize(b, parts[3], np.int32, (O,), parts[2], "_int32"))
        conv = helper.make_node("Conv", inputs, [y + "_f32"], name=n.name)
        conv.attribute.extend(n.attribute)
        nodes.append(conv)
        qdq(y, y + "_f32", y)
    g.set_nodes(nodes)
    g.drop_unused()
    g.save(dst)


@dataclass
class DecoderChoice:
    """What the CPU form of the decoder quantized, and how close it stays."""

    quantized: int  # convolutions in INT8
    convolutions: int
    flops_share: float  # of the decoder's convolution FLOPs that run in INT8
    psnr: float  # against fp32 over the images of the check latents, dB


def quantize_decoder(src: Path, dst: Path, calib: list[np.ndarray], check: list[np.ndarray],
                     min_psnr: float = MIN_PSNR) -> DecoderChoice:
    """The decoder's CPU form into ``dst``, ranges from ``calib`` (at most RANGE_LATENTS of them), checked on
    ``check``: every convolution in INT8 if that keeps ``min_psnr``, else the longest run that does of this order:
    the large convolutions (MEASURED_SHARE of the FLOPs or more) by their image error alone per FLOP, then the
    rest by FLOPs (found by bisection: the errors of separate convolutions add up)."""
    ranges = conv_ranges(src, calib[:RANGE_LATENTS])
    costs = conv_costs(src)
    total = sum(costs.values())
    want = decode(src, check)
    with tempfile.TemporaryDirectory(prefix="ecm-decoder-", dir=dst.parent) as tmp:
        def quality(names: list[str], n: int = len(check)) -> float:  # over the first n check latents
            path = Path(tmp) / f"decoder-{len(names)}.onnx"
            quantize_convs(src, path, ranges, names)
            return psnr(np.stack(want[:n]), np.stack(decode(path, check[:n])))

        order = sorted(costs, key=lambda name: -costs[name])
        best = quality(order)
        k = len(order)
        if best < min_psnr:
            large = [name for name in order if costs[name] >= MEASURED_SHARE * total]
            mse = {name: U8_MAX**2 / 10 ** (quality([name], SENSITIVITY_LATENTS) / 10) for name in large}
            order = sorted(large, key=lambda name: mse[name] / costs[name]) + order[len(large):]
            lo, hi, best = 0, len(order) - 1, float("inf")  # the first lo keep MIN_PSNR, none longer than hi does
            while lo < hi:
                mid = (lo + hi + 1) // 2
                got = quality(order[:mid])
                if got >= min_psnr:
                    lo, best = mid, got
                else:
                    hi = mid - 1
            k = lo
    if k:
        quantize_convs(src, dst, ranges, order[:k])
    return DecoderChoice(k, len(order), sum(costs[name] for name in order[:k]) / total, best)


def decoder_psnr(fp32: Path, int8: Path, latents: list[np.ndarray]) -> float:
    """The PSNR of ``int8``'s images against ``fp32``'s over all of them, decoded from ``latents``, dB."""
    return psnr(np.stack(decode(fp32, latents)), np.stack(decode(int8, latents)))
