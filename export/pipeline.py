"""``ecm-export`` as a function: checkpoints in, a verified export folder out.

Layout of an export folder (every file written atomically; the manifest last, so a folder whose
export was interrupted has no manifest and is never taken for a valid one)::

    var_ecm.json            manifest (runtime/manifest.py): shapes per scale, defaults, hashes
    var_ecm.onnx            step graph: one scale of backbone + merged adapters + sampling
    var_ecm.control.onnx    control encoder of the first control (var_ecm.control1.onnx of the second, ...)
    var_ecm.encoder.onnx    VQVAE encoder + multi-scale quantizer: a known image's tokens (inpainting)
    var_ecm.decoder.onnx    VQVAE decoder -> uint8 image
    var_ecm.s<k>.onnx       fully static step graph of scale k (with --static-scales)
    var_ecm.verify.json     ONNX Runtime vs eager figures of this export
    golden/                 polygraphy inputs and ONNX Runtime outputs, to compare a TensorRT build
    var_ecm*.plan           TensorRT plans (built on the target GPU)
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
from ecm.export.fold import fold_class_tables, fold_ecm_norms
from ecm.export.graphs import ControlGraph, DecoderGraph, EncoderGraph, StepGraph
from ecm.export.memory_plan import decoder_feature_elements, memory_plan
from ecm.export.onnx_export import DEFAULT_OPSET, MAX_CANDIDATES, check_opset, export_graph
from ecm.export.precision import cast_matmuls
from ecm.export.tensorrt_ops import graph_problems
from ecm.export.verify import VerifyReport, eager_reference, preview_table, verify_export
from ecm.runtime.errors import ConfigError, ECMError
from ecm.runtime.files import file_sha256, write_json
from ecm.runtime.manifest import (
    CPU_FORM,
    MANIFEST_NAME,
    PRECISIONS,
    STEM,
    ControlSpec,
    Manifest,
    control_role,
    graph_file,
)
from ecm.runtime.memory import graph_bytes, return_freed_memory, trim_heap
from ecm.runtime.sampling import DEFAULT_CFG, DEFAULT_ECM_TEMPERATURE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

from ecm.model.adapters import ECM, ControlMix, as_mix, load_ecm
from ecm.model.embedded import default_ecm_paths, default_paths, load_backbone
from ecm.model.sampler import candidate_count
from ecm.model.var import VAR

VERIFY_NAME = f"{STEM}.verify.json"
VERIFY_BATCH = 4  # images compared with the eager model in every export
Progress = Callable[[str], None]


class ModelSource(Protocol):
    """Where an export's eager models come from. The export consumes what :meth:`load` hands out: it takes
    everything it needs of the eager models first, then turns them into their deployable form in place."""

    def load(self) -> tuple[VAR, ControlMix | None]: ...

    def sources(self) -> dict[str, str]:
        """Checkpoint role -> sha256 of its file, for the manifest (empty for models that have none)."""
        ...


@dataclass
class Models:
    """Models in memory: each load hands out copies, so the caller's stay as they are. One ECM is a mix of one."""

    var: VAR
    mix: ControlMix | ECM | None = None

    def __post_init__(self) -> None:
        self.mix = as_mix(self.mix)

    def load(self) -> tuple[VAR, ControlMix | None]:
        return copy.deepcopy(self.var), copy.deepcopy(self.mix)  # the VAR's VQVAE is copied with it

    def sources(self) -> dict[str, str]:
        return {}


@dataclass
class Checkpoints:
    """Checkpoint files (None, no adapters: the embedded default's), read one tensor at a time by each load."""

    vae: Path | None = None
    var: Path | None = None
    ecms: tuple[Path, ...] = ()  # adapter sets merged into one step graph, in order
    with_ecm: bool = True

    def adapter_files(self) -> tuple[Path, ...]:
        return (self.ecms or default_ecm_paths()) if self.with_ecm else ()

    def load(self) -> tuple[VAR, ControlMix | None]:
        _, var = load_backbone(self.vae, self.var)
        ecms = [load_ecm(path, var)[0] for path in self.adapter_files()]
        return var, ControlMix(ecms) if ecms else None

    def sources(self) -> dict[str, str]:
        vae, var = default_paths()[:2]
        files = {"vqvae": self.vae or vae, "var": self.var or var}
        files.update({"ecm" if k == 0 else f"ecm{k}": path for k, path in enumerate(self.adapter_files())})
        return {role: file_sha256(path) for role, path in files.items()}


class Quantizer(Protocol):
    """What an INT8 export adds (``ecm.calibration``): work with the eager models before they become the
    deployable ones, then the rewrite of the exported fp32 graphs."""

    def record(self, var: VAR, mix: ControlMix | None, m: Manifest, progress: Progress) -> None:
        """Everything the eager models are needed for (calibration generations, report references)."""
        ...

    def apply(self, folder: Path, m: Manifest, progress: Progress) -> VerifyReport | None:
        """Quantize the fp32 graphs of the unfinished export in ``folder``; ``m`` gains the forms it writes.
        Returns the comparison of the graphs a CPU runs with the eager models, where it made one: the
        export's verification then."""
        ...


@dataclass
class ExportOptions:
    """What ``ecm-export`` is asked for; the defaults are the CLI's."""

    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    batch: int = 1
    candidates: int | None = None  # default: the default top-k (or the vocabulary, if smaller)
    static_scales: bool = False
    verify: bool = True


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    files: list[Path]
    report: VerifyReport | None


def make_manifest(var: VAR, mix: ControlMix | ECM | None, opts: ExportOptions,
                  sources: dict[str, str] | None = None) -> Manifest:
    """The manifest of an export of ``var`` (+ the adapter sets of ``mix``, loaded from the files with ``sources``)
    with ``opts``; checks the options."""
    mix = as_mix(mix)
    if opts.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}")
    check_opset(opts.opset)
    cfg, vcfg = var.config, var.vae.config
    V = cfg.vocab_size
    candidates = opts.candidates or candidate_count(DEFAULT_TOP_K, V)
    if not 1 <= candidates <= min(V, MAX_CANDIDATES):
        raise ConfigError(f"--candidates {candidates} must lie in 1..{min(V, MAX_CANDIDATES)} "
                          f"(the vocabulary has {V} tokens; TensorRT's TopK sorts at most {MAX_CANDIDATES})")
    if opts.batch < 1:
        raise ConfigError(f"--batch must be at least 1, not {opts.batch}")
    ecms = mix.ecms if mix is not None else []
    for ecm in ecms:
        ecm.check_backbone(cfg)
    controls = [ControlSpec(e.config.control, vcfg.resolution, e.config.canny_low, e.config.canny_high) for e in ecms]
    roles = ["step", "encoder", "decoder", *(control_role(k) for k in range(len(ecms))),
             *([f"step_s{si}" for si in range(len(cfg.patch_nums))] if opts.static_scales else [])]
    graphs = {role: graph_file(role) for role in roles}
    try:
        version = metadata.version("ecm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return Manifest(
        precision=opts.precision, patch_nums=tuple(cfg.patch_nums), vocab_size=V, num_classes=cfg.num_classes,
        image_size=vcfg.resolution, latent_channels=vcfg.z_channels, embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads, cache_layers=cfg.depth, **adapter_facts(mix),
        num_phi=vcfg.share_quant_resi, batch=opts.batch, candidates=candidates, cfg=DEFAULT_CFG,
        top_k=min(DEFAULT_TOP_K, candidates), top_p=DEFAULT_TOP_P,
        temperature=DEFAULT_ECM_TEMPERATURE if ecms else DEFAULT_TEMPERATURE, controls=controls,
        graphs=graphs, sources=dict(sources or {}), opset=opts.opset, ecm_version=version)


def adapter_facts(mix: ControlMix | None) -> dict[str, int]:
    """The manifest's adapter fields: their (shared) cache's layers, width and heads (zeros without adapters)."""
    if mix is None:
        return {"adapter_layers": 0, "adapter_dim": 0, "adapter_heads": 0}
    e = mix.ecms[0].config
    return {"adapter_layers": mix.num_layers, "adapter_dim": e.width, "adapter_heads": e.heads}


class Deployable(NamedTuple):
    """The networks as they are exported."""

    step: StepGraph
    controls: list[ControlGraph]  # one per control, in the step graph's order
    encoder: EncoderGraph
    decoder: DecoderGraph


def _without(module: nn.Module, *names: str) -> nn.Module:
    """A shallow copy of ``module`` without the named sub-modules (the original keeps them)."""
    part = copy.copy(module)
    part._modules = {k: None if k in names else v for k, v in module._modules.items()}
    return part


def deployable(var: VAR, mix: ControlMix | None, precision: str, candidates: int) -> Deployable:
    """The networks as they are exported, made from ``var`` and ``mix`` in place: norms folded, precision
    applied. Layer by layer, so that no second copy of the weights is ever whole: the models are consumed.

    INT8 exports start from fp32 graphs (the quantizer rewrites those) and keep the AdaLN layers as
    linear layers, so their weights are quantized like every other linear layer instead of becoming
    fp32 tables as large as those weights. The image encoder's convolutions follow fp16 like the decoder's;
    its nearest-code search stays fp32 in every precision, and INT8 exports keep it fp32 whole.
    """
    var, vae = var.eval().float(), var.vae.eval().float()
    if precision != "int8":
        fold_class_tables(var, torch.float32 if precision == "fp32" else torch.float16)
    if mix is not None:
        mix = ControlMix([fold_ecm_norms(e.eval().float()) for e in mix.ecms])
    graphs = Deployable(StepGraph(var, mix, candidates), [ControlGraph(e) for e in (mix.ecms if mix else [])],
                        EncoderGraph(_without(vae, "decoder", "post_quant_conv")),
                        DecoderGraph(_without(vae, "encoder", "quant_conv")))
    if precision == "fp16":
        cast_matmuls(graphs.step, torch.float16, skip=("var.head",))
        cast_matmuls(graphs.decoder, torch.float16)
        cast_matmuls(graphs.encoder, torch.float16)
        for control in graphs.controls:
            cast_matmuls(control, torch.float16)
    return graphs


def export_model(source: ModelSource, out_dir: str | Path, opts: ExportOptions, progress: Progress = print,
                 quantizer: Quantizer | None = None) -> ExportResult:
    """Export, verify with ONNX Runtime, save golden outputs; the folder is complete or untouched.

    In bounded memory: the eager models of ``source`` first make what needs them (the verification's
    reference generations, the ``quantizer``'s recordings), then become the deployable graphs in
    place, are exported and freed; only then does ONNX Runtime load anything. ``quantizer`` rewrites
    the fp32 graphs of an INT8 export before verification (``ecm.calibration``).
    """
    out_dir = Path(out_dir)
    return_freed_memory()  # a freed fp32 layer goes back to the OS, not into a heap that keeps it
    if (opts.precision == "int8") != (quantizer is not None):
        raise ConfigError("an int8 export needs calibration: use ecm.calibration.export_int8 "
                          "(ecm-export --precision int8), which quantizes; other precisions take no quantizer")
    var, mix = source.load()
    m = make_manifest(var, mix, opts, source.sources())
    decoder_elements = decoder_feature_elements(var.vae.config)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ecm-export-", dir=out_dir))
    except OSError as e:
        raise ECMError(f"cannot write to {out_dir}: {e.strerror or e}; choose a writable --out folder") from None
    try:
        reference = None
        if opts.verify and quantizer is None:
            progress("generating the eager model's reference images ...")
            reference = eager_reference(var, mix, m, max(opts.batch, VERIFY_BATCH))
        if quantizer is not None:
            quantizer.record(var, mix, m, progress)
        graphs = deployable(var, mix, opts.precision, m.candidates)
        del var, mix  # the graphs hold what is left of them
        export_graphs(graphs, m, tmp, opts, progress)
        del graphs
        gc.collect()
        trim_heap()
        m.save(tmp)
        checked = quantizer.apply(tmp, m, progress) if quantizer is not None else None
        for role, name in m.graphs.items():
            problems = [] if role.endswith(CPU_FORM) else graph_problems(tmp / name)
            if problems:
                raise ECMError(f"{name} would not parse in TensorRT: {'; '.join(problems[:3])}")
        plan = memory_plan(m, graph_bytes(tmp, m, cpu=False), decoder_elements)
        m.memory = plan.to_dict()
        if reference is not None:
            m.preview = preview_table(reference)
        m.save(tmp)
        report = checked if opts.verify else None
        if reference is not None:
            progress("verifying with ONNX Runtime against the eager model ...")
            report = verify_export(tmp, reference)
        if report is not None:
            write_json(report.to_dict(), tmp / VERIFY_NAME)
            progress(report.summary())
        from ecm.export.golden import save_golden

        progress("saving golden outputs (polygraphy, ONNX Runtime) ...")
        save_golden(tmp, m)
        files = _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in plan.lines():
        progress(line)
    return ExportResult(out_dir, Manifest.load(out_dir), files, report)


def export_graphs(graphs: Deployable, m: Manifest, folder: Path, opts: ExportOptions, progress: Progress) -> None:
    """Trace the deployable networks into the ONNX files ``m`` names, in ``folder``."""
    progress(f"exporting the step graph ({opts.precision}, opset {opts.opset}) ...")
    # traced at a middle scale and batch 2, so that no symbolic axis is specialised to 1
    export_graph(graphs.step, m.io("step", min(2, m.num_scales - 2), batch=2), folder / m.graphs["step"], opts.opset)
    if opts.static_scales:
        for si in range(m.num_scales):
            progress(f"exporting the static step graph of scale {si} ...")
            export_graph(graphs.step, m.io("step", si), folder / m.graphs[f"step_s{si}"], opts.opset, dynamic=False)
    for k, control in enumerate(graphs.controls):
        progress(f"exporting the {m.controls[k].type} control encoder ...")
        role = control_role(k)
        export_graph(control, m.io(role, batch=2), folder / m.graphs[role], opts.opset)
    progress("exporting the image encoder (inpainting) ...")
    export_graph(graphs.encoder, m.io("encoder", batch=2), folder / m.graphs["encoder"], opts.opset)
    progress("exporting the decoder ...")
    export_graph(graphs.decoder, m.io("decoder", batch=2), folder / m.graphs["decoder"], opts.opset)


def _commit(tmp: Path, out_dir: Path) -> list[Path]:
    """Move a finished export into place: old manifest out first, new manifest in last, then the files of
    an earlier export that this one does not hold (graphs, plans, reports, golden data) go."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    moved = []
    try:
        for src in sorted(tmp.rglob("*")):
            if src.is_dir() or src.name == MANIFEST_NAME:
                continue
            dst = out_dir / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(dst)
        os.replace(tmp / MANIFEST_NAME, out_dir / MANIFEST_NAME)
        stale = {*out_dir.glob(f"{STEM}*"), *out_dir.glob("golden/*")} - {*moved, out_dir / MANIFEST_NAME}
        for path in stale:
            if path.is_file():
                path.unlink()
    except OSError as e:
        raise ECMError(f"cannot write the export into {out_dir}: {e.strerror or e}; "
                       "free some space or choose another --out folder") from None
    return [*moved, out_dir / MANIFEST_NAME]
