"""Uniforms for sampling, drawn the same way by every backend so that a seed means one image."""

from __future__ import annotations

import math

import numpy as np
from numpy.random import default_rng  # here, not in the first run: it pages in OpenSSL (hashlib, via secrets)

from .errors import ConfigError
from .schedule import parse_temperature


def draw_uniforms(seed: int, batch: int, patch_nums: tuple[int, ...]) -> list[np.ndarray]:
    """One uniform in (0, 1] per token, scale by scale: a list of float32 arrays (batch, pn*pn).

    Image j of the batch draws from seed ``seed + j``, so an image depends on its seed only, not
    on how a run is split into batches. Inverse-CDF sampling picks the first token whose
    cumulative probability reaches ``u * total``; with u > 0 that token always has non-zero
    probability.
    """
    per_image = []
    for j in range(batch):
        rng = default_rng(seed + j)
        per_image.append([1.0 - rng.random(pn * pn, dtype=np.float64) for pn in patch_nums])
    return [np.stack([img[si] for img in per_image]).astype(np.float32).reshape(batch, -1)
            for si in range(len(patch_nums))]


#: Sampling defaults, shared by eager generation, export manifests and the runtime CLI.
#: cfg / top-k / top-p are the official VAR recommendation for FID; ECM models add a temperature
#: schedule (see the manifest) that lowers the temperature on the late scales.
DEFAULT_CFG = 1.5
DEFAULT_TOP_K = 900
DEFAULT_TOP_P = 0.96
DEFAULT_TEMPERATURE = "1.0"
#: ECM trains the late scales on fewer tokens (early-centric sampling): cool them at inference.
DEFAULT_ECM_TEMPERATURE = "1.0:0.8"


def cfg_weight(cfg: float, si: int, num_scales: int) -> float:
    """The official linear guidance ramp: t = cfg * si / (K - 1)."""
    return cfg * si / (num_scales - 1)


def check_sampling(cfg: float, top_k: int, top_p: float, temperature: str) -> None:
    """Refuse settings no generation can use, in the same words for eager models and engines."""
    if not math.isfinite(cfg):
        raise ConfigError(f"cfg {cfg} must be a finite number")
    if top_k < 0:
        raise ConfigError(f"top-k {top_k} must be >= 0 (0 turns it off)")
    if not 0 <= top_p <= 1:
        raise ConfigError(f"top-p {top_p} must lie in [0, 1] (0 turns it off)")
    parse_temperature(temperature)
