"""``torch.onnx.export(dynamo=True)`` of the three graphs, with names and shapes from the manifest."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from io import StringIO
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from ecm.export.quiet import quiet
from ecm.runtime.errors import ECMError, first_line
from ecm.runtime.manifest import GraphIO, Tensor
from torch.export import Dim

#: Opsets the exporter accepts: 17 brings LayerNormalization; TensorRT 10.3 parses up to 20,
#: and 23's Attention op is out of reach of TensorRT 10.x on Jetson.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 21, 20
#: TensorRT's TopK takes K <= 3840: the most candidates a step graph may sort.
MAX_CANDIDATES = 3840

#: The symbolic axes the manifest names (``Tensor.axes``), as torch.export dimensions; 'k*name' is k times one.
DIMS = {name: Dim(name) for name in ("batch", "pn", "past", "pn_next")}


def dim(axis: str) -> Dim:
    """The torch.export dimension of a manifest axis name ('batch', '2*batch', ...)."""
    times, _, name = axis.rpartition("*")
    return int(times) * DIMS[name] if times else DIMS[name]


def example_inputs(specs: dict[str, Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes: valid labels and top-k, uniforms in (0, 1], noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype, _) in specs.items():
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


def export_graph(module: nn.Module, io: GraphIO, path: Path, opset: int, dynamic: bool = True) -> None:
    """Export ``module`` traced on example inputs of ``io`` to ``path``, its weights in ``<path>.data`` beside it.

    Inputs and outputs take ``io``'s names, in its order; with ``dynamic`` the axes it names stay
    symbolic (one graph for every scale and batch size), else the graph is fully static.
    External weights are memory-mapped by ONNX Runtime instead of being parsed into a protobuf
    and copied (a quarter less resident memory here), and lift the 2 GB protobuf limit.
    """
    params = inspect.signature(module.forward).parameters
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    if not required <= set(io.inputs) <= set(params):
        raise ValueError(f"{type(module).__name__}.forward takes {list(params)}, the manifest's graph "
                         f"{list(io.inputs)}")
    inputs = example_inputs(io.inputs)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {name: {i: dim(a) for i, a in enumerate(t.axes) if a} or None for name, t in io.inputs.items()}
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(StringIO()), quiet():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, input_names=list(inputs), output_names=list(io.outputs),
                                        verbose=False)
        except Exception as e:  # the exporter raises many types; the message is what a user can act on
            raise ECMError(f"ONNX export of {path.name} failed: {first_line(e, 300)}") from None
    try:
        program.save(str(path), external_data=True)
    except OSError as e:
        raise ECMError(f"cannot write {path}: {e.strerror or e}; free some disk space or choose another --out") \
            from None


def onnx_io(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Input and output shapes of an ONNX file (ints, or names for symbolic axes)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}
