"""The scale loop over exported graphs, written once for every backend.

Per image batch: run the control encoder once, then for each scale feed the step graph its
scale's constants (resampling matrices, phi choice, cfg ramp weight, temperature) and uniforms,
let it write this scale's keys and values into one preallocated cache, and pass its f_hat and
next input on; finally decode. A backend only has to run a named graph on named arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import ConfigError
from .manifest import Manifest
from .resample import area_matrix, bicubic_matrix
from .sampling import cfg_weight, draw_uniforms
from .scales import begin_ends, total_tokens
from .schedule import parse_temperature

Arrays = dict[str, np.ndarray]


class Backend(Protocol):
    """Runs the graphs of one export."""

    def run(self, role: str, feeds: Arrays, out: Arrays | None = None) -> Arrays:
        """Run graph ``role`` ('step', 'control', 'decoder'); write outputs named in ``out`` into those arrays."""
        ...


@dataclass(frozen=True)
class Sampling:
    """The generation knobs a user may turn; defaults come from the manifest."""

    cfg: float
    top_k: int
    top_p: float
    temperature: str

    @classmethod
    def defaults(cls, m: Manifest, **overrides: float | int | str | None) -> Sampling:
        s = cls(m.cfg, m.top_k, m.top_p, m.temperature)
        s = cls(**{**s.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        s.check(m)
        return s

    def check(self, m: Manifest) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top-k {self.top_k} must be >= 0 (0 turns it off)")
        if m.candidates < m.vocab_size and not 0 < self.top_k <= m.candidates:
            raise ConfigError(f"top-k {self.top_k} is outside 1..{m.candidates}, the candidates this export sorts; "
                              "pick a smaller top-k or re-export with a larger --candidates")
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p} must lie in [0, 1] (0 turns it off)")
        parse_temperature(self.temperature)


def scale_constants(m: Manifest, si: int, s: Sampling) -> Arrays:
    """The small per-scale inputs of the step graph (the weights are the same for every scale)."""
    K, HW = m.num_scales, m.latent_size
    pn_next = m.patch_nums[si + 1] if si + 1 < K else HW
    phi = np.zeros(m.num_phi, np.float32)
    phi[m.phi_table[si]] = 1
    f32 = np.float32
    return {
        "up": bicubic_matrix(m.patch_nums[si], HW).astype(f32),
        "down": area_matrix(HW, pn_next).astype(f32),
        "phi": phi,
        "first": np.array([si == 0], f32),
        "cfg": np.array([cfg_weight(s.cfg, si, K)], f32),
        "temperature": np.array([parse_temperature(s.temperature).values(K)[si]], f32),
        "top_k": np.array([s.top_k], np.int64),
        "top_p": np.array([s.top_p], f32),
    }


@dataclass
class Trajectory:
    """What one batch went through: tokens per scale, the final images, and optionally more."""

    tokens: list[np.ndarray] = field(default_factory=list)  # (B, pn*pn) int64 per scale
    images: np.ndarray | None = None  # (B, H, W, 3) uint8
    logits: list[np.ndarray] = field(default_factory=list)  # (2B, pn*pn, V) per scale, when recorded
    x_in: list[np.ndarray] = field(default_factory=list)  # each scale's input, when recorded
    f_hat_in: list[np.ndarray] = field(default_factory=list)
    f_hat: np.ndarray | None = None  # the final latent
    ctrl: np.ndarray | None = None  # control tokens (L, B, C)
    uniforms: list[np.ndarray] = field(default_factory=list)


class ScaleLoop:
    """Generation with preallocated buffers for one batch size."""

    def __init__(self, manifest: Manifest, backend: Backend, batch: int | None = None):
        self.m, self.backend = manifest, backend
        self.batch = manifest.batch if batch is None else batch
        L = total_tokens(manifest.patch_nums)
        dtype = np.dtype(manifest.kv_dtype)
        self.cache_k = np.zeros(manifest.kv_shape(L, self.batch), dtype)
        self.cache_v = np.zeros_like(self.cache_k)

    def run(self, labels: np.ndarray, cond: np.ndarray | None, sampling: Sampling, *, seed: int = 0,
            uniforms: list[np.ndarray] | None = None, teacher: Trajectory | None = None,
            record: bool = False, decode: bool = True) -> Trajectory:
        """Generate one batch. ``teacher`` feeds another run's inputs at every scale (teacher forcing)."""
        m, B = self.m, self.batch
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.shape != (B,):
            raise ConfigError(f"{labels.size} class labels for a batch of {B}")
        if np.any((labels < 0) | (labels >= m.num_classes)):
            raise ConfigError(f"class labels must lie in 0..{m.num_classes - 1}, got {sorted(set(labels.tolist()))}")
        uniforms = uniforms if uniforms is not None else draw_uniforms(seed, B, m.patch_nums)
        ctrl = None
        if m.control is not None:
            if cond is None:
                raise ConfigError("this export has a control encoder: give a condition image")
            ctrl = self.backend.run("control", {"cond": cond})["ctrl_tokens"]
        Cv, HW = m.latent_channels, m.latent_size
        x_in = np.zeros((B, Cv, 1, 1), np.float32)
        f_hat = np.zeros((B, Cv, HW, HW), np.float32)
        traj = Trajectory(ctrl=ctrl, uniforms=uniforms)
        for si, (b, e) in enumerate(begin_ends(m.patch_nums)):
            if teacher is not None:
                x_in, f_hat = teacher.x_in[si], teacher.f_hat_in[si]
            if record:
                traj.x_in.append(x_in)
                traj.f_hat_in.append(f_hat)
            feeds = self.step_feeds(si, labels, x_in, f_hat, uniforms[si], ctrl, sampling)
            out = self.backend.run("step", feeds, {"new_k": self.cache_k[b:e], "new_v": self.cache_v[b:e]})
            traj.tokens.append(out["tokens"])
            if record:
                traj.logits.append(out["logits"])
            x_in, f_hat = out["x_next"], out["f_hat_out"]
        traj.f_hat = f_hat
        if decode:
            traj.images = self.backend.run("decoder", {"f_hat": f_hat})["image"]
        return traj

    def step_feeds(self, si: int, labels: np.ndarray, x_in: np.ndarray, f_hat: np.ndarray, u_Bl: np.ndarray,
                   ctrl_LBC: np.ndarray | None, sampling: Sampling) -> Arrays:
        """The step graph's inputs at scale ``si``; the past K/V are views of the cache."""
        m, B = self.m, self.batch
        pn, (b, e) = m.patch_nums[si], begin_ends(m.patch_nums)[si]
        feeds = {"label": labels, "x_in": x_in, "f_hat": f_hat, "past_k": self.cache_k[:b],
                 "past_v": self.cache_v[:b], "u": u_Bl.reshape(B, pn, pn), **scale_constants(m, si, sampling)}
        if ctrl_LBC is not None:
            feeds["ctrl"] = ctrl_LBC[b:e].reshape(pn, pn, B, -1)
        return feeds
