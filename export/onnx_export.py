"""``torch.onnx.export(dynamo=True)`` of the three graphs, with names and shapes from the manifest."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from ecm.runtime.errors import ECMError
from ecm.runtime.manifest import TensorSpec
from torch.export import Dim

#: Opsets the exporter accepts: 17 brings LayerNormalization; TensorRT 10.3 parses up to 20,
#: and 23's Attention op is out of reach of TensorRT 10.x on Jetson.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 21, 20
#: TensorRT's TopK takes K <= 3840: the most candidates a step graph may sort.
MAX_CANDIDATES = 3840

# Which axes of which step input are symbolic: one graph serves every scale and batch size.
_BATCH, _PN, _PAST, _NEXT = Dim("batch"), Dim("pn"), Dim("past"), Dim("pn_next")
STEP_DYNAMIC = {
    "label": {0: _BATCH}, "x_in": {0: _BATCH, 2: _PN, 3: _PN}, "f_hat": {0: _BATCH},
    "past_k": {0: _PAST, 2: 2 * _BATCH}, "past_v": {0: _PAST, 2: 2 * _BATCH}, "u": {0: _BATCH, 1: _PN, 2: _PN},
    "up": {1: _PN}, "down": {0: _NEXT}, "ctrl": {0: _PN, 1: _PN, 2: _BATCH},
    "past_ak": {0: _PAST, 2: 2 * _BATCH}, "past_av": {0: _PAST, 2: 2 * _BATCH},
}
BATCH_DYNAMIC = {"cond": {0: _BATCH}, "f_hat": {0: _BATCH}}


def example_inputs(specs: dict[str, TensorSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes: valid labels and top-k, uniforms in (0, 1], noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in specs.items():
        if dtype == "int64":
            t = torch.ones(shape, dtype=torch.int64)
        elif dtype == "uint8":
            t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            t = torch.rand(shape, generator=g).to(getattr(torch, dtype)) * 0.5 + 0.5
        out[name] = t
    return out


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ECMError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} "
                       f"(default {DEFAULT_OPSET}: TensorRT 10.3 parses up to 20)")


def export_graph(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], path: Path,
                 opset: int, dynamic: dict[str, dict[int, Dim]] | None) -> None:
    """Export ``module(**inputs)`` to ``path``, its weights in ``<path>.data`` beside it.

    External weights are memory-mapped by ONNX Runtime instead of being parsed into a protobuf
    and copied (a quarter less resident memory here), and lift the 2 GB protobuf limit.
    """
    dynamic_shapes = None
    if dynamic is not None:
        dynamic_shapes = {name: dynamic.get(name) for name in inputs}
    quiet = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, input_names=list(inputs), output_names=output_names,
                                        verbose=False)
        except Exception as e:  # the exporter raises many types; the message is what a user can act on
            raise ECMError(f"ONNX export of {path.name} failed: {str(e).splitlines()[0][:300]}") from None
    try:
        program.save(str(path), external_data=True)
    except OSError as e:
        raise ECMError(f"cannot write {path}: {e.strerror or e}; free some disk space or choose another --out") \
            from None


@contextlib.contextmanager
def _quiet_loggers():
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental.symbolic_shapes")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def onnx_io(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Input and output shapes of an ONNX file (ints, or names for symbolic axes)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}
