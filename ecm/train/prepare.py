"""``ecm-prepare``: an image folder made into a training cache once (the layout: :mod:`ecm.data.cache`).

Each image is read, cut to the model's resolution as the official evaluation does, given its
control map (extracted, or read from a folder and resized with it) and encoded by the frozen
VQVAE into its tokens of every scale. The work comes in shards of ``shard_size`` images: a
process takes the shards ``share, share + shares, ...`` (its rank under ``torchrun``, and its
worker among ``--workers``), skips those already on disk and writes each in a hidden folder
renamed into place, so a run killed at any moment loses at most the shards it was writing and
the same command continues it. Unreadable images are skipped and listed; more than ``max_bad``
of them stops the run in one line.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ecm.data.cache import (
    BAD,
    CACHE_FILE,
    FILES,
    TEXT,
    CacheInfo,
    CacheKey,
    index_dtype,
    map_bytes,
    pack_maps,
    shard_name,
)
from ecm.data.controls import Control
from ecm.data.datasets import ImageFolder
from ecm.model.checkpoint import tensor_hash
from ecm.model.vqvae import VQVAE
from ecm.runtime.errors import ECMError, first_line
from ecm.runtime.files import atomic_path
from ecm.runtime.images import preprocess, read_image
from ecm.train.loop import Dist, barrier
from ecm.train.pretrain import tokenize

Progress = Callable[[int], None]


def cache_key(vae: VQVAE, control: str, canny_low: int = 100, canny_high: int = 200) -> CacheKey:
    """The key of caches made with ``vae`` for ``control``: what training and evaluation check."""
    canny = (canny_low, canny_high) if control == "canny" else None
    return CacheKey(tensor_hash(vae.state_dict()), vae.config.resolution, tuple(vae.config.patch_nums), control,
                    canny)


@dataclass
class Source:
    """The images of a folder, sorted: ImageNet layout (a sub-folder per class, sorted names are the class
    indices, as in the official VAR) or flat (one class)."""

    root: Path
    classes: list[str]
    files: list[tuple[str, int]]  # path relative to root, label

    @classmethod
    def scan(cls, root: Path, resolution: int) -> Source:
        folder = ImageFolder(Path(root).resolve(), resolution)
        return cls(folder.root, list(folder.classes),
                   [(p.relative_to(folder.root).as_posix(), label) for p, label in folder.items])

    def listing(self) -> str:
        """files.txt: one image per line, label and relative path."""
        return "".join(f"{label}\t{rel}\n" for rel, label in self.files)

    def shard(self, info: CacheInfo, i: int) -> list[tuple[str, int]]:
        """The images of shard ``i``."""
        return self.files[i * info.shard_size:(i + 1) * info.shard_size]


class MapFormatError(ECMError):
    """A control map that the cache's map format cannot hold: a setting to change, not a bad image."""


def plan(out: Path, source: Source, key: CacheKey, control: Control, shard_size: int, map_format: str,
         vocab_size: int) -> CacheInfo:
    """Begin the cache in ``out`` (its file list and key), or check that the one there is this one."""
    out = Path(out)
    if (out / CACHE_FILE).is_file():
        info = CacheInfo.load(out)
        if info.key != key:
            raise ECMError(f"{out} holds a cache made for another setting ({', '.join(info.key.differences(key))}); "
                           "pass another --out or delete it")
        if not (out / FILES).is_file() or (out / FILES).read_text(**TEXT) != source.listing():
            raise ECMError(f"the images in {source.root} are not those the cache {out} was begun with; delete it or "
                           "pass another --out to start over")
        if info.shard_size != shard_size:
            raise ECMError(f"the cache {out} was begun with --shard-size {info.shard_size}; continue it with that")
        if map_format not in ("auto", info.map_format):
            raise ECMError(f"the cache {out} was begun with --map-format {info.map_format}; continue it with that")
        return info
    others = [p.name for p in out.iterdir() if p.name != FILES and not p.name.startswith(".")] if out.exists() else []
    if others:  # a cache begun and killed before its cache.json holds files.txt and hidden files at most
        raise ECMError(f"{out} is a folder with other files in it, not a cache; pass an empty or new --out")
    if map_format == "bits" and not control.kind.binary:
        raise ECMError(f"--map-format bits keeps one bit per pixel, but {control.spec} maps are not two-valued; "
                       "use auto, grey or rgb")
    with atomic_path(out / FILES) as tmp:
        tmp.write_text(source.listing(), **TEXT)
    if map_format == "auto":
        map_format = _map_format(source, control)
    info = CacheInfo(key=key, classes=source.classes, num_files=len(source.files), shard_size=shard_size,
                     map_format=map_format, token_dtype=index_dtype(vocab_size).name, source=str(source.root))
    info.save(out)
    return info


def _is_grey(map_HW3: np.ndarray) -> bool:
    return bool((map_HW3[..., 0] == map_HW3[..., 1]).all() and (map_HW3[..., 0] == map_HW3[..., 2]).all())


def _map_format(source: Source, control: Control) -> str:
    """Packed bits for binary controls; else grey when the first readable map is grey, RGB otherwise."""
    if control.kind.binary:
        return "bits"
    for rel, _ in source.files:
        try:
            _, m = _read(source.root, rel, control, "rgb")
        except ECMError:
            continue
        return "grey" if _is_grey(m) else "rgb"
    return "rgb"


def _read(root: Path, rel: str, control: Control, map_format: str) -> tuple[np.ndarray, np.ndarray]:
    """One image at the model's resolution and its control map; ECMError when either cannot be read."""
    path = root / rel
    img = preprocess(read_image(path, "image"), control.resolution)
    m = control(img, path)
    if map_format == "grey" and not _is_grey(m):
        raise MapFormatError(f"the control map of {path} is in colour, but the first map was grey, so this cache "
                             "stores grey maps; prepare into a fresh --out with --map-format rgb")
    return img, m


def write_shard(out: Path, info: CacheInfo, i: int, root: Path, lines: list[tuple[str, int]], vae: VQVAE,
                control: Control, batch: int = 32, progress: Progress | None = None) -> int:
    """Make shard ``i`` of the images ``lines`` (skipped ones listed in its bad.txt); returns how many images
    could not be read."""
    images, maps, labels, items, bad = [], [], [], [], []
    for j, (rel, label) in enumerate(lines):
        try:
            img, m = _read(root, rel, control, info.map_format)
        except MapFormatError:
            raise
        except (ECMError, OSError, ValueError) as e:
            bad.append(f"{rel}\t{first_line(e, 300)}\n")
        else:
            images.append(img)
            maps.append(m)
            labels.append(label)
            items.append(i * info.shard_size + j)
        if progress is not None and (j + 1) % batch == 0:
            progress(batch)
    if progress is not None and len(lines) % batch:
        progress(len(lines) % batch)
    res = info.key.resolution
    if images:
        tokens = tokenize(vae, np.stack(images), batch, show=False).numpy()
    else:
        tokens = np.empty((0, info.key.num_tokens), info.token_dtype)
    arrays = {"tokens": tokens, "labels": np.asarray(labels, index_dtype(len(info.classes))),
              "maps": pack_maps(np.stack(maps) if maps else np.empty((0, res, res, 3), np.uint8), info.map_format),
              "items": np.asarray(items, np.int64)}
    final = Path(out) / shard_name(i)
    tmp = Path(out) / f".{shard_name(i)}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, arr)
                os.fsync(f.fileno())
        with open(tmp / BAD, "w", **TEXT) as f:
            f.write("".join(bad))
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        if not final.is_dir():  # else another process made this shard meanwhile: the same bytes
            raise ECMError(f"cannot write {final}: {e.strerror or e}; free some disk space and run the same command "
                           "again (finished shards are kept)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(bad)


def pending_shards(out: Path, info: CacheInfo, share: int, shares: int) -> list[int]:
    """The shards of this share not on disk yet; leftovers of killed writes of them are removed."""
    out, pending = Path(out), []
    for i in range(share, info.num_shards, shares):
        for stale in out.glob(f".{shard_name(i)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not (out / shard_name(i)).is_dir():
            pending.append(i)
    return pending


def images_in(info: CacheInfo, shards: list[int]) -> int:
    """How many source images the shards hold together (the last shard may be short)."""
    return sum(min(info.shard_size, info.num_files - i * info.shard_size) for i in shards)


def too_many_bad(num_bad: int, info: CacheInfo, max_bad: float, out: Path, example: str) -> ECMError | None:
    """The one-line error when more than ``max_bad`` of the images are unreadable, else None."""
    if num_bad <= max_bad * info.num_files:
        return None
    return ECMError(f"{num_bad} of {info.num_files} images could not be read (more than --max-bad {max_bad:.1%}), "
                    f"e.g. {example.split('; ')[0]}; the list is in {out}/shard-*/{BAD}: replace those files and "
                    "prepare into a fresh --out, or raise --max-bad to skip them")


@dataclass
class Recipe:
    """What a worker process needs to make shards, small enough to send (each task brings its own images)."""

    out: Path
    root: Path
    vae_path: str | None
    control: Control
    batch: int
    threads: int
    device: str


_worker: dict = {}


def _start_worker(recipe: Recipe) -> None:
    from ecm.model.embedded import default_paths

    torch.set_num_threads(recipe.threads)
    _worker["recipe"] = recipe
    _worker["vae"] = VQVAE.from_checkpoint(recipe.vae_path or default_paths()[0]).to(recipe.device).eval()
    _worker["info"] = CacheInfo.load(recipe.out)


def _work(i: int, lines: list[tuple[str, int]]) -> tuple[int, int, str]:
    r = _worker["recipe"]
    num_bad = write_shard(r.out, _worker["info"], i, r.root, lines, _worker["vae"], r.control, r.batch)
    return i, num_bad, _first_bad(r.out, i)


def _first_bad(out: Path, i: int) -> str:
    return _first_reason((Path(out) / shard_name(i) / BAD).read_text(**TEXT))


def _first_reason(bad: str) -> str:
    """Why the first image of a bad.txt text could not be read ('' when none)."""
    return bad.split("\t", 1)[1].splitlines()[0] if bad else ""


def prepare_share(recipe: Recipe, source: Source, vae: VQVAE, info: CacheInfo, share: int, shares: int,
                  workers: int, max_bad: float, progress: Progress) -> None:
    """Make this share's missing shards, in this process or in ``workers`` processes of its own (each loads
    the VQVAE onto ``recipe.device``)."""
    pending = pending_shards(recipe.out, info, share, shares)
    num_bad = 0
    if workers <= 1:
        for i in pending:
            num_bad += write_shard(recipe.out, info, i, source.root, source.shard(info, i), vae, recipe.control,
                                   recipe.batch, progress)
            error = too_many_bad(num_bad, info, max_bad, recipe.out, _first_bad(recipe.out, i))
            if error:
                raise error
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                               initargs=(recipe,))
    try:
        futures = [pool.submit(_work, i, source.shard(info, i)) for i in pending]
        for done in as_completed(futures):
            i, bad, example = done.result()
            num_bad += bad
            progress(images_in(info, [i]))
            error = too_many_bad(num_bad, info, max_bad, recipe.out, example)
            if error:
                raise error
    except BrokenProcessPool as e:
        raise ECMError(f"a preparing worker process died ({first_line(e, 120)}): out of memory? Run again with "
                       "fewer --workers; finished shards are kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def wait_for(check: Callable[[], bool], poll: float = 2.0) -> None:
    """Wait until ``check()`` holds: how the processes of a job wait for each other's shards, for as long as
    preparing takes (a collective barrier would time out on a long share)."""
    while not check():
        time.sleep(poll)


@dataclass
class Summary:
    """What a finished cache holds."""

    folder: Path
    images: int
    bad: int
    shards: int
    bytes_on_disk: int
    bytes_per_image: float
    token_bytes: int
    map_bytes: int

    def lines(self) -> list[str]:
        return [f"cache {self.folder}: {self.images} images in {self.shards} shards, {_size(self.bytes_on_disk)} "
                f"({self.bytes_per_image:.0f} bytes per image: tokens {self.token_bytes}, control map "
                f"{self.map_bytes}, label and index)",
                f"{self.bad} unreadable images skipped" + (f", listed in {self.folder / BAD}" if self.bad else "")]


def _size(n: float) -> str:
    return next(f"{n / u:.1f} {name}" for u, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes"))
                if n >= u or u == 1)


def finish(out: Path, max_bad: float) -> None:
    """Gather the unreadable images of every shard (all of them are in) into bad.txt and mark the cache
    complete."""
    out = Path(out)
    info = CacheInfo.load(out)
    bad = "".join((out / shard_name(i) / BAD).read_text(**TEXT) for i in range(info.num_shards))
    num_bad = bad.count("\n")
    error = too_many_bad(num_bad, info, max_bad, out, _first_reason(bad))
    if error:
        raise error
    with atomic_path(out / BAD) as tmp:
        tmp.write_text(bad, **TEXT)
    info.complete, info.num_images, info.num_bad = True, info.num_files - num_bad, num_bad
    info.save(out)


def summarize(out: Path) -> Summary:
    """The figures of a complete cache."""
    out = Path(out)
    info = CacheInfo.load(out)
    size = sum(f.stat().st_size for i in range(info.num_shards) for f in (out / shard_name(i)).iterdir())
    return Summary(out, info.num_images, info.num_bad, info.num_shards, size, size / max(1, info.num_images),
                   info.key.num_tokens * np.dtype(info.token_dtype).itemsize,
                   map_bytes(info.map_format, info.key.resolution))


def prepare(source_dir: Path, out: Path, vae: VQVAE, vae_path: str | None, control: Control, *,
            shard_size: int = 1024, batch: int = 32, workers: int = 1, max_bad: float = 0.01,
            map_format: str = "auto", dist: Dist | None = None, show: bool = True) -> Summary:
    """Make (or finish) the cache of ``source_dir`` in ``out``; every process of ``dist`` does its share (on a
    file system they all see), the first marks the cache complete once every shard is in.

    ``vae_path``: the file ``vae`` was read from (None: the embedded default), for worker processes.
    """
    dist, out = dist or Dist(), Path(out)
    source = Source.scan(Path(source_dir), vae.config.resolution)
    control.check_pairs([source.root / rel for rel, _ in source.files])
    key = cache_key(vae, control.spec, control.canny_low, control.canny_high)
    if dist.main:
        for stale in out.glob(".*.tmp"):  # files of atomic writes a kill interrupted
            stale.unlink(missing_ok=True)
        info = plan(out, source, key, control, shard_size, map_format, vae.config.vocab_size)
    barrier(dist)
    if not dist.main:
        info = plan(out, source, key, control, shard_size, map_format, vae.config.vocab_size)
    recipe = Recipe(out, source.root, vae_path, control, batch, max(1, torch.get_num_threads() // workers),
                    str(dist.device))
    mine = list(range(dist.rank, info.num_shards, dist.world))
    share = f" (process {dist.rank} of {dist.world}: its share)" if dist.world > 1 else ""
    done = images_in(info, [i for i in mine if (out / shard_name(i)).is_dir()])
    with tqdm(total=images_in(info, mine), initial=done, desc=f"preparing {source.root.name}{share}", unit="img",
              disable=not show, dynamic_ncols=True, smoothing=0.05) as bar:
        prepare_share(recipe, source, vae, info, dist.rank, dist.world, workers, max_bad, bar.update)
    if dist.main:
        wait_for(lambda: all((out / shard_name(i)).is_dir() for i in range(info.num_shards)))
        finish(out, max_bad)
    else:
        wait_for(lambda: CacheInfo.load(out).complete)
    return summarize(out)
