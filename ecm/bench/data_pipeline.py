"""The data pipeline at scale: ecm-prepare's throughput and cache size, training memory against dataset
size, and the streaming loader's rate against the training step's.

Commands run as the user runs them, each in a process of its own whose memory (its whole process
tree: DataLoader and preparation workers too) is sampled while it runs; the loader and the step
are timed side by side in this process on the same cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ecm.data.cache import TokenCache
from ecm.data.datasets import SHAPES, ProceduralShapes
from ecm.model.adapters import ECM, ecm_config
from ecm.model.var import VAR
from ecm.runtime.memory import proc_mb
from ecm.runtime.scales import prefix_ends
from ecm.train.adapters import ECMTask
from ecm.train.loop import Dist
from ecm.train.stream import StreamBatches

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------ processes and memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _mb(field: str, path: str) -> float:
    """A /proc figure of a process of the tree, 0 once the process has gone."""
    try:
        return proc_mb(field, path)
    except OSError:
        return 0.0


def tree_memory(pid: int) -> dict[str, float]:
    """Memory of ``pid`` and all its descendants now, MiB: the main process's RSS, and the tree's summed
    RSS and PSS (PSS shares each page among the processes that map it, so a shared cache counts once)."""
    kids, todo, tree = _children(), [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    rss = [_mb("VmRSS", f"/proc/{p}/status") for p in tree]
    pss = [_mb("Pss", f"/proc/{p}/smaps_rollup") for p in tree]
    return {"main_rss": rss[0], "tree_rss": sum(rss), "tree_pss": sum(pss)}


def measured(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a command, sampling its process tree's memory every 0.1 s: wall seconds and peak MiB of each
    figure of :func:`tree_memory`. Its output goes to ``log_path``."""
    peaks = {"main_rss": 0.0, "tree_rss": 0.0, "tree_pss": 0.0}
    start = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

        def sample() -> None:
            while proc.poll() is None:
                for k, v in tree_memory(proc.pid).items():
                    peaks[k] = max(peaks[k], v)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {log_path.read_text()[-2000:]}")
    return {"wall_s": time.perf_counter() - start, **{f"peak_{k}_mb": v for k, v in peaks.items()}}


def script(name: str) -> str:
    """A console script installed beside this Python."""
    return str(Path(sys.executable).parent / name)


# ------------------------------------------------------------------------------------ data on disk
def _write_range(args: tuple[Path, int, int, int]) -> None:
    root, start, stop, resolution = args
    ds = ProceduralShapes(stop, resolution, seed=0)
    for i in range(start, stop):
        img, label = ds[i]
        Image.fromarray(img).save(root / SHAPES[label] / f"{i:06d}.png", compress_level=1)


def write_procedural_folder(root: Path, n: int, resolution: int = 64, workers: int = 2) -> float:
    """``n`` procedural images as PNG files in ImageNet layout (a folder per class); returns seconds."""
    t0 = time.perf_counter()
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
    chunks = [(root, a, min(n, a + 2000), resolution) for a in range(0, n, 2000)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_write_range, chunks)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ loader against step
def loader_against_step(cache: TokenCache, var: VAR, batch: int, steps: int, workers: int, loader_batches: int = 200,
                        early_centric: float = 0.8, log: Log = print) -> dict[str, Any]:
    """Batches per second the streaming loader delivers (``loader_batches`` of them, with ``workers``
    processes and in this process alone) against training steps per second on batches it read."""
    def rate(w: int) -> float:
        batches = StreamBatches(cache, batch, Dist(), 0, early_centric, loader_batches + 4, w)
        for s in range(4):  # workers started, files mapped
            batches(s, np.random.default_rng(s))
        t0 = time.perf_counter()
        for s in range(4, 4 + loader_batches):
            batches(s, np.random.default_rng(s))
        return loader_batches / (time.perf_counter() - t0)

    log(f"  loader: {loader_batches} batches of {batch} with {workers} workers, then in-process ...")
    loader_rate, inline_rate = rate(workers), rate(0)
    pre = StreamBatches(cache, batch, Dist(), 0, early_centric, steps + 1, 0)
    held = [pre(s, np.random.default_rng(s)) for s in range(steps + 1)]
    var.requires_grad_(False)
    ecm = ECM(ecm_config(var.config, var.vae.config.downsample)).train()
    task = ECMTask(ecm, var, lambda step, rng: held[step], Dist(), 0.1)
    opt = torch.optim.AdamW(ecm.parameters(), lr=1e-4)
    log(f"  training: {steps} steps of {batch} on the same batches ...")
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = task(s, np.random.default_rng(s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_rate = 1 / float(np.mean(times[1:]))  # the first step warms up
    return {"batch": batch, "workers": workers, "loader_batches_per_s": loader_rate,
            "inline_batches_per_s": inline_rate, "steps_per_s": step_rate, "ratio": loader_rate / step_rate,
            "ratio_inline": inline_rate / step_rate}


#: Dense BF16 tensor-core peaks from NVIDIA's datasheets (A100 SXM, H100 SXM), FLOP/s: what the epoch estimate
#: scales this CPU's measured rate by.
GPU_PEAKS = {"A100": 312e12, "H100": 989e12}


def epoch_estimate(cache: TokenCache, var: VAR, batch: int, early_centric: float, images: int,
                   log: Log = print) -> dict[str, Any]:
    """Seconds per training sample of ``var`` + ECM on this CPU, the expectation over the early-centric cut
    (one timed step per number of scales, on batches read from ``cache``), and an epoch of ``images``
    scaled to GPUs by the ratio of their peak rate to this CPU's measured matrix-product rate: an estimate
    that assumes both reach the same share of their peak."""
    from ecm.bench.roofline import matmul_gflops
    from ecm.model.pixels import to_model_range
    from ecm.train.adapters import Batch

    K_all = len(var.patch_nums)
    ends = prefix_ends(var.patch_nums)
    got = cache.read(np.arange(batch) % len(cache))
    var.requires_grad_(False)
    ecm = ECM(ecm_config(var.config, var.vae.config.downsample)).train()
    opt = torch.optim.AdamW(ecm.parameters(), lr=1e-4)
    seconds = {}
    for K in [K_all, *range(2, K_all + 1)]:  # the first full step warms up, untimed
        b = Batch(torch.from_numpy(got.labels_B), to_model_range(got.maps_BHW3),
                  torch.from_numpy(got.tokens_BL[:, :ends[K - 1]]).long(), K, np.arange(batch))
        task = ECMTask(ecm, var, lambda step, rng, b=b: b, Dist(), 0.1)
        t0 = time.perf_counter()
        loss, _ = task(0, np.random.default_rng(K))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds[K] = (time.perf_counter() - t0) / batch
        log(f"  {K} scales ({ends[K - 1]} tokens): {seconds[K]:.2f} s per sample")
    cut = np.mean([seconds[K] for K in range(2, K_all)])
    per_sample = (1 - early_centric) * seconds[K_all] + early_centric * cut
    cpu = matmul_gflops() * 1e9
    cpu_hours = images * per_sample / 3600
    return {"seconds_per_sample": seconds, "expected_seconds_per_sample": per_sample, "cpu_flops": cpu,
            "images": images, "cpu_hours_per_epoch": cpu_hours,
            "gpu_hours_per_epoch": {g: cpu_hours * cpu / peak for g, peak in GPU_PEAKS.items()}}
