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
from typing import Any

from .errors import ECMError
from .files import write_json
from .sampling import check_sampling
from .scales import begin_ends, phi_table, total_tokens

SCHEMA_VERSION = 2
MANIFEST_NAME = "var_ecm.json"
PRECISIONS = ("fp32", "fp16", "int8")
#: The graphs a runtime loads; an export may hold more (static per-scale variants, 'step_s<k>').
RUNTIME_ROLES = ("step", "control", "decoder")
#: Suffix of a role's CPU form: an INT8 export's graph that ONNX Runtime's CPU kernels run faster than
#: the Q/DQ graph kept for TensorRT ('step_cpu' beside 'step').
CPU_FORM = "_cpu"

#: A tensor's shape and element type, e.g. ``((1, 32, 4, 4), "float32")``.
TensorSpec = tuple[tuple[int, ...], str]


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
    control: ControlSpec | None
    graphs: dict[str, str]  # role ('step', 'control', 'decoder') -> file; 'step_s<k>' static, 'step_cpu' CPU form
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint role -> sha256
    adapter_layers: int = 0  # ECM adapters: layers of their own KV cache (0 without control)
    adapter_dim: int = 0  # the adapters' width, that of the control tokens
    adapter_heads: int = 0
    opset: int = 21
    tensorrt: dict[str, Any] | None = None  # version, compute capability and plan files, once built
    quantization: dict[str, str] | None = None  # int8: scope, activations of the Q/DQ graphs (int8 or fp16)
    ecm_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------------------ facts
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.precision == "fp16" else "float32"  # int8 keeps fp32 between its Q/DQ pairs

    @property
    def phi_table(self) -> tuple[int, ...]:
        return phi_table(self.num_scales, self.num_phi)

    def precision_label(self, cpu: bool = False) -> str:
        """The precision of the graphs a runtime runs, as a person reads it: 'fp16', 'int8 (W8A16 Q/DQ)', ..."""
        if self.quantization is None:
            return self.precision
        if cpu and any(role + CPU_FORM in self.graphs for role in RUNTIME_ROLES):
            return f"{self.precision} (CPU form)"
        return f"{self.precision} (W8A{8 if self.quantization.get('activations') == 'int8' else 16} Q/DQ)"

    def runtime_graphs(self, cpu: bool = False) -> dict[str, str]:
        """Role -> file of the graphs a runtime loads; with ``cpu``, CPU forms stand in for their roles."""
        return {role: self.graphs.get(role + CPU_FORM, self.graphs[role]) if cpu else self.graphs[role]
                for role in RUNTIME_ROLES if role in self.graphs}

    def next_patch(self, si: int) -> int:
        """Side of the input the step at scale ``si`` prepares: the next scale's, or f_hat's after the last."""
        return self.patch_nums[si + 1] if si + 1 < self.num_scales else self.latent_size

    # ------------------------------------------------------------------------------ shapes
    def kv_shape(self, tokens: int, batch: int | None = None) -> tuple[int, ...]:
        """Cache layout (tokens, layers, 2B, heads, head_dim): a scale's slice is contiguous."""
        B = self.batch if batch is None else batch
        return (tokens, self.cache_layers, 2 * B, self.num_heads, self.head_dim)

    def adapter_kv_shape(self, tokens: int, batch: int | None = None) -> tuple[int, ...]:
        """The adapters' cache, laid out like the backbone's."""
        B = self.batch if batch is None else batch
        return (tokens, self.adapter_layers, 2 * B, self.adapter_heads, self.adapter_dim // max(self.adapter_heads, 1))

    def step_inputs(self, si: int, batch: int | None = None) -> dict[str, TensorSpec]:
        """Inputs of the step graph at scale ``si``, in the graph's input order: name -> (shape, dtype)."""
        B = self.batch if batch is None else batch
        pn, HW, Cv = self.patch_nums[si], self.latent_size, self.latent_channels
        past = begin_ends(self.patch_nums)[si][0]
        nxt = self.next_patch(si)
        specs: dict[str, TensorSpec] = {
            "label": ((B,), "int64"),
            "x_in": ((B, Cv, pn, pn), "float32"),
            "f_hat": ((B, Cv, HW, HW), "float32"),
            "past_k": (self.kv_shape(past, B), self.kv_dtype),
            "past_v": (self.kv_shape(past, B), self.kv_dtype),
            "u": ((B, pn, pn), "float32"),
            "up": ((HW, pn), "float32"),
            "down": ((nxt, HW), "float32"),
            "phi": ((self.num_phi,), "float32"),
            "first": ((1,), "float32"),
            "cfg": ((1,), "float32"),
            "temperature": ((1,), "float32"),
            "top_k": ((1,), "int64"),
            "top_p": ((1,), "float32"),
        }
        if self.control is not None:
            specs["ctrl"] = ((pn, pn, B, self.adapter_dim), "float32")
            specs["past_ak"] = (self.adapter_kv_shape(past, B), self.kv_dtype)
            specs["past_av"] = (self.adapter_kv_shape(past, B), self.kv_dtype)
        return specs

    def step_outputs(self, si: int, batch: int | None = None) -> dict[str, TensorSpec]:
        """Outputs of the step graph at scale ``si``."""
        B = self.batch if batch is None else batch
        pn, HW, Cv = self.patch_nums[si], self.latent_size, self.latent_channels
        nxt = self.next_patch(si)
        specs: dict[str, TensorSpec] = {
            "logits": ((2 * B, pn * pn, self.vocab_size), "float32"),
            "tokens": ((B, pn * pn), "int64"),
            "f_hat_out": ((B, Cv, HW, HW), "float32"),
            "x_next": ((B, Cv, nxt, nxt), "float32"),
            "new_k": (self.kv_shape(pn * pn, B), self.kv_dtype),
            "new_v": (self.kv_shape(pn * pn, B), self.kv_dtype),
        }
        if self.control is not None:
            specs["new_ak"] = (self.adapter_kv_shape(pn * pn, B), self.kv_dtype)
            specs["new_av"] = (self.adapter_kv_shape(pn * pn, B), self.kv_dtype)
        return specs

    def control_inputs(self, batch: int | None = None) -> dict[str, TensorSpec]:
        B = self.batch if batch is None else batch
        R = self.control.resolution if self.control else self.image_size
        return {"cond": ((B, R, R, 3), "uint8")}

    def control_outputs(self, batch: int | None = None) -> dict[str, TensorSpec]:
        B = self.batch if batch is None else batch
        return {"ctrl_tokens": ((total_tokens(self.patch_nums), B, self.adapter_dim), "float32")}

    def decoder_inputs(self, batch: int | None = None) -> dict[str, TensorSpec]:
        B = self.batch if batch is None else batch
        HW = self.latent_size
        return {"f_hat": ((B, self.latent_channels, HW, HW), "float32")}

    def decoder_outputs(self, batch: int | None = None) -> dict[str, TensorSpec]:
        B = self.batch if batch is None else batch
        return {"image": ((B, self.image_size, self.image_size, 3), "uint8")}

    def kv_cache_bytes(self, batch: int | None = None) -> int:
        """Bytes of the K and V caches (backbone and adapters) over all L tokens."""
        L = total_tokens(self.patch_nums)
        shapes = [self.kv_shape(L, batch)] + ([self.adapter_kv_shape(L, batch)] if self.control is not None else [])
        return 2 * sum(math.prod(shape) for shape in shapes) * (2 if self.kv_dtype == "float16" else 4)

    # ------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the per-scale shapes written out for people and other tools."""
        d = asdict(self)
        d["scales"] = [{"patch": pn, "tokens": [b, e], "inputs": _jsonable(self.step_inputs(si)),
                        "outputs": _jsonable(self.step_outputs(si))}
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
        optional = {"sources", "opset", "tensorrt", "quantization", "ecm_version", "adapter_layers", "adapter_dim",
                    "adapter_heads"}
        missing = sorted(n for n in names if n not in d and n not in optional)
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}; re-export with ecm-export")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            kw["patch_nums"] = tuple(kw["patch_nums"])
            if kw["control"] is not None:
                kw["control"] = ControlSpec(**kw["control"])
            m = cls(**kw)
        except TypeError as e:
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
    c = m.control
    if c is not None and not (isinstance(c.type, str) and _count(c.resolution) and _count(c.canny_low, 0)
                              and _count(c.canny_high, 0)):
        bad.append(f"control {asdict(c)!r}")
    if c is not None and not (m.adapter_layers and m.adapter_heads and m.adapter_dim % m.adapter_heads == 0):
        bad.append("adapter facts (layers, width and heads of the control adapters)")
    roles = {"step", "decoder"} | ({"control"} if c is not None else set())
    if not (isinstance(m.graphs, dict) and roles <= set(m.graphs) and all(
            isinstance(v, str) and Path(v).name == v and not v.startswith(".") for v in m.graphs.values())):
        bad.append(f"graphs {m.graphs!r} (file names for {', '.join(sorted(roles))})")
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


def _jsonable(specs: dict[str, TensorSpec]) -> dict[str, list[Any]]:
    return {k: [list(shape), dtype] for k, (shape, dtype) in specs.items()}
