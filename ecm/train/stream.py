"""Training batches streamed from a cache on disk (``ecm-train --data``), for datasets of any size.

Each epoch's order comes from a ``DistributedSampler`` (shuffled by seed and epoch; under
``torchrun`` each process takes every world-th index, so the processes read disjoint shares
whose union, step by step, is the batch one process would read alone). Step ``s`` reads the
``s``-th batch of that order, so the batch of a step is a function of (seed, step) alone and
``--resume`` continues mid-epoch with exactly the batch an uninterrupted run would read. The
early-centric cut is drawn with the batch, so a cut batch reads only its token prefix.
A ``DataLoader`` with worker processes reads the memory-mapped shards ahead of the step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ecm.data.cache import TokenCache
from ecm.model.pixels import to_model_range
from ecm.runtime.errors import ECMError
from ecm.runtime.scales import prefix_ends
from ecm.train.adapters import Batch, sample_num_scales
from ecm.train.loop import Dist


class StepBatches:
    """The sampler: yields ``(step, indices, num_scales)`` for steps ``start`` .. ``steps - 1`` of this process."""

    def __init__(self, n: int, batch: int, dist: Dist, seed: int, patch_nums: tuple[int, ...],
                 early_centric: float, start: int = 0, steps: int | None = None):
        self.n, self.batch, self.dist, self.seed = n, batch, dist, seed
        self.num_scales, self.early_centric = len(patch_nums), early_centric
        self.per_epoch = self._sampler(0).num_samples // batch
        if self.per_epoch == 0:
            raise ECMError(f"the data holds {n} images, fewer than one batch of {batch} x {dist.world} "
                           "processes; use a smaller --batch or more images")
        self.start, self.steps = start, steps if steps is not None else self.per_epoch

    def _sampler(self, epoch: int) -> DistributedSampler:
        s = DistributedSampler(range(self.n), num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True,
                               seed=self.seed, drop_last=True)
        s.set_epoch(epoch)
        return s

    def num_scales_at(self, step: int) -> int:
        """The early-centric cut of step ``step``: the same on every process."""
        return sample_num_scales(np.random.default_rng([self.seed, step, 1]), self.num_scales, self.early_centric)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, int]]:
        epoch, order = -1, np.empty(0, np.int64)
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, order = e, np.fromiter(self._sampler(e), np.int64)
            yield step, order[k * self.batch:(k + 1) * self.batch], self.num_scales_at(step)


class CacheReader:
    """The DataLoader's dataset: one item is one whole batch, read from the cache in a worker."""

    def __init__(self, cache: TokenCache):
        self.cache = cache
        self.ends = prefix_ends(cache.info.key.patch_nums)

    def __getitem__(self, item: tuple[int, np.ndarray, int]) -> dict:
        step, idx, K = item
        got = self.cache.read(idx, num_tokens=self.ends[K - 1])
        return {"step": step, "num_scales": K, "tokens": got.tokens_BL, "labels": got.labels_B, "maps": got.maps_BHW3}


class StreamBatches:
    """Batches of a training run over a cache, read ahead by ``workers`` processes (0: in this one)."""

    def __init__(self, cache: TokenCache, batch: int, dist: Dist, seed: int, early_centric: float, steps: int,
                 workers: int = 2):
        self.cache, self.batch, self.dist, self.seed = cache, batch, dist, seed
        self.early_centric, self.steps, self.workers = early_centric, steps, workers
        self.per_epoch = self.sampler(0).per_epoch
        self._it: Iterator[dict] | None = None
        self._next = -1

    def sampler(self, start: int) -> StepBatches:
        return StepBatches(len(self.cache), self.batch, self.dist, self.seed, self.cache.info.key.patch_nums,
                           self.early_centric, start, self.steps)

    def loader(self, start: int) -> DataLoader:
        """The batches of steps ``start`` .. ``steps - 1`` (nothing before ``start`` is read)."""
        return DataLoader(CacheReader(self.cache), sampler=self.sampler(start), batch_size=None,
                          num_workers=self.workers, prefetch_factor=4 if self.workers else None,
                          pin_memory=self.dist.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.seed))  # not the global RNG

    def __call__(self, step: int, rng: np.random.Generator) -> Batch:
        if self._it is None or step != self._next:
            self._it = iter(self.loader(step))
        got = next(self._it)
        if got["step"] != step:
            raise RuntimeError(f"the loader delivered step {got['step']} for step {step}")
        self._next = step + 1
        device, r, W = self.dist.device, self.dist.rank, self.dist.world
        on = {k: got[k].to(device, non_blocking=True) for k in ("labels", "maps", "tokens")}
        return Batch(on["labels"], to_model_range(on["maps"]), on["tokens"].long(), got["num_scales"],
                     r + W * np.arange(self.batch))
