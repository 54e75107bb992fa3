"""Training: the VQVAE and VAR backbone from scratch (``ecm-pretrain``) and ECM adapters (``ecm-train``).

One loop (:func:`fit`) serves all three: AdamW, linear warm-up then cosine decay, gradient
clipping, AMP on CUDA, DistributedDataParallel under ``torchrun``, a progress bar with loss and
tokens/s, a JSONL log, and atomic checkpoints. Every step draws its batch and its randomness
from ``(seed, step)`` alone, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ecm.runtime.errors import CheckpointError, ConfigError, ECMError, first_line
from ecm.runtime.files import atomic_path


@dataclass
class TrainSpec:
    """Optimisation settings shared by every training command."""

    steps: int = 1000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    seed: int = 0
    save_every: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"learning rate {self.lr} must be a finite number > 0")


# ------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Dist:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join a ``torchrun`` process group if there is one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1:
        import torch.distributed as tdist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return Dist(rank, world, dev)
    return Dist(0, 1, dev)


def barrier(dist: Dist) -> None:
    """Wait until every process of the job is here (nothing to wait for alone)."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def batch_indices(rng: np.random.Generator, n: int, batch: int, dist: Dist) -> np.ndarray:
    """This rank's share of the step's global batch (drawn with replacement, reproducibly)."""
    idx = rng.integers(0, n, batch * dist.world)
    return idx[dist.rank * batch:(dist.rank + 1) * batch]


# ------------------------------------------------------------------------------------ the loop
def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to ``spec.lr``, then cosine decay to a tenth of it."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def step_seed(seed: int, step: int) -> int:
    """The torch seed of one step: a function of (seed, step) alone, so resumed runs match."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def fit(task: nn.Module, spec: TrainSpec, out_dir: Path, save: Callable[[int], None], desc: str,
        dist: Dist | None = None, resume_from: int | None = None) -> list[dict[str, float]]:
    """Train the trainable parameters of ``task``; returns the log records of this call.

    ``task(step, rng)`` returns (loss, tokens in the batch); ``save(step)`` writes the weights, then
    ``out_dir/train_state.pt`` takes the resume point (see :func:`save_train_state`); the log goes to
    ``out_dir/log.jsonl``. ``resume_from`` is the step of the weights the caller loaded.
    """
    out_dir, dist = Path(out_dir), dist or Dist()
    out_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in task.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    start = 0
    if resume_from is not None:
        start = load_train_state(out_dir, task, opt, spec, resume_from, dist.world)
        if dist.main:
            trim_log(out_dir / "log.jsonl", start)
    model: nn.Module = task
    if dist.world > 1:
        ids = [dist.device] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(task, device_ids=ids)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else nullcontext()
    records = []
    bar = tqdm(range(start, spec.steps), desc=desc, initial=start, total=spec.steps, disable=not dist.main,
               dynamic_ncols=True)
    with (out_dir / "log.jsonl").open("a") if dist.main else nullcontext() as log:
        for step in bar:
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(spec.seed, step) + dist.rank)
            rng = np.random.default_rng([spec.seed, step])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, spec)
            with amp:
                loss, tokens = model(step, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            if not torch.isfinite(grad_norm):  # all-reduced, so every rank stops together
                raise ECMError(f"training diverged at step {step + 1} (loss {loss.item():.4g}); lower --lr and "
                               "--resume from the last checkpoint")
            opt.step()
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": global_mean(loss.detach(), dist), "lr": lr_at(step, spec),
                   "grad_norm": float(grad_norm), "tokens": tokens * dist.world,
                   "tok_per_s": tokens * dist.world / dt, "sec": dt}
            records.append(rec)
            if dist.main:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                    save(step + 1)
                    save_train_state(out_dir, task, opt, step + 1, spec, dist.world)
    return records


def global_mean(x: torch.Tensor, dist: Dist) -> float:
    """The mean of a scalar over every process: the loss of the whole batch, as one process would log it."""
    if dist.world > 1:
        import torch.distributed as tdist

        x = x.clone()
        tdist.all_reduce(x)
        x /= dist.world
    return x.item()


def save_train_state(out_dir: Path, task: nn.Module, opt: torch.optim.Optimizer, step: int, spec: TrainSpec,
                     world: int = 1) -> None:
    """What ``--resume`` needs, in one atomic file: the trained weights, optimizer state, step, settings and
    number of processes (which shapes every step's global batch).

    Written after the weights file, so a run stopped between the two writes resumes from here.
    """
    with atomic_path(out_dir / "train_state.pt") as tmp:
        torch.save({"step": step, "model": task.state_dict(), "optimizer": opt.state_dict(), "spec": asdict(spec),
                    "world": world}, tmp)


def load_train_state(out_dir: Path, task: nn.Module, opt: torch.optim.Optimizer, spec: TrainSpec,
                     weights_step: int, world: int = 1) -> int:
    """Restore the weights and optimizer of the last resume point; refuse settings that differ from the
    run's (more steps are fine). ``weights_step``: the step of the weights file the caller loaded."""
    path = out_dir / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"nothing to resume in {out_dir}: no train_state.pt; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if "model" in state:  # the weights file may be a save ahead of this state: take the state's weights
            task.load_state_dict(state["model"])
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot resume from {path} ({first_line(e, 120)}); delete it to start over") from None
    if "model" not in state and step != weights_step:  # written by an ecm that kept the weights apart
        raise CheckpointError(f"{out_dir}: the weights are from step {weights_step} but the optimizer state from "
                              f"step {step} (the run stopped between the two writes); start the run again")
    saved = {k: v for k, v in state.get("spec", {}).items() if k != "steps"}
    changed = [f"{k} {v} -> {getattr(spec, k)}" for k, v in saved.items() if getattr(spec, k, v) != v]
    if state.get("world", 1) != world:
        changed.append(f"processes {state.get('world', 1)} -> {world}")
    if changed:
        raise CheckpointError(f"--resume with other settings than the run in {out_dir} ({', '.join(changed)}); "
                              "resume with the original ones")
    return step


def trim_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the last checkpoint of a stopped run), and any line
    the stop left unfinished."""
    if path.is_file():
        keep = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the stop
                continue
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in keep))


def cross_entropy(logits_BLV: torch.Tensor, target_BL: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of (B, L, V) logits against (B, L) targets."""
    return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), target_BL.reshape(-1))


def dump_config(out_dir: Path, **parts: Any) -> None:
    """Write what a run was started with, for people and for ``--resume``."""
    with atomic_path(out_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(parts, indent=2, default=str))
