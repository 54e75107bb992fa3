"""Calibration data: real generation trajectories of the eager model, recorded once and reused.

A trajectory is what decides every step graph input of a generation: the labels, the condition,
the uniforms, and per scale the input latent and f_hat the eager (backbone + ECM) model produced.
Those are small and are what is kept on disk (``calibration.json`` + one ``batch_<n>.npz`` per
batch). The KV caches they imply are a thousand times larger, so :func:`step_feeds` rebuilds them
by teacher-forcing the fp32 graphs along the recorded trajectory: every scale's profile is then
calibrated with the caches, control tokens and latents it really sees.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from ecm.calibration.options import DEFAULT_BATCH, DEFAULT_SAMPLES
from ecm.export.verify import conditions, guided_argmax
from ecm.runtime.errors import ConfigError, ECMError
from ecm.runtime.files import write_json
from ecm.runtime.images import IMAGE_SUFFIXES, prepare_condition, read_image
from ecm.runtime.loop import Sampling, ScaleLoop, Trajectory
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend, Taps
from ecm.runtime.sampling import cfg_weight, draw_uniforms
from onnx import helper

from ecm.model.adapters import ControlMix
from ecm.model.checkpoint import tensor_hash
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR

META_NAME = "calibration.json"
FORMAT = 1
#: The graphs teacher forcing runs: it records logits and latents, and decodes nothing.
FORCED_ROLES = ("step", "control")
#: Procedural conditions for calibration: neither the training set (seed 0) nor the held-out one (1000).
CALIB_SEED = 2000
Bar = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class CalibrationMeta:
    """What a recorded calibration set was made from; a set is reused only for the same model."""

    model: str  # fingerprint of the weights (model_fingerprint)
    source: str  # 'procedural' or the condition folder
    samples: int
    batch: int
    sampling: dict[str, Any]
    format: int = FORMAT


def model_fingerprint(var: VAR, mix: ControlMix | None) -> str:
    """sha256 over every weight of the VQVAE, the VAR and the adapters (names, shapes, exact values)."""
    parts = {f"vae.{k}": v for k, v in var.vae.state_dict().items()}
    parts.update({f"var.{k}": v for k, v in var.state_dict().items()})
    parts.update({f"ecm.{k}": v for k, v in (mix.state_dict() if mix is not None else {}).items()})
    return tensor_hash(parts, exact=True, length=64)


def image_paths(folder: Path) -> list[Path]:
    """The condition images in a calibration folder, checked to exist (a ConfigError otherwise)."""
    if not folder.is_dir():
        raise ConfigError(f"calibration folder {folder} does not exist or is not a folder; pass a folder of "
                          "condition images, or leave --calib out to use the procedural set")
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise ConfigError(f"cannot list calibration folder {folder} ({e.strerror or e}); check its permissions") \
            from None
    if not paths:
        raise ConfigError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add "
                          "condition maps, or leave --calib out to use the procedural set")
    return paths


def check_source(source: Path | None) -> None:
    """Fail early on a calibration source that can be neither recorded data nor condition images."""
    if source is not None and not (source / META_NAME).is_file():
        image_paths(source)


def folder_conditions(folder: Path, m: Manifest, samples: int,
                      progress: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` condition maps from ``folder`` (as ``ecm-run --cond`` takes them), with labels.

    A folder of fewer maps is cycled: a map used again gets another class (and, like every sample,
    its own seed), so each sample is a different generation.
    """
    paths = image_paths(folder)
    if m.control is None:
        raise ConfigError("this export has no control adapters, so condition images mean nothing to it; "
                          "leave --calib out")
    maps, unreadable, not_maps = [], [], []
    for p in paths[:samples]:
        try:
            img = read_image(p)
        except ECMError:
            unreadable.append(p.name)
            continue
        try:
            maps.append(prepare_condition(img, m.control, source=p.name))
        except ECMError:
            not_maps.append(p.name)
    if unreadable:
        raise ConfigError(f"{len(unreadable)} calibration image(s) in {folder} cannot be read "
                          f"({', '.join(unreadable[:5])}); remove or replace them")
    if not_maps:
        raise ConfigError(f"{len(not_maps)} calibration image(s) in {folder} do not look like {m.control.type} maps "
                          f"({', '.join(not_maps[:5])}); pass condition maps, as ecm-run --cond takes them")
    n = len(maps)
    if n < samples:
        progress(f"{n} condition map(s) in {folder} for {samples} calibration samples: each is used up to "
                 f"{-(-samples // n)} times, with other seeds and classes")
    order = np.arange(samples)
    labels = (order + order // n) % m.num_classes
    return labels.astype(np.int64), np.stack(maps)[order % n]


@dataclass
class CalibrationSet:
    """A recorded calibration set on disk."""

    folder: Path
    meta: CalibrationMeta

    @property
    def batch_files(self) -> list[Path]:
        return sorted(self.folder.glob("batch_*.npz"))

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for path in self.batch_files:
            try:
                with np.load(path) as z:
                    yield dict(z)
            except (OSError, ValueError) as e:
                raise ECMError(f"calibration data {path} is damaged ({e}); delete {self.folder} to record it "
                               "again") from None

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> CalibrationSet:
        """A recorded set, checked to come from the model with ``fingerprint``."""
        try:
            d = json.loads((folder / META_NAME).read_text())
            meta = CalibrationMeta(**d)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read calibration data {folder / META_NAME} ({e}); delete {folder} to "
                              "record it again") from None
        if meta.format != FORMAT:
            raise ConfigError(f"calibration data in {folder} has format {meta.format}, this ecm reads {FORMAT}; "
                              f"delete {folder} to record it again")
        if meta.model != fingerprint:
            raise ConfigError(f"calibration data in {folder} was recorded with another model (weights "
                              f"{meta.model[:12]}, exporting {fingerprint[:12]}); pass condition images or "
                              "calibration data of this model")
        cset = cls(folder, meta)
        if len(cset.batch_files) != -(-meta.samples // meta.batch):
            raise ConfigError(f"calibration data in {folder} is incomplete; delete it to record it again")
        return cset


def record(var: VAR, mix: ControlMix | None, m: Manifest, labels_N: np.ndarray, cond_NHW3: np.ndarray | None,
           folder: Path, meta: CalibrationMeta, bar: Bar = iter) -> CalibrationSet:
    """Generate with the eager model and write every batch's trajectory into ``folder`` (made atomically)."""
    sampling = Sampling(**meta.sampling)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".calib-", dir=folder.parent))
    try:
        for n, b in enumerate(bar(range(0, len(labels_N), meta.batch))):
            label, cond = labels_N[b:b + meta.batch], None if cond_NHW3 is None else cond_NHW3[b:b + meta.batch]
            uniforms = draw_uniforms(CALIB_SEED + b, len(label), m.patch_nums)
            with torch.no_grad():
                gen = var.generate(torch.from_numpy(label), cfg=sampling.cfg, top_k=sampling.top_k,
                                   top_p=sampling.top_p, temperature=sampling.temperature, uniforms=uniforms, ecm=mix,
                                   control_B3HW=None if cond is None else to_model_range(cond),
                                   candidates=m.candidates, decode=False, trace=True)
            arrays = {"labels": label, **({"cond": cond} if cond is not None else {})}
            for si in range(m.num_scales):
                arrays[f"u{si}"] = uniforms[si]
                arrays[f"x{si}"] = gen.x_in[si].numpy()
                arrays[f"f{si}"] = gen.f_hat_in[si].numpy()
            np.savez(tmp / f"batch_{n:04d}.npz", **arrays)
        write_json(asdict(meta), tmp / META_NAME)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as e:
        raise ECMError(f"cannot write calibration data into {folder.parent} ({e.strerror or e}); free some space "
                       "or set XDG_CACHE_HOME to a writable place") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CalibrationSet(folder, meta)


def calibration_set(var: VAR, mix: ControlMix | None, m: Manifest, source: Path | None, cache: Path,
                    samples: int = DEFAULT_SAMPLES, batch: int = DEFAULT_BATCH, bar: Bar = iter,
                    progress: Callable[[str], None] = print) -> CalibrationSet:
    """The calibration set for this model and ``source``: recorded data given as ``source``, a cached
    recording, or a new one (conditions from the folder ``source``, else the procedural set)."""
    if samples < 1 or batch < 1:
        raise ConfigError(f"calibration needs at least one sample and a batch of one (got {samples}, {batch})")
    fingerprint = model_fingerprint(var, mix)
    if source is not None and (source / META_NAME).is_file():
        progress(f"calibration data: {source} (recorded earlier)")
        return CalibrationSet.load(source, fingerprint)
    sampling = Sampling.defaults(m)
    meta = CalibrationMeta(fingerprint, "procedural" if source is None else str(source.resolve()), samples,
                           min(batch, samples), asdict(sampling))
    if source is None:
        labels, cond = conditions(m, samples, seed=CALIB_SEED)
    else:
        labels, cond = folder_conditions(source, m, samples, progress)
        meta = CalibrationMeta(**{**asdict(meta), "samples": len(labels), "batch": min(batch, len(labels))})
    key = hashlib.sha256(json.dumps(asdict(meta), sort_keys=True).encode())
    if cond is not None:
        key.update(cond.tobytes())
    folder = cache / key.hexdigest()[:16]
    if (folder / META_NAME).is_file():
        try:
            cset = CalibrationSet.load(folder, fingerprint)
            progress(f"calibration data: {folder} (reused)")
            return cset
        except ConfigError:
            pass  # a damaged cache entry is recorded again
    progress(f"recording calibration data ({meta.samples} generations) into {folder} ...")
    return record(var, mix, m, labels, cond, folder, meta, bar)


def teacher_forced(cset: CalibrationSet, backend: OrtBackend, m: Manifest) -> Iterator[Trajectory]:
    """Every recorded generation run again through ``backend``'s graphs with the recorded inputs at every scale
    (teacher forcing): the KV caches fill as that generation filled them; logits recorded, nothing decoded.
    One generation at a time, whatever batches it was recorded in: the KV cache of one (d16: 0.18 GB)."""
    sampling = Sampling(**cset.meta.sampling)
    loop = ScaleLoop(m, backend, 1)
    K = m.num_scales
    for arrays in cset.batches():
        for j in range(len(arrays["labels"])):
            row = {key: value[j:j + 1] for key, value in arrays.items()}
            teacher = Trajectory(x_in=[row[f"x{si}"] for si in range(K)], f_hat_in=[row[f"f{si}"] for si in range(K)])
            yield loop.run(row["labels"], row.get("cond"), sampling, uniforms=[row[f"u{si}"] for si in range(K)],
                           teacher=teacher, record=True, decode=False)


def guided_top1(cset: CalibrationSet, traj: Trajectory, m: Manifest) -> list[np.ndarray]:
    """The top-1 token of the guided logits at every scale of a teacher-forced batch."""
    cfg = Sampling(**cset.meta.sampling).cfg
    return [guided_argmax(traj.logits[si], cfg_weight(cfg, si, m.num_scales)) for si in range(m.num_scales)]


@dataclass
class Calibration:
    """What one teacher-forced pass of the fp32 graphs over a calibration set measures."""

    absmax: dict[str, dict[str, np.ndarray]]  # graph role -> activation -> its largest magnitude per channel
    top1: list[list[np.ndarray]]  # per recorded generation, per scale: the fp32 step graph's guided top-1 tokens
    latents: list[np.ndarray]  # every generation's final f_hat (C, hw, hw): what the decoder is calibrated on


ABSMAX = "__absmax"  # suffix of a tapped activation's per-channel peak, reduced inside the graph


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tapped(folder: Path, graph: str, names: list[str]) -> Path:
    """The graph file ``graph`` with each activation of ``names`` reduced in the graph to its largest magnitude
    per channel (last axis) and added as the output ``name + ABSMAX``, written beside it (same weights): a run
    returns a vector per activation, not the activation (d16: kilobytes instead of gigabytes)."""
    model = onnx.load(str(folder / graph), load_external_data=False)
    axes = "__calibration_axes0"
    new_axes = default_opset(model) >= 18  # ReduceMax takes its axes as an input from opset 18
    if new_axes:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), axes))
    for t in names:
        flat, peak = f"{t}__abs2d", t + ABSMAX
        model.graph.node.extend([
            helper.make_node("Abs", [t], [f"{t}__abs"]),
            helper.make_node("Flatten", [f"{t}__abs"], [flat], axis=-1),
            helper.make_node("ReduceMax", [flat, axes], [peak], keepdims=0) if new_axes
            else helper.make_node("ReduceMax", [flat], [peak], keepdims=0, axes=[0])])
        model.graph.output.append(helper.make_empty_tensor_value_info(peak))
    path = folder / f"tapped.{graph}"
    onnx.save(model, str(path))
    return path


def calibrate(cset: CalibrationSet, fp32_folder: Path, m: Manifest, activations: dict[str, list[str]]) -> Calibration:
    """Teacher-force the fp32 graphs in ``fp32_folder`` along every recorded trajectory, in one pass and one
    ONNX Runtime session per graph: the largest magnitude of every channel of the ``activations`` of each
    graph role, the step graph's guided top-1 tokens (what the INT8 graphs are held to), and the final
    latents."""
    absmax: dict[str, dict[str, np.ndarray]] = {role: {} for role in activations}

    def seen_in(role: str) -> Callable[[str, np.ndarray], None]:
        def seen(name: str, peak: np.ndarray) -> None:
            name = name.removesuffix(ABSMAX)
            absmax[role][name] = np.maximum(absmax[role][name], peak) if name in absmax[role] else peak

        return seen

    taps = [Taps(role, tapped(fp32_folder, m.graphs[role], names), [t + ABSMAX for t in names], seen_in(role))
            for role, names in activations.items() if names]
    top1, latents = [], []
    try:
        with OrtBackend(fp32_folder, m, taps=taps, roles=FORCED_ROLES) as backend:
            for traj in teacher_forced(cset, backend, m):
                top1.append(guided_top1(cset, traj, m))
                latents += list(traj.f_hat)
    finally:
        for t in taps:
            t.graph.unlink(missing_ok=True)
    return Calibration(absmax, top1, latents)


def teacher_agreement(cset: CalibrationSet, fp32_folder: Path, m: Manifest, step: Path,
                      reference: list[list[np.ndarray]]) -> list[float]:
    """Per scale, how often the step graph ``step`` (run with the rest of the fp32 export, its own KV caches
    filled by teacher forcing) picks the guided top-1 token the fp32 graphs picked (``reference``)."""
    same, total = np.zeros(m.num_scales), np.zeros(m.num_scales)
    with OrtBackend(fp32_folder, m, files={"step": step}, roles=FORCED_ROLES) as backend:
        for want, traj in zip(reference, teacher_forced(cset, backend, m)):
            for si, got in enumerate(guided_top1(cset, traj, m)):
                same[si] += np.sum(got == want[si])
                total[si] += got.size
    return (same / np.maximum(total, 1)).tolist()
