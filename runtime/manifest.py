"""The engine manifest ``var_ecm.json``: what an export holds and the shapes of every graph.

Written by ``ecm-export`` beside the graphs, read by the runtime before it loads anything. The
tensor names and per-scale shapes are computed here from a few model facts, so the exporter's
profiles, the runtime's buffers and the shapes recorded in the file come from one function.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ECMError
from .files import write_json
from .sampling import check_sampling
from .scales import begin_ends, phi_table, total_tokens

SCHEMA_VERSION = 3
#: Every file of an export folder starts with this: var_ecm.json, var_ecm.onnx, var_ecm.decoder.plan, ...
STEM = "var_ecm"
MANIFEST_NAME = f"{STEM}.json"
PRECISIONS = ("fp32", "fp16", "int8")
#: The graphs a runtime loads besides one control encoder per control ('control', 'control1', ...); an export may
#: hold more (static per-scale variants, 'step_s<k>').
RUNTIME_ROLES = ("step", "encoder", "decoder")
#: Suffix of a role's CPU form: an INT8 export's graph that ONNX Runtime's CPU kernels run faster than
#: the Q/DQ graph kept for TensorRT ('step_cpu' beside 'step').
CPU_FORM = "_cpu"


def control_role(k: int) -> str:
    """The graph role of the k-th control's encoder: control, control1, control2, ..."""
    return "control" if k == 0 else f"control{k}"


def graph_file(role: str) -> str:
    """The ONNX file of graph ``role`` in an export folder: step -> var_ecm.onnx, control -> var_ecm.control.onnx,
    control1 -> var_ecm.control1.onnx, encoder -> var_ecm.encoder.onnx, step_s3 -> var_ecm.s3.onnx,
    step_cpu -> var_ecm.cpu.onnx, control_cpu -> var_ecm.control.cpu.onnx."""
    base = role.removesuffix(CPU_FORM)
    part = "" if base == "step" else f".s{base.removeprefix('step_s')}" if base.startswith("step_s") else f".{base}"
    return f"{STEM}{part}{'.cpu' if role.endswith(CPU_FORM) else ''}.onnx"


def plan_file(graph: str) -> str:
    """The TensorRT plan built from the ONNX file ``graph``: var_ecm.onnx -> var_ecm.plan."""
    return graph.removesuffix(".onnx") + ".plan"



class Tensor(NamedTuple):
    """An input or output of a graph at one scale and batch size: shape, element type, and the name of
    each axis that differs between scales or batch sizes (None where it is the same for all; inputs only,
    the exported graph derives its outputs' shapes)."""

    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class GraphIO:
    """The tensors of one graph at one scale and batch size, inputs in the graph's order."""

    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {**self.inputs, **self.outputs}


class ManifestError(ECMError):
    """A manifest that is missing, unreadable, or from another version or model."""


@dataclass(frozen=True)
class ControlSpec:
    """How the runtime turns a condition image into the control graph's input."""

    type: str = "canny"  # 'canny': extract edges from a photo when asked; other types take the map as given
    resolution: int = 256  # the map is resized to resolution x resolution RGB, uint8
    canny_low: int = 100
    canny_high: int = 200


@dataclass
class Manifest:
    """Everything the runtime needs to drive the exported graphs."""

    precision: str
    patch_nums: tuple[int, ...]
    vocab_size: int
    num_classes: int
    image_size: int
    latent_channels: int
    embed_dim: int
    num_heads: int
    cache_layers: int  # backbone blocks: layers of the backbone's KV cache
    num_phi: int
    batch: int  # images per run that the per-scale profiles are built for
    candidates: int  # tokens the step graph sorts; the largest top-k a run may ask for
    cfg: float
    top_k: int
    top_p: float
    temperature: str
    controls: list[ControlSpec]  # one per adapter set merged into the step graph, in the graph's order
    graphs: dict[str, str]  # role ('step', 'encoder', 'decoder', 'control', 'control1', ...) -> file; 'step_s<k>'
    # static, 'step_cpu' CPU form
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint role -> sha256
    adapter_layers: int = 0  # ECM adapters: layers of their own KV cache, every control's (0 without control)
    adapter_dim: int = 0  # the adapters' width, that of the control tokens
    adapter_heads: int = 0
    opset: int = 21
    tensorrt: dict[str, Any] | None = None  # version, compute capability and plan files, once built
    quantization: dict[str, str] | None = None  # int8: scope, activations of the Q/DQ graphs (int8 or fp16), CPU forms
    # (dynamic or blockwise), the decoder on a CPU (int8 or fp32)
    memory: dict[str, Any] | None = None  # the device memory a deployment needs (export.memory_plan), per batch
    preview: list[list[float]] | None = None  # latent -> RGB, (Cvae + 1) x 3: a preview of f_hat without the decoder
    ecm_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------------------ facts
    @property
    def num_scales(self) -> int:
        """K, the number of token maps (scales) an image is generated in."""
        return len(self.patch_nums)

    @property
    def control(self) -> ControlSpec | None:
        """The first control: the one a condition given without a control name follows."""
        return self.controls[0] if self.controls else None

    @property
    def control_names(self) -> list[str]:
        """The control types this export follows, in the step graph's order."""
        return [c.type for c in self.controls]

    def control_index(self, name: str) -> int:
        """Position of control ``name`` in the step graph, or a one-line error naming the ones it has."""
        if name not in self.control_names:
            have = ", ".join(self.control_names) or "none (exported with --no-ecm)"
            raise ECMError(f"this engine has no {name!r} control (it has {have}); name one of those, or export "
                           f"adapters for {name} with ecm-export --ecm")
        return self.control_names.index(name)

    @property
    def head_dim(self) -> int:
        """Channels per attention head in the backbone's KV cache."""
        return self.embed_dim // self.num_heads

    @property
    def latent_size(self) -> int:
        """Side of f_hat, the last scale's token map."""
        return self.patch_nums[-1]

    @property
    def kv_dtype(self) -> str:
        """Element type of the KV caches: fp16 in fp16 exports; INT8 ones keep fp32 between their Q/DQ pairs."""
        return "float16" if self.precision == "fp16" else "float32"

    @property
    def phi_table(self) -> tuple[int, ...]:
        """Which of the ``num_phi`` phi convs refines each scale (the official fixed table)."""
        return phi_table(self.num_scales, self.num_phi)

    def precision_label(self, cpu: bool = False) -> str:
        """The precision of the graphs a runtime runs, as a person reads it: 'fp16', 'int8 (W8A16 Q/DQ)', ..."""
        if self.quantization is None:
            return self.precision
        if cpu and any(role + CPU_FORM in self.graphs for role in self.runtime_roles):
            return f"{self.precision} (CPU form)"
        return f"{self.precision} (W8A{8 if self.quantization.get('activations') == 'int8' else 16} Q/DQ)"

    def runtime_graphs(self, cpu: bool = False) -> dict[str, str]:
        """Role -> file of the graphs a runtime loads; with ``cpu``, CPU forms stand in for their roles."""
        return {role: self.graphs.get(role + CPU_FORM, self.graphs[role]) if cpu else self.graphs[role]
                for role in self.runtime_roles if role in self.graphs}

    @property
    def runtime_roles(self) -> list[str]:
        """The roles of the graphs a runtime loads: RUNTIME_ROLES and each control's encoder."""
        return [*RUNTIME_ROLES, *(control_role(k) for k in range(len(self.controls)))]

    def next_patch(self, si: int) -> int:
        """Side of the input the step at scale ``si`` prepares: the next scale's, or f_hat's after the last."""
        return self.patch_nums[si + 1] if si + 1 < self.num_scales else self.latent_size

    # ------------------------------------------------------------------------------ shapes
    def kv_shape(self, tokens: int, batch: int | None = None) -> tuple[int, ...]:
        """Cache layout (tokens, layers, 2B, heads, head_dim): a scale's slice is contiguous."""
        return (tokens, self.cache_layers, 2 * self._batch(batch), self.num_heads, self.head_dim)

    def adapter_kv_shape(self, tokens: int, batch: int | None = None) -> tuple[int, ...]:
        """The adapters' cache, laid out like the backbone's."""
        return (tokens, self.adapter_layers, 2 * self._batch(batch), self.adapter_heads,
                self.adapter_dim // max(self.adapter_heads, 1))

    def io(self, role: str, si: int = 0, batch: int | None = None) -> GraphIO:
        """Every input (in the graph's order) and output of graph ``role`` at scale ``si``.

        The one description of each graph's tensors: the exporter traces with these names, shapes and
        symbolic axes, TensorRT's profiles pin them per scale, the runtime allocates and checks by them.
        ``role`` is 'step', 'encoder', 'decoder' or a control's ('control', 'control1', ...), or a variant of
        one ('step_s<k>': the step at scale k; '<role>_cpu': a CPU form, same tensors).
        """
        role = role.removesuffix(CPU_FORM)
        B, L, HW, R = self._batch(batch), total_tokens(self.patch_nums), self.latent_size, self.image_size
        latent = Tensor((B, self.latent_channels, HW, HW), "float32", ("batch", None, None, None))
        if role.startswith("step_s"):
            role, si = "step", int(role.removeprefix("step_s"))
        if role == "step":
            return self._step_io(si, B)
        if role.startswith("control"):
            k = int(role.removeprefix("control") or 0)
            R = self.controls[k].resolution if k < len(self.controls) else R
            return GraphIO({"cond": Tensor((B, R, R, 3), "uint8", ("batch", None, None, None))},
                           {"ctrl_tokens": Tensor((L, B, self.adapter_dim), "float32")})
        if role == "encoder":
            return GraphIO({"image": Tensor((B, R, R, 3), "uint8", ("batch", None, None, None))},
                           {"known_tokens": Tensor((L, B), "int64"), "f_known": latent._replace(axes=())})
        if role == "decoder":
            return GraphIO({"f_hat": latent}, {"image": Tensor((B, R, R, 3), "uint8")})
        raise ValueError(f"no graph role {role!r}")

    def _step_io(self, si: int, B: int) -> GraphIO:
        pn, HW, Cv, kv = self.patch_nums[si], self.latent_size, self.latent_channels, self.kv_dtype
        past, nxt = begin_ends(self.patch_nums)[si][0], self.next_patch(si)
        cache_axes = ("past", None, "2*batch", None, None)
        inputs = {
            "label": Tensor((B,), "int64", ("batch",)),
            "x_in": Tensor((B, Cv, pn, pn), "float32", ("batch", None, "pn", "pn")),
            "f_hat": Tensor((B, Cv, HW, HW), "float32", ("batch", None, None, None)),
            "past_k": Tensor(self.kv_shape(past, B), kv, cache_axes),
            "past_v": Tensor(self.kv_shape(past, B), kv, cache_axes),
            "u": Tensor((B, pn, pn), "float32", ("batch", "pn", "pn")),
            "up": Tensor((HW, pn), "float32", (None, "pn")),
            "down": Tensor((nxt, HW), "float32", ("pn_next", None)),
            "phi": Tensor((self.num_phi,), "float32"),
            "first": Tensor((1,), "float32"),
            "cfg": Tensor((1,), "float32"),
            "temperature": Tensor((1,), "float32"),
            "top_k": Tensor((1,), "int64"),
            "top_p": Tensor((1,), "float32"),
            # inpainting: the known image's tokens of this scale, where to keep them (1) and, at the last scale
            # only, its latent and where to keep it (zeros everywhere when nothing is kept)
            "known": Tensor((pn, pn, B), "int64", ("pn", "pn", "batch")),
            "keep": Tensor((pn, pn, B), "float32", ("pn", "pn", "batch")),
            "f_known": Tensor((B, Cv, HW, HW), "float32", ("batch", None, None, None)),
            "keep_f": Tensor((B, 1, HW, HW), "float32", ("batch", None, None, None)),
        }
        outputs = {
            "logits": Tensor((2 * B, pn * pn, self.vocab_size), "float32"),
            "tokens": Tensor((B, pn * pn), "int64"),
            "f_hat_out": Tensor((B, Cv, HW, HW), "float32"),
            "x_next": Tensor((B, Cv, nxt, nxt), "float32"),
            "new_k": Tensor(self.kv_shape(pn * pn, B), kv),
            "new_v": Tensor(self.kv_shape(pn * pn, B), kv),
        }
        if self.controls:  # every control's tokens of every scale (each control graph writes its own slice)
            inputs["ctrl"] = Tensor((len(self.controls), total_tokens(self.patch_nums), B, self.adapter_dim), "float32",
                                    (None, None, "batch", None))
            inputs["control_weight"] = Tensor((len(self.controls),), "float32")
            inputs["past_ak"] = Tensor(self.adapter_kv_shape(past, B), kv, cache_axes)
            inputs["past_av"] = Tensor(self.adapter_kv_shape(past, B), kv, cache_axes)
            outputs["new_ak"] = Tensor(self.adapter_kv_shape(pn * pn, B), kv)
            outputs["new_av"] = Tensor(self.adapter_kv_shape(pn * pn, B), kv)
        return GraphIO(inputs, outputs)

    def _batch(self, batch: int | None) -> int:
        return self.batch if batch is None else batch

    def kv_cache_bytes(self, batch: int | None = None) -> int:
        """Bytes of the K and V caches (backbone and adapters) over all L tokens."""
        L = total_tokens(self.patch_nums)
        shapes = [self.kv_shape(L, batch)] + ([self.adapter_kv_shape(L, batch)] if self.controls else [])
        return 2 * sum(math.prod(shape) for shape in shapes) * (2 if self.kv_dtype == "float16" else 4)

    # ------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the per-scale shapes written out for people and other tools."""
        d = asdict(self)
        d["scales"] = [{"patch": pn, "tokens": [b, e], "inputs": _jsonable(self.io("step", si).inputs),
                        "outputs": _jsonable(self.io("step", si).outputs)}
                       for si, (pn, (b, e)) in enumerate(zip(self.patch_nums, begin_ends(self.patch_nums)))]
        return d

    def save(self, folder: str | Path) -> Path:
        """Write ``var_ecm.json`` into ``folder`` atomically; returns its path."""
        path = Path(folder) / MANIFEST_NAME
        write_json(self.to_dict(), path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        """Parse and check a manifest dict; a wrong version or a broken field is a ManifestError."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{where} has schema version {version!r}, this ecm reads version {SCHEMA_VERSION}; "
                                "re-export with this version's ecm-export")
        names = {f.name for f in fields(cls)}
        optional = {"sources", "opset", "tensorrt", "quantization", "memory", "ecm_version", "adapter_layers",
                    "adapter_dim", "adapter_heads", "preview"}
        missing = sorted(n for n in names if n not in d and n not in optional)
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}; re-export with ecm-export")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            kw["patch_nums"] = tuple(kw["patch_nums"])
            kw["controls"] = [ControlSpec(**c) for c in kw["controls"]]
            m = cls(**kw)
        except (TypeError, AttributeError) as e:
            raise ManifestError(f"{where} is malformed ({e}); re-export with ecm-export") from None
        if m.precision not in PRECISIONS:
            raise ManifestError(f"{where} has unknown precision {m.precision!r}; re-export with ecm-export")
        problems = _problems(m)
        if problems:
            raise ManifestError(f"{where} has invalid {'; '.join(problems[:3])}; re-export with ecm-export")
        if "scales" in d and d["scales"] != m.to_dict()["scales"]:
            raise ManifestError(f"{where}: recorded shapes do not match its model facts (edited by hand?); "
                                "re-export with ecm-export")
        return m

    @classmethod
    def load(cls, folder_or_file: str | Path) -> Manifest:
        """Read the manifest of an export folder (or the file itself)."""
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no manifest at {path}; export the model with ecm-export first")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"cannot read manifest {path} ({e}); re-export with ecm-export") from None
        if not isinstance(d, dict):
            raise ManifestError(f"manifest {path} is not a JSON object; re-export with ecm-export")
        return cls.from_dict(d, where=str(path))


_COUNTS = ("vocab_size", "num_classes", "image_size", "latent_channels", "embed_dim", "num_heads", "cache_layers",
           "num_phi", "batch", "candidates")
_SIZES = ("adapter_layers", "adapter_dim", "adapter_heads", "opset")


def _count(value: Any, low: int = 1) -> bool:
    return type(value) is int and value >= low


def _problems(m: Manifest) -> list[str]:
    """The fields of a parsed manifest that no export writes: types and ranges the runtime relies on."""
    bad = [f"{n} {getattr(m, n)!r}" for n in _COUNTS if not _count(getattr(m, n))]
    bad += [f"{n} {getattr(m, n)!r}" for n in _SIZES if not _count(getattr(m, n), 0)]
    pn = m.patch_nums
    if not (len(pn) >= 2 and all(_count(p) for p in pn) and list(pn) == sorted(set(pn))):
        bad.append(f"patch_nums {list(pn)!r} (increasing sides, at least two)")
    if bad:  # the checks below compute with these
        return bad
    if m.embed_dim % m.num_heads:
        bad.append(f"embed_dim {m.embed_dim} (not a multiple of num_heads, {m.num_heads})")
    if m.candidates > m.vocab_size:
        bad.append(f"candidates {m.candidates} (more than the vocabulary, {m.vocab_size})")
    for c in m.controls:
        if not (isinstance(c.type, str) and _count(c.resolution) and _count(c.canny_low, 0)
                and _count(c.canny_high, 0)):
            bad.append(f"control {asdict(c)!r}")
    if len({c.type for c in m.controls if isinstance(c.type, str)}) != len(m.controls):
        bad.append(f"controls {m.control_names!r} (each control once)")
    if m.controls and not (m.adapter_layers and m.adapter_heads and m.adapter_dim % m.adapter_heads == 0):
        bad.append("adapter facts (layers, width and heads of the control adapters)")
    roles = set(m.runtime_roles)
    if not (isinstance(m.graphs, dict) and roles <= set(m.graphs) and all(
            isinstance(v, str) and Path(v).name == v and not v.startswith(".") for v in m.graphs.values())):
        bad.append(f"graphs {m.graphs!r} (file names for {', '.join(sorted(roles))})")
    p = m.preview
    if p is not None and not (isinstance(p, list) and len(p) == m.latent_channels + 1 and all(
            isinstance(row, list) and len(row) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in row)
            for row in p)):
        bad.append(f"preview (a {m.latent_channels + 1} x 3 table of numbers)")
    if not all(isinstance(getattr(m, n), t) for n, t in (("sources", dict), ("tensorrt", (dict, type(None))),
                                                         ("quantization", (dict, type(None))), ("ecm_version", str))):
        bad.append("sources, tensorrt, quantization or ecm_version")
    if not (type(m.cfg) in (int, float) and type(m.top_k) is int and type(m.top_p) in (int, float)
            and isinstance(m.temperature, str)):
        bad.append("sampling defaults (cfg, top_k, top_p, temperature)")
    else:
        try:
            check_sampling(m.cfg, m.top_k, m.top_p, m.temperature)
        except ECMError as e:
            bad.append(f"sampling defaults ({e})")
    return bad


def _jsonable(specs: dict[str, Tensor]) -> dict[str, list[Any]]:
    return {k: [list(t.shape), t.dtype] for k, t in specs.items()}
