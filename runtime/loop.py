"""The scale loop over exported graphs, written once for every backend.

Per image batch: run each given control's encoder once (and, to inpaint, the image encoder), then
for each scale feed the step graph its scale's constants (resampling matrices, phi choice, cfg
ramp weight, temperature), uniforms, control weights and the known tokens it keeps, let it write
this scale's keys and values into one preallocated cache, and pass its f_hat and next input on;
finally decode. A backend only has to run a named graph on named arrays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .backend import Backend
from .errors import ConfigError
from .inpaint import keep_masks, kept_pixels
from .manifest import Manifest, control_role
from .resample import area_matrix, bicubic_matrix
from .sampling import cfg_weight, check_sampling, draw_uniforms
from .scales import begin_ends, total_tokens
from .schedule import parse_temperature

Arrays = dict[str, np.ndarray]


def rows(buf: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of axis 0, without a copy (contiguous)."""
    return buf[start:stop] if isinstance(buf, np.ndarray) else buf.rows(start, stop)


def view(buf: Any, shape: tuple[int, ...]) -> Any:
    """The first prod(shape) elements of ``buf`` as an array of ``shape``, without a copy."""
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1)[:math.prod(shape)].reshape(shape)
    return buf.view(shape)


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
        check_sampling(self.cfg, self.top_k, self.top_p, self.temperature)
        if m.candidates < m.vocab_size and not 0 < self.top_k <= m.candidates:
            raise ConfigError(f"top-k {self.top_k} is outside 1..{m.candidates}, the candidates this export sorts; "
                              "pick a smaller top-k or re-export with a larger --candidates")


def scale_constants(m: Manifest, si: int, s: Sampling) -> Arrays:
    """The small per-scale inputs of the step graph (the weights are the same for every scale)."""
    K, HW = m.num_scales, m.latent_size
    phi = np.zeros(m.num_phi, np.float32)
    phi[m.phi_table[si]] = 1
    f32 = np.float32
    return {
        "up": bicubic_matrix(m.patch_nums[si], HW).astype(f32),
        "down": area_matrix(HW, m.next_patch(si)).astype(f32),
        "phi": phi,
        "first": np.array([si == 0], f32),
        "cfg": np.array([cfg_weight(s.cfg, si, K)], f32),
        "temperature": np.array([parse_temperature(s.temperature).values(K)[si]], f32),
        "top_k": np.array([s.top_k], np.int64),
        "top_p": np.array([s.top_p], f32),
    }


@dataclass
class Trajectory:
    """What one batch went through: the images, and with ``record`` every scale's tensors."""

    images: np.ndarray | None = None  # (B, H, W, 3) uint8
    step_images: list[np.ndarray] = field(default_factory=list)  # image after each scale, with steps=True
    tokens: list[np.ndarray] = field(default_factory=list)  # (B, pn*pn) int64 per scale, when recorded
    logits: list[np.ndarray] = field(default_factory=list)  # (2B, pn*pn, V) per scale, when recorded
    x_in: list[np.ndarray] = field(default_factory=list)  # each scale's input latent, when recorded
    f_hat_in: list[np.ndarray] = field(default_factory=list)  # f_hat before each scale, when recorded
    f_hat: np.ndarray | None = None  # the final latent, when recorded
    ctrl: np.ndarray | None = None  # control tokens of every control (K, L, B, D), when recorded
    uniforms: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per graph call, when timed


class ScaleLoop:
    """Generation for one batch size over buffers allocated once: every run reuses them.

    Host transfers per batch: labels, condition and uniforms in, images out (plus whatever
    ``record`` or ``steps`` ask for). On a GPU backend everything else stays on the device.
    """

    def __init__(self, manifest: Manifest, backend: Backend, batch: int | None = None):
        m = self.m = manifest
        self.backend = backend
        B = self.batch = manifest.batch if batch is None else batch
        L, Cv, HW, V = total_tokens(m.patch_nums), m.latent_channels, m.latent_size, m.vocab_size
        alloc = backend.alloc
        try:
            self.cache_k, self.cache_v = alloc(m.kv_shape(L, B), m.kv_dtype), alloc(m.kv_shape(L, B), m.kv_dtype)
            if m.controls:
                self.cache_ak = alloc(m.adapter_kv_shape(L, B), m.kv_dtype)
                self.cache_av = alloc(m.adapter_kv_shape(L, B), m.kv_dtype)
            self.f_hat = [alloc((B, Cv, HW, HW), "float32") for _ in range(2)]  # ping-pong: in, out
            self.x = [alloc((B, Cv, HW, HW), "float32") for _ in range(2)]
            self.logits = alloc((2 * B, HW * HW, V), "float32")
            self.tokens = alloc((B, HW * HW), "int64")
            self.ctrl = alloc((len(m.controls), L, B, m.adapter_dim), "float32") if m.controls else None
            self.image = alloc((B, m.image_size, m.image_size, 3), "uint8")
            # inpainting: the known image's tokens (L, B), where each scale keeps them, its latent; zeros: none kept
            self.known, self.keep = alloc((L, B), "int64"), alloc((L, B), "float32")
            self.f_known, self.keep_f = alloc((B, Cv, HW, HW), "float32"), alloc((B, 1, HW, HW), "float32")
            self.no_keep_f = alloc((B, 1, HW, HW), "float32")
        except MemoryError:
            raise ConfigError(f"not enough memory for a batch of {B} ({m.kv_cache_bytes(B) / 2**30:.1f} GiB of KV "
                              "cache alone); lower --batch") from None
        for buf in (self.known, self.keep, self.f_known, self.keep_f, self.no_keep_f):
            _zero(buf)
        self._inpainting = False
        self.weights: Any = None
        self._constants: dict[Sampling, list[dict[str, Any]]] = {}

    def constants(self, sampling: Sampling) -> list[dict[str, Any]]:
        """Every scale's constant inputs, uploaded once per sampling setting."""
        if sampling not in self._constants:
            upload = self.backend.upload
            self._constants[sampling] = [{k: upload(v) for k, v in scale_constants(self.m, si, sampling).items()}
                                         for si in range(self.m.num_scales)]
        return self._constants[sampling]

    def run(self, labels: np.ndarray, cond: np.ndarray | dict[str, np.ndarray] | None, sampling: Sampling, *,
            weights: dict[str, float] | None = None, inpaint: tuple[np.ndarray, np.ndarray] | None = None,
            seed: int = 0, uniforms: list[np.ndarray] | None = None, teacher: Trajectory | None = None,
            record: bool = False, steps: bool = False, decode: bool = True, timed: bool = False,
            on_scale: Callable[[int, np.ndarray], None] | None = None) -> Trajectory:
        """Generate one batch; image j draws its uniforms from seed ``seed + j``.

        ``cond``: uint8 conditions (B, R, R, 3) per control name, or one array for the engine's first
        control; controls without one are off. ``weights``: per control name (default 1). ``inpaint``:
        the canvas (B, R, R, 3) uint8 and where to generate (B, R, R), 1 = generate (``runtime.inpaint``).
        ``teacher`` feeds another run's inputs at every scale (teacher forcing); ``record`` keeps
        every scale's tensors, ``steps`` the image after every scale, ``timed`` the graph times;
        ``on_scale(si, images)`` gets the images after every scale as soon as they are decoded (previews).
        """
        m, B, be = self.m, self.batch, self.backend
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.shape != (B,):
            raise ConfigError(f"{labels.size} class labels for a batch of {B}")
        if np.any((labels < 0) | (labels >= m.num_classes)):
            raise ConfigError(f"class labels must lie in 0..{m.num_classes - 1}, got {sorted(set(labels.tolist()))}")
        uniforms = uniforms if uniforms is not None else draw_uniforms(seed, B, m.patch_nums)
        traj = Trajectory(uniforms=uniforms)
        clock = _Clock(traj.seconds if timed else None, be.synchronize)
        if m.controls:
            self._controls(cond, weights, clock, required=inpaint is None)
            if record:
                traj.ctrl = be.download(self.ctrl)
        elif cond is not None and (not isinstance(cond, dict) or cond):
            raise ConfigError("this engine has no control adapters (exported with --no-ecm); give no condition")
        self._inpaint(inpaint, clock)
        label_buf = be.upload(labels)
        Cv = m.latent_channels
        x_in, f_hat = view(self.x[0], (B, Cv, 1, 1)), self.f_hat[0]
        _zero(x_in)
        _zero(f_hat)
        for si, (b, e) in enumerate(begin_ends(m.patch_nums)):
            pn, pn_next = m.patch_nums[si], m.next_patch(si)
            if teacher is not None:
                x_in, f_hat = be.upload(teacher.x_in[si]), be.upload(teacher.f_hat_in[si])
            if record:
                traj.x_in.append(be.download(x_in))
                traj.f_hat_in.append(be.download(f_hat))
            feeds = self.step_feeds(si, label_buf, x_in, f_hat, be.upload(uniforms[si].reshape(B, pn, pn)), sampling)
            nxt = (si + 1) % 2
            out = {"logits": view(self.logits, (2 * B, pn * pn, m.vocab_size)),
                   "tokens": view(self.tokens, (B, pn * pn)), "f_hat_out": self.f_hat[nxt],
                   "x_next": view(self.x[nxt], (B, Cv, pn_next, pn_next)),
                   "new_k": rows(self.cache_k, b, e), "new_v": rows(self.cache_v, b, e)}
            if self.ctrl is not None:
                out.update(new_ak=rows(self.cache_ak, b, e), new_av=rows(self.cache_av, b, e))
            with clock(f"scale {si} ({pn}x{pn})"):
                be.run("step", feeds, out, profile=si)
            if record:
                traj.tokens.append(be.download(out["tokens"]))
                traj.logits.append(be.download(out["logits"]))
            if steps:
                traj.step_images.append(self._decode(out["f_hat_out"]))
            if on_scale is not None:
                on_scale(si, self._preview(out["f_hat_out"]))
            x_in, f_hat = out["x_next"], out["f_hat_out"]
        if record:
            traj.f_hat = be.download(f_hat)
        if decode:
            with clock("decoder"):
                traj.images = self._decode(f_hat)
            if inpaint is not None:
                with clock("decoder (kept pixels)"):
                    traj.images = np.where(kept_pixels(inpaint[1])[..., None], self._decode(self.f_known), traj.images)
        return traj

    def _controls(self, cond: np.ndarray | dict[str, np.ndarray] | None, weights: dict[str, float] | None,
                  clock: _Clock, required: bool = True) -> None:
        """Run the encoder of every control given a condition; the others get zero tokens and weight 0. Without
        any condition (allowed when ``required`` is false: inpainting) the backbone runs alone."""
        m, be, B = self.m, self.backend, self.batch
        conds = cond if isinstance(cond, dict) else {} if cond is None else {m.control_names[0]: cond}
        weights = weights or {}
        for name in [*conds, *weights]:
            m.control_index(name)  # unknown names: one line naming the engine's controls
        if not conds and required:
            raise ConfigError(f"this engine follows {', '.join(m.control_names)}: give a condition image (--cond)")
        w = np.zeros(len(m.controls), np.float32)
        L = total_tokens(m.patch_nums)
        for k, name in enumerate(m.control_names):
            tokens = view(rows(self.ctrl, k, k + 1), (L, B, m.adapter_dim))
            if name not in conds:
                _zero(tokens)
                continue
            w[k] = weights.get(name, 1.0)
            with clock(f"control {name}"):
                be.run(control_role(k), {"cond": be.upload(np.ascontiguousarray(conds[name], np.uint8))},
                       {"ctrl_tokens": tokens})
        self.weights = be.upload(w)

    def _inpaint(self, inpaint: tuple[np.ndarray, np.ndarray] | None, clock: _Clock) -> None:
        """Encode the known image and upload where each scale keeps it; without one, nothing is kept."""
        be, B, m = self.backend, self.batch, self.m
        if inpaint is None:
            if self._inpainting:
                for buf in (self.known, self.keep, self.f_known, self.keep_f):
                    _zero(buf)
                self._inpainting = False
            return
        image, generate = inpaint
        if image.shape[0] != B or generate.shape != image.shape[:3]:
            raise ConfigError(f"inpainting needs {B} images and masks of one size, got {image.shape} and "
                              f"{generate.shape}")
        with clock("encoder"):
            be.run("encoder", {"image": be.upload(np.ascontiguousarray(image, np.uint8))},
                   {"known_tokens": self.known, "f_known": self.f_known})
        keeps = keep_masks(generate, m.patch_nums)
        HW = m.latent_size
        self.keep = be.upload(np.ascontiguousarray(np.concatenate(keeps, axis=1).T, np.float32))
        self.keep_f = be.upload(keeps[-1].reshape(B, 1, HW, HW).astype(np.float32))
        self._inpainting = True

    def step_feeds(self, si: int, labels: Any, x_in: Any, f_hat: Any, u_Bpp: Any, sampling: Sampling) -> dict[str, Any]:
        """The step graph's inputs at scale ``si``: past K/V, control tokens and known tokens are views of buffers."""
        m, B = self.m, self.batch
        pn, (b, e) = m.patch_nums[si], begin_ends(m.patch_nums)[si]
        last = si == m.num_scales - 1
        feeds = {"label": labels, "x_in": x_in, "f_hat": f_hat, "past_k": rows(self.cache_k, 0, b),
                 "past_v": rows(self.cache_v, 0, b), "u": u_Bpp, **self.constants(sampling)[si],
                 "known": view(rows(self.known, b, e), (pn, pn, B)), "keep": view(rows(self.keep, b, e), (pn, pn, B)),
                 "f_known": self.f_known, "keep_f": self.keep_f if last else self.no_keep_f}
        if self.ctrl is not None:
            feeds.update(ctrl=self.ctrl, control_weight=self.weights, past_ak=rows(self.cache_ak, 0, b),
                         past_av=rows(self.cache_av, 0, b))
        return feeds

    def _preview(self, f_hat: Any) -> np.ndarray:
        """The images a latent shows: through the manifest's linear latent-to-RGB map where it has one (no decoder
        run: a blurred likeness, enlarged to the image size), else decoded."""
        if self.m.preview is None:
            return self._decode(f_hat)
        return latent_preview(self.backend.download(f_hat), self.m.preview, self.m.image_size)

    def _decode(self, f_hat: Any) -> np.ndarray:
        self.backend.run("decoder", {"f_hat": f_hat}, {"image": self.image})
        return self.backend.download(self.image)


def latent_preview(f_hat_BChw: np.ndarray, table: list[list[float]], size: int) -> np.ndarray:
    """uint8 (B, size, size, 3) from a latent with a (C + 1) x 3 linear map (the last row: the offset), enlarged
    bilinearly from the latent's grid."""
    W = np.asarray(table, np.float32)
    rgb = np.einsum("bchw,cd->bhwd", f_hat_BChw.astype(np.float32), W[:-1]) + W[-1]
    cells = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in cells])


def _zero(buf: Any) -> None:
    if isinstance(buf, np.ndarray):
        buf[...] = 0
    else:
        buf.zero()


class _Clock:
    """Wall time per named block into ``into`` (a no-op without it), waiting for the device around it."""

    def __init__(self, into: dict[str, float] | None, sync: Callable[[], None]):
        self.into, self.sync = into, sync

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.into is None:
            yield
            return
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.into[name] = time.perf_counter() - start
