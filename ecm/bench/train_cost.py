"""What an ECM training iteration costs: early-centric vs full-sequence, side by side.

Both settings train the same ECM on the same frozen backbone and data; iterations alternate
between them so that machine noise hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ecm.data.controls import Control
from ecm.data.datasets import ProceduralShapes
from ecm.model.adapters import ECM, ecm_config
from ecm.model.embedded import load_backbone
from ecm.train.adapters import ControlData, ECMTask, InMemoryBatches
from ecm.train.loop import Dist


def iteration_cost(iters: int = 30, batch: int = 32, strength: float = 0.8, warmup: int = 3, images: int = 256,
                   progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Mean tokens and seconds per training iteration of the embedded default backbone's ECM.

    Full sequences (early-centric strength 0) against ``strength``, over ``images`` procedural
    images, ``warmup`` untimed iterations each first. Returns the means and their ratios.
    """
    vae, var = load_backbone()
    var.requires_grad_(False)
    progress(f"tokenizing {images} procedural images for training ...")
    data = ControlData(ProceduralShapes(images, vae.config.resolution, seed=0),
                       Control("canny", resolution=vae.config.resolution), vae, show=False)
    ecm = ECM(ecm_config(var.config, vae.config.downsample))
    opt = torch.optim.AdamW(ecm.parameters(), lr=1e-4)
    tasks = {s: ECMTask(ecm.train(), var, InMemoryBatches(data, batch, Dist(), s, var.patch_nums), Dist(), 0.1)
             for s in (0.0, strength)}
    stats: dict[float, dict[str, list[float]]] = {s: {"tokens": [], "sec": []} for s in tasks}
    progress(f"timing {iters} training iterations each, early-centric ({strength}) and full, alternating ...")
    for it in range(warmup + iters):
        for s, task in tasks.items():
            t0 = time.perf_counter()
            loss, tokens = task(it, np.random.default_rng([7, it]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it >= warmup:
                stats[s]["sec"].append(time.perf_counter() - t0)
                stats[s]["tokens"].append(tokens)
    full, early = ({k: float(np.mean(v)) for k, v in stats[s].items()} for s in (0.0, strength))
    return {"model": "embedded default", "L": var.config.L, "depth": var.config.depth, "batch": batch,
            "iters": iters, "strength": strength, "full": full, "early": early,
            "ratio": {k: early[k] / full[k] for k in ("tokens", "sec")}}


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """The figures of :func:`iteration_cost` as a small table."""
    full, early, ratio = cost["full"], cost["early"], cost["ratio"]
    return [f"{'':30}{'tokens/iter':>12}{'s/iter':>10}",
            f"{'full sequence (strength 0)':30}{full['tokens']:12.0f}{full['sec']:10.3f}",
            f"{'early-centric (' + str(cost['strength']) + ')':30}{early['tokens']:12.0f}{early['sec']:10.3f}",
            f"{'ratio early / full':30}{ratio['tokens']:11.2f}x{ratio['sec']:9.2f}x"]
