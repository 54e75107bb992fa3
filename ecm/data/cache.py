"""Training caches: an image folder tokenized once (``ecm-prepare``), read back memory-mapped.

A cache is a folder::

    cache.json       what it was made from and for (its key), the classes, shard size, map format
    files.txt        the source images, sorted: label, a tab, the path relative to the source folder
    shard-00000/     images [0, S) of files.txt that could be read:
        tokens.npy   (n, L) the frozen VQVAE's tokens of every scale, int16 when the codebook fits
        labels.npy   (n,) class indices
        maps.npy     (n, ...) control maps: packed bits (binary controls), grey or RGB uint8
        items.npy    (n,) line numbers in files.txt
        bad.txt      the images of the shard that could not be read, with the reason
    bad.txt          every unreadable image, written when the last shard is in

A shard is written in a hidden folder beside its place and renamed into it, so a shard folder
is whole or absent, never half; ``cache.json`` says ``complete`` once every shard is in.
NumPy only: training, evaluation and benchmarks read caches without the preparing stack.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ecm.runtime.errors import ECMError, first_line
from ecm.runtime.files import write_json
from ecm.runtime.scales import total_tokens

CACHE_FILE = "cache.json"
FILES = "files.txt"
BAD = "bad.txt"
ARRAYS = ("tokens", "labels", "maps", "items")
FORMAT_VERSION = 1
#: How the cache's text files are encoded: any file name survives, even one that is not UTF-8.
TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}
#: How control maps are stored: one bit per pixel for binary controls, else a byte per pixel or three.
MAP_FORMATS = ("bits", "grey", "rgb")


def is_cache(folder: Path) -> bool:
    """Whether ``folder`` is a cache (complete or not) rather than a folder of images."""
    return (Path(folder) / CACHE_FILE).is_file()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def index_dtype(n: int) -> np.dtype:
    """The smallest signed integer type that holds 0 .. n-1 (int16 for a 4096-code vocabulary)."""
    return np.dtype(np.int16 if n <= 2**15 else np.int32)


@dataclass(frozen=True)
class CacheKey:
    """What a cache's contents depend on: a cache is used only where all of it matches."""

    vqvae: str  # content hash of the VQVAE's weights (ecm.model.checkpoint.tensor_hash)
    resolution: int
    patch_nums: tuple[int, ...]
    control: str
    canny: tuple[int, int] | None = None  # thresholds, for the canny control

    @property
    def num_tokens(self) -> int:
        """L, the tokens of one image over every scale."""
        return total_tokens(self.patch_nums)

    def differences(self, other: CacheKey) -> list[str]:
        """'field mine -> theirs' for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {_shown(mine[k])} -> {_shown(theirs[k])}" for k in mine if _shown(mine[k]) != _shown(theirs[k])]


def _shown(v: object) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


@dataclass
class CacheInfo:
    """The contents of ``cache.json``."""

    key: CacheKey
    classes: list[str]
    num_files: int
    shard_size: int
    map_format: str
    token_dtype: str
    source: str
    complete: bool = False
    num_images: int = 0  # images in the shards (num_files less the unreadable ones), once complete
    num_bad: int = 0
    version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_files // self.shard_size)

    def save(self, folder: Path) -> None:
        write_json(asdict(self), Path(folder) / CACHE_FILE)

    @classmethod
    def load(cls, folder: Path) -> CacheInfo:
        path = Path(folder) / CACHE_FILE
        if not path.is_file():
            raise ECMError(f"{folder} is not a training cache (no {CACHE_FILE}); make one with ecm-prepare")
        try:
            d = json.loads(path.read_text())
            if d.get("version") != FORMAT_VERSION:
                raise ECMError(f"{path} has cache format {d.get('version')}, this ecm reads {FORMAT_VERSION}; "
                               "make the cache again with this ecm-prepare")
            k = d.pop("key")
            key = CacheKey(k["vqvae"], int(k["resolution"]), tuple(k["patch_nums"]), k["control"],
                           tuple(k["canny"]) if k.get("canny") else None)
            return cls(key=key, **d)
        except ECMError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ECMError(f"{path} is damaged ({first_line(e, 80)}); delete the cache and run ecm-prepare again") \
                from None


# ------------------------------------------------------------------------------------ control maps
def pack_maps(maps_NHW3: np.ndarray, fmt: str) -> np.ndarray:
    """Control maps (N, H, W, 3) uint8 in the cache's storage form."""
    if fmt == "bits":
        N, H, W = maps_NHW3.shape[:3]
        return np.packbits(maps_NHW3[..., 0].reshape(N, H * W) > 0, axis=1)
    if fmt == "grey":
        return np.ascontiguousarray(maps_NHW3[..., 0])
    return np.ascontiguousarray(maps_NHW3)


def unpack_maps(stored: np.ndarray, fmt: str, resolution: int) -> np.ndarray:
    """The inverse of :func:`pack_maps`: (N, H, W, 3) uint8 (binary maps as 0 / 255)."""
    if fmt == "bits":
        grey = np.unpackbits(stored, axis=1, count=resolution * resolution).reshape(-1, resolution, resolution) * 255
    elif fmt == "grey":
        grey = np.asarray(stored)
    else:
        return np.asarray(stored)
    return np.repeat(grey[..., None], 3, axis=-1)


def map_bytes(fmt: str, resolution: int) -> int:
    """Bytes one control map takes in the cache."""
    return {"bits": resolution * resolution // 8, "grey": resolution**2, "rgb": 3 * resolution**2}[fmt]


# ------------------------------------------------------------------------------------ reading
@dataclass
class CacheBatch:
    """Samples read from a cache, in the order asked for."""

    tokens_BL: np.ndarray  # the first ``num_tokens`` tokens of each, int16 / int32
    labels_B: np.ndarray  # int64
    maps_BHW3: np.ndarray  # uint8
    items_B: np.ndarray  # line numbers in files.txt


class TokenCache:
    """A complete cache, read memory-mapped: only the rows a batch asks for are touched.

    ``expect``: the key the reader needs; a cache made for anything else is refused in one line.
    At most ``max_open`` shards stay mapped (each mapping holds a file descriptor, and ImageNet
    has some 1 250 shards of four arrays): the least recently read are closed first.
    """

    max_open = 64

    def __init__(self, folder: str | Path, expect: CacheKey | None = None):
        self.folder = Path(folder)
        self.info = info = CacheInfo.load(self.folder)
        if not info.complete:
            done = sum((self.folder / shard_name(i)).is_dir() for i in range(info.num_shards))
            raise ECMError(f"the cache {self.folder} is unfinished ({done} of {info.num_shards} shards); run the "
                           "same ecm-prepare command again to finish it")
        if expect is not None and expect != info.key:
            changed = ", ".join(info.key.differences(expect))
            raise ECMError(f"the cache {self.folder} was made for another setting ({changed}); "
                           "make a cache for this one with ecm-prepare into another --out")
        counts = []
        for i in range(info.num_shards):
            try:
                counts.append(int(np.load(self.folder / shard_name(i) / "labels.npy", mmap_mode="r").shape[0]))
            except (OSError, ValueError) as e:
                raise ECMError(f"shard {i} of the cache {self.folder} cannot be read ({first_line(e, 80)}); delete "
                               f"{self.folder / shard_name(i)} and run the same ecm-prepare command again") from None
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_open": OrderedDict()}

    @property
    def resolution(self) -> int:
        return self.info.key.resolution

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s in self._open:
            self._open.move_to_end(s)
        else:
            if len(self._open) >= self.max_open:
                self._open.popitem(last=False)  # its memory maps close once no batch refers to them
            self._open[s] = {a: np.load(self.folder / shard_name(s) / f"{a}.npy", mmap_mode="r") for a in ARRAYS}
        return self._open[s]

    def read(self, idx: np.ndarray, num_tokens: int | None = None) -> CacheBatch:
        """Samples ``idx`` (0 .. len-1), tokens cut to the first ``num_tokens`` (all when None)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0 or (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices must be a non-empty set in 0 .. {len(self) - 1}")
        shard_B = np.searchsorted(self.starts, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard_B):
            where = np.flatnonzero(shard_B == s)
            rows = idx[where] - self.starts[s]
            order = np.argsort(rows, kind="stable")  # each shard read front to back
            arrays = self._shard(int(s))
            for a in ARRAYS:
                got = (arrays[a][:, :num_tokens] if a == "tokens" else arrays[a])[rows[order]]
                if a not in out:
                    out[a] = np.empty((len(idx), *got.shape[1:]), got.dtype)
                out[a][where[order]] = got
        return CacheBatch(out["tokens"], out["labels"].astype(np.int64),
                          unpack_maps(out["maps"], self.info.map_format, self.resolution), out["items"])

    def source_files(self) -> list[str]:
        """Paths of the source images relative to ``info.source``, by line of files.txt."""
        return [line.split("\t", 1)[1] for line in (self.folder / FILES).read_text(**TEXT).splitlines()]
