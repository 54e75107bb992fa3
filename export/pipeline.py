"""``ecm-export`` as a function: checkpoints in, a verified export folder out.

Layout of an export folder (every file written atomically; the manifest last, so a folder whose
export was interrupted has no manifest and is never taken for a valid one)::

    var_ecm.json            manifest (runtime/manifest.py): shapes per scale, defaults, hashes
    var_ecm.onnx            step graph: one scale of backbone + merged adapters + sampling
    var_ecm.control.onnx    control encoder (with ECM)
    var_ecm.decoder.onnx    VQVAE decoder -> uint8 image
    var_ecm.s<k>.onnx       fully static step graph of scale k (with --static-scales)
    var_ecm.verify.json     ONNX Runtime vs eager figures of this export
    golden/                 polygraphy inputs and ONNX Runtime outputs, to compare a TensorRT build
    var_ecm*.plan           TensorRT plans (built on the target GPU)
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn
from ecm.export.fold import fold_class_tables, fold_ecm_norms
from ecm.export.graphs import ControlGraph, DecoderGraph, StepGraph
from ecm.export.onnx_export import DEFAULT_OPSET, MAX_CANDIDATES, check_opset, export_graph
from ecm.export.precision import cast_matmuls
from ecm.export.tensorrt_ops import graph_problems
from ecm.export.verify import VerifyReport, verify_export
from ecm.runtime.errors import ConfigError, ECMError
from ecm.runtime.files import write_json
from ecm.runtime.manifest import CPU_FORM, MANIFEST_NAME, PRECISIONS, STEM, ControlSpec, Manifest, graph_file
from ecm.runtime.sampling import DEFAULT_CFG, DEFAULT_ECM_TEMPERATURE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

from ecm.model.adapters import ECM
from ecm.model.sampler import candidate_count
from ecm.model.var import VAR

VERIFY_NAME = f"{STEM}.verify.json"
VERIFY_BATCH = 4  # images compared with the eager model in every export
Progress = Callable[[str], None]
#: Rewrites the fp32 graphs of an unfinished export folder in place (INT8: calibrate and quantize).
Quantizer = Callable[[Path, Manifest, Progress], None]


@dataclass
class ExportOptions:
    """What ``ecm-export`` is asked for; the defaults are the CLI's."""

    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    batch: int = 1
    candidates: int | None = None  # default: the default top-k (or the vocabulary, if smaller)
    static_scales: bool = False
    verify: bool = True
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint role -> sha256


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    files: list[Path]
    report: VerifyReport | None


def make_manifest(var: VAR, ecm: ECM | None, opts: ExportOptions) -> Manifest:
    """The manifest of an export of ``var`` (+ ``ecm``) with ``opts``; checks the options."""
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
    control = None
    if ecm is not None:
        ecm.check_backbone(cfg)
        e = ecm.config
        control = ControlSpec(e.control, vcfg.resolution, e.canny_low, e.canny_high)
    roles = ["step", "decoder", *(["control"] if ecm is not None else []),
             *([f"step_s{si}" for si in range(len(cfg.patch_nums))] if opts.static_scales else [])]
    graphs = {role: graph_file(role) for role in roles}
    try:
        version = metadata.version("ecm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return Manifest(
        precision=opts.precision, patch_nums=tuple(cfg.patch_nums), vocab_size=V, num_classes=cfg.num_classes,
        image_size=vcfg.resolution, latent_channels=vcfg.z_channels, embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads, cache_layers=cfg.depth, **adapter_facts(ecm),
        num_phi=vcfg.share_quant_resi, batch=opts.batch, candidates=candidates, cfg=DEFAULT_CFG,
        top_k=min(DEFAULT_TOP_K, candidates), top_p=DEFAULT_TOP_P,
        temperature=DEFAULT_ECM_TEMPERATURE if ecm is not None else DEFAULT_TEMPERATURE, control=control,
        graphs=graphs, sources=dict(opts.sources), opset=opts.opset, ecm_version=version)


def adapter_facts(ecm: ECM | None) -> dict[str, int]:
    """The manifest's adapter fields: their cache layers, width and heads (zeros without adapters)."""
    if ecm is None:
        return {"adapter_layers": 0, "adapter_dim": 0, "adapter_heads": 0}
    e = ecm.config
    return {"adapter_layers": e.num_adapters, "adapter_dim": e.width, "adapter_heads": e.heads}


def deployable(var: VAR, ecm: ECM | None, precision: str,
               candidates: int) -> tuple[StepGraph, nn.Module | None, nn.Module]:
    """Copies of the three networks as they are exported: norms folded, precision applied.

    INT8 exports start from fp32 graphs (ONNX Runtime's quantizer rewrites those) and keep the
    AdaLN layers as linear layers, so their weights are quantized like every other linear layer
    instead of becoming fp32 tables as large as those weights.
    """
    var = copy.deepcopy(var).eval().float()
    var.attach_vae(copy.deepcopy(var.vae).eval().float())
    if precision != "int8":
        fold_class_tables(var, torch.float32 if precision == "fp32" else torch.float16)
    ecm = fold_ecm_norms(copy.deepcopy(ecm).eval().float()) if ecm is not None else None
    step = StepGraph(var, ecm, candidates)
    control = ControlGraph(ecm) if ecm is not None else None
    decoder = DecoderGraph(var.vae)
    if precision == "fp16":
        cast_matmuls(step, torch.float16, skip=("var.head",))
        cast_matmuls(decoder, torch.float16)
        if control is not None:
            cast_matmuls(control, torch.float16)
    return step, control, decoder


def export_model(var: VAR, ecm: ECM | None, out_dir: str | Path, opts: ExportOptions,
                 progress: Progress = print, quantize: Quantizer | None = None) -> ExportResult:
    """Export, verify with ONNX Runtime, save golden outputs; the folder is complete or untouched.

    ``quantize`` runs on the finished fp32 graphs before verification (``ecm.calibration``).
    """
    out_dir = Path(out_dir)
    m = make_manifest(var, ecm, opts)
    if (opts.precision == "int8") != (quantize is not None):
        raise ConfigError("an int8 export needs calibration: use ecm.calibration.export_int8 "
                          "(ecm-export --precision int8), which quantizes; other precisions take no quantizer")
    step, control, decoder = deployable(var, ecm, opts.precision, m.candidates)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ecm-export-", dir=out_dir))
    except OSError as e:
        raise ECMError(f"cannot write to {out_dir}: {e.strerror or e}; choose a writable --out folder") from None
    try:
        progress(f"exporting the step graph ({opts.precision}, opset {opts.opset}) ...")
        # traced at a middle scale and batch 2, so that no symbolic axis is specialised to 1
        export_graph(step, m.io("step", min(2, m.num_scales - 2), batch=2), tmp / m.graphs["step"], opts.opset)
        if opts.static_scales:
            for si in range(m.num_scales):
                progress(f"exporting the static step graph of scale {si} ...")
                export_graph(step, m.io("step", si), tmp / m.graphs[f"step_s{si}"], opts.opset, dynamic=False)
        if control is not None:
            progress("exporting the control encoder ...")
            export_graph(control, m.io("control", batch=2), tmp / m.graphs["control"], opts.opset)
        progress("exporting the decoder ...")
        export_graph(decoder, m.io("decoder", batch=2), tmp / m.graphs["decoder"], opts.opset)
        m.save(tmp)
        if quantize is not None:
            quantize(tmp, m, progress)
        for role, name in m.graphs.items():
            problems = [] if role.endswith(CPU_FORM) else graph_problems(tmp / name)
            if problems:
                raise ECMError(f"{name} would not parse in TensorRT: {'; '.join(problems[:3])}")
        report = None
        if opts.verify:
            progress("verifying with ONNX Runtime against the eager model ...")
            report = verify_export(tmp, var, ecm, batch=max(opts.batch, VERIFY_BATCH))
            write_json(report.to_dict(), tmp / VERIFY_NAME)
            progress(report.summary())
        from ecm.export.golden import save_golden

        progress("saving golden outputs (polygraphy, ONNX Runtime) ...")
        save_golden(tmp, m)
        files = _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, Manifest.load(out_dir), files, report)


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
