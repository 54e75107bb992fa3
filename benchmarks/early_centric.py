"""Early-centric vs full-sequence ECM training: tokens and seconds per iteration, side by side.

Both settings train the same ECM on the same backbone and data; iterations alternate between
them so that machine noise hits both alike. Prints the measured means and their ratios.

    python benchmarks/early_centric.py                 # embedded default model
    python benchmarks/early_centric.py --iters 40 --batch 32
"""

from __future__ import annotations

import time

import click
import numpy as np
import torch
from ecm.runtime.errors import exit_on_error

from ecm.adapters import ECM, ecm_config
from ecm.control_train import ControlData, ECMTask
from ecm.controls import Control
from ecm.data import InMemory, ProceduralShapes
from ecm.default_model import load_backbone
from ecm.train import Dist


@click.command()
@exit_on_error
@click.option("--iters", default=30, show_default=True, help="Timed iterations per setting.")
@click.option("--batch", default=32, show_default=True, help="Batch size.")
@click.option("--strength", default=0.8, show_default=True, help="Early-centric strength to compare with 0.")
@click.option("--warmup", default=3, show_default=True, help="Untimed iterations per setting first.")
def main(iters: int, batch: int, strength: float, warmup: int) -> None:
    """Tokens and seconds per ECM training iteration: early-centric vs full sequences."""
    vae, var = load_backbone()
    var.requires_grad_(False)
    data = ControlData(InMemory(ProceduralShapes(256, vae.config.resolution, seed=0)),
                       Control("canny", resolution=vae.config.resolution), vae)
    ecm = ECM(ecm_config(var.config, vae.config.downsample))
    opt = torch.optim.AdamW(ecm.parameters(), lr=1e-4)
    tasks = {s: ECMTask(ecm.train(), var, data, batch, Dist(), s, 0.1) for s in (0.0, strength)}
    stats = {s: {"tokens": [], "sec": []} for s in tasks}
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
    cfg = var.config
    print(f"model: embedded default (L = {cfg.L}, depth {cfg.depth}), batch {batch}, {iters} iterations each")
    print(f"{'':28}{'tokens/iter':>12}{'sec/iter':>10}")
    print(f"{'full sequence (strength 0)':28}{full['tokens']:12.0f}{full['sec']:10.3f}")
    print(f"{f'early-centric ({strength})':28}{early['tokens']:12.0f}{early['sec']:10.3f}")
    print(f"{'ratio early / full':28}{early['tokens'] / full['tokens']:12.2f}{early['sec'] / full['sec']:10.2f}")


if __name__ == "__main__":
    main()
