"""``ecm-bench``: the speed and size figures of generation, side by side in one run.

For the embedded default model and a random-weight d16-proportioned one (``ecm.bench.models``), and
on request official-shaped random-weight stand-ins of VAR-d16..d30 (``--models d16,d30``):
seconds per image (batch 1) of eager PyTorch and of ONNX Runtime on the fp32, fp16 and INT8 (CPU
form) exports, and of TensorRT's fp16 and INT8 plans where TensorRT and a GPU are present, taking
turns in rounds (``ecm.bench.timing``); the peak memory of each in a fresh process; the adapters'
overhead (ONNX Runtime fp32 with vs without them); the KV cache's bytes per scale; the analytic
floor of an image (``ecm.bench.roofline``) and every measured time as a multiple of it; and the cost of an
ECM training iteration, early-centric vs full (``ecm.bench.train_cost``). Prints tables, and writes the
figures as JSON and a PNG chart.

A stand-in is written as checkpoint files and exported by ``ecm-export`` with its defaults, one
precision at a time in a process of its own, so each export's wall time and peak RSS are what a
user's would be; every ONNX Runtime row also gives the decoder's share of an image, and its peak
memory against the weights + KV cache it must hold. Stand-ins whose fp32 weights pass a quarter
of this machine's memory (d30) are measured at fp16 and INT8 only.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecm.bench.memory import probe_memory
from ecm.bench.models import OFFICIAL, load_model, official_standin, write_standin
from ecm.bench.roofline import Floor, image_floors, matmul_gflops, memory_gbps
from ecm.bench.timing import alternate, condition, images_per_round
from ecm.bench.train_cost import cost_lines, iteration_cost
from ecm.calibration import CalibOptions, export_int8
from ecm.export.pipeline import Checkpoints, ExportOptions, Models, export_model
from ecm.export.tensorrt import build_plans, missing_tensorrt
from ecm.model.adapters import ECM
from ecm.model.pixels import to_model_range
from ecm.model.var import VAR
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend

#: The exports each model is measured on: folder name -> (precision, with adapters).
EXPORTS = {"int8": ("int8", True), "fp16": ("fp16", True), "fp32": ("fp32", True),
           "fp32-backbone": ("fp32", False)}
#: The official-shaped stand-ins' exports, by ecm-export with its defaults; the large ones skip fp32.
OFFICIAL_EXPORTS, LARGE_EXPORTS = ("fp32", "fp16", "int8"), ("fp16", "int8")
LARGE_SHARE = 0.25  # of this machine's memory: fp32 weights above it make a stand-in large
EAGER, ORT32, NO_ADAPTERS = "eager PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime fp32, no adapters"
ORT_LABELS = {"fp32": ORT32, "fp16": "ONNX Runtime fp16", "int8": "ONNX Runtime int8 (CPU form)"}
TITLES = {"default": "embedded default", "d16-4": "d16-proportioned, 4 blocks (random weights)",
          **{name: f"official-shaped {name} + ECM base (random weights)" for name in OFFICIAL}}


@functools.cache
def _model(name: str) -> tuple[VAR, ECM]:
    return load_model(name)


def export_one(name: str, folder_name: str, out: Path, report_images: int) -> str:
    """Export model ``name`` as EXPORTS[folder_name] into ``out``; returns what was done, timed."""
    start = time.perf_counter()
    var, ecm = _model(name)
    precision, adapters = EXPORTS[folder_name]
    quiet = lambda _: None  # noqa: E731
    if precision == "int8":  # weight-only Q/DQ needs no calibration recording; the CPU form is what is timed
        calib = CalibOptions(activations="fp16", report_images=report_images)
        export_int8(Models(var, ecm), out, ExportOptions(verify=False), calib, quiet)
    else:
        export_model(Models(var, ecm if adapters else None), out, ExportOptions(precision=precision, verify=False),
                     quiet)
    return f"{name} {folder_name} exported ({time.perf_counter() - start:.0f} s)"


def _export_worker() -> None:
    torch.set_num_threads(1)  # exports are mostly single-threaded tracing; the workers share the cores


def export_all(names: list[str], work: Path, jobs: int, report_images: int,
               log: Callable[[str], None]) -> dict[str, dict[str, Path]]:
    """Every export of every model, ``jobs`` at a time in fresh processes (in this one with 1)."""
    folders = {name: {f: work / name / f for f in EXPORTS} for name in names}
    todo = [(name, f, out, report_images) for name in names for f, out in folders[name].items()]
    if not todo:
        return folders
    log(f"exporting {len(todo)} ONNX folders ({jobs} at a time) ...")
    if jobs <= 1:
        for job in todo:
            log(export_one(*job))
        return folders
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_export_worker) as pool:
        for done in as_completed([pool.submit(export_one, *job) for job in todo]):
            log(done.result())
    return folders


def tensorrt_plans(folders: dict[str, Path], log: Callable[[str], None]) -> str | None:
    """Build the fp16 and INT8 plans where TensorRT and a GPU are present; else why not."""
    reason = missing_tensorrt()
    if reason is None:
        for key in ("fp16", "int8"):
            log(f"building TensorRT plans of {folders[key]} ...")
            build_plans(folders[key], progress=lambda _: None)
    return reason


def eager_generation(var: VAR, ecm: ECM | None, m: Manifest) -> Callable[[], None]:
    """One eager image of class 1 on the fixed condition, sorting as many candidates as the export ``m``."""
    ctrl = to_model_range(condition(m))

    def eager() -> None:
        with torch.no_grad():
            var.generate([1], ecm=ecm, control_B3HW=ctrl, seed=0, candidates=m.candidates)

    return eager


def runtime_generation(folder: Path, m: Manifest, backend: Any = None, adapters: bool = True) -> Callable[[], Any]:
    """One image of class 1 from the export in ``folder``, sampled as the export ``m`` with adapters samples
    (so a backbone-only export draws the same images but for the control)."""
    mf = Manifest.load(folder)
    loop = ScaleLoop(mf, backend or OrtBackend(folder, mf), 1)
    s, label, cond = Sampling.defaults(mf, temperature=m.temperature), np.array([1]), condition(m)
    return lambda: loop.run(label, cond if adapters else None, s, seed=0)


def runners(var: VAR | None, ecm: ECM | None, folders: dict[str, Path],
            with_trt: bool) -> dict[str, tuple[str, str, Callable]]:
    """Label -> (backend, precision, generate one image) for every backend measured: eager PyTorch (given the
    models), ONNX Runtime on each export in ``folders``, TensorRT, and the backbone alone (if exported)."""
    m = Manifest.load(folders["fp16"])
    out = {EAGER: ("eager", "fp32", eager_generation(var, ecm, m))} if var is not None else {}
    out.update({label: ("onnxruntime", key, runtime_generation(folders[key], m))
                for key, label in ORT_LABELS.items() if key in folders})
    if with_trt:
        from ecm.runtime.trt_backend import TrtBackend

        for key in ("fp16", "int8"):
            out[f"TensorRT {key}"] = ("tensorrt", key, runtime_generation(folders[key], m, TrtBackend(folders[key])))
    if "fp32-backbone" in folders:
        out[NO_ADAPTERS] = ("onnxruntime", "fp32", runtime_generation(folders["fp32-backbone"], m, adapters=False))
    return out


def decoder_share(folder: Path, m: Manifest) -> float:
    """The decoder's share of one image's graph time (ONNX Runtime on the CPU, the export in ``folder``)."""
    mf = Manifest.load(folder)
    loop = ScaleLoop(mf, OrtBackend(folder, mf), 1)
    s, label, cond = Sampling.defaults(mf, temperature=m.temperature), np.array([1]), condition(m)
    seconds = loop.run(label, cond, s, seed=0, timed=True).seconds
    return seconds["decoder"] / sum(seconds.values())


def timed_export(source: Checkpoints, precision: str, out: Path, cache: Path) -> dict[str, float]:
    """``ecm-export`` of ``source`` at ``precision`` with its defaults, in a process of its own (INT8 records
    its calibration data afresh under ``cache``): wall seconds and peak RSS (MiB). Its output goes to
    ``<out>.log``."""
    args = ["--vae", source.vae, "--var", source.var, *(a for path in source.ecms for a in ("--ecm", path)),
            "--precision", precision, "--out", out]
    log = out.with_name(out.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "from ecm.cli.export import main; main()", *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, which Popen.wait would not give
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"ecm-export --precision {precision} failed: {log.read_text()[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024}


def standin_exports(name: str, work: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, dict[str, float]]]:
    """Write the official-shaped stand-in ``name`` as checkpoint files, export it at each precision it is
    measured at; returns its checkpoint folder and each export's wall time and peak RSS."""
    log(f"[{name}] writing the stand-in's checkpoint files ...")
    source = write_standin(name, work / name / "checkpoints")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    large = source.var.stat().st_size > LARGE_SHARE * memory
    exports = {}
    for precision in LARGE_EXPORTS if large else OFFICIAL_EXPORTS:
        log(f"[{name}] ecm-export --precision {precision} (defaults, a process of its own) ...")
        exports[precision] = timed_export(source, precision, work / name / precision, work / name / "cache")
        log(f"[{name}] {precision} exported in {exports[precision]['wall_s']:.0f} s, peak RSS "
            f"{exports[precision]['peak_mb'] / 1024:.2f} GiB")
    return source.var.parent, exports


def kv_per_scale(folders: dict[str, Path]) -> dict[str, Any]:
    """Bytes of K and V (backbone + adapters, batch 1, CFG rows included) each scale writes, and the cache so far,
    in fp32 and fp16."""
    m = Manifest.load(folders["fp16"])
    itemsize = {"fp32": 4, "fp16": 2}
    rows, filled = [], dict.fromkeys(itemsize, 0)
    for si, pn in enumerate(m.patch_nums):
        row: dict[str, Any] = {"scale": si, "patch": pn, "tokens": pn * pn}
        elements = math.prod(m.kv_shape(pn * pn, 1))
        if m.control is not None:
            elements += math.prod(m.adapter_kv_shape(pn * pn, 1))
        for p, size in itemsize.items():
            written = 2 * elements * size
            filled[p] += written
            row[f"written_{p}"], row[f"cache_{p}"] = written, filled[p]
        rows.append(row)
    return {"per_scale": rows, "total_bytes": filled,
            "int8": "as fp32 (the INT8 graphs keep their KV cache in fp32)"}


def describe(var: VAR, ecm: ECM) -> str:
    cfg, e = var.config, ecm.config
    return (f"{len(cfg.patch_nums)} scales (L {cfg.L}), width {cfg.embed_dim}, {cfg.num_heads} heads, depth "
            f"{cfg.depth} + {e.num_adapters} adapters (width {e.width}), {cfg.vocab_size} codes, "
            f"{var.vae.config.resolution} px")


def bench_model(name: str, target: str, folders: dict[str, Path], trt_reason: str | None, repeats: int,
                round_s: float, memory_images: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Timing rounds, memory probes, decoder share, KV cache and floor of model ``name`` (loaded as ``target``:
    its name, or a stand-in's checkpoint folder); the floor's seconds come later."""
    eager = "fp32" in folders  # large stand-ins are measured without fp32, eager PyTorch included
    var, ecm = _model(target) if eager else (None, None)
    runs = runners(var, ecm, folders, trt_reason is None)
    log(f"[{name}] warming up {len(runs)} backends, then timing one image of each to size the rounds ...")
    for _, _, fn in runs.values():
        fn()
    images = {label: images_per_round(fn, round_s) for label, (_, _, fn) in runs.items()}
    log(f"[{name}] timing: {repeats} alternating rounds of about {round_s:g} s per backend "
        f"({', '.join(str(n) for n in images.values())} image(s)) ...")
    rounds = alternate({label: fn for label, (_, _, fn) in runs.items()}, repeats, images,
                       progress=lambda r: log(f"[{name}] round {r}/{repeats} done"))
    best = {label: min(t) for label, t in rounds.items()}
    probes = {EAGER: ("eager", target), **{ORT_LABELS[k]: ("onnxruntime", f) for k, f in folders.items()
                                         if k in ORT_LABELS}}
    m = Manifest.load(folders["fp16"])
    rows = []
    for label, (backend, precision, _) in runs.items():
        if label == NO_ADAPTERS:
            continue
        memory = None
        if label in probes:
            log(f"[{name}] peak memory of {label}: {memory_images} image(s) in a fresh process ...")
            memory = probe_memory(*probes[label], memory_images)
        held = memory["weights"] + memory["kv"] if memory and "kv" in memory else None
        rows.append({"label": label, "backend": backend, "precision": precision, "s_per_img": best[label],
                     "rounds": rounds[label], "images_per_round": images[label],
                     "vs_eager": best[label] / best[EAGER] if EAGER in best else None,
                     "vs_fp32": best[label] / best[ORT32] if ORT32 in best else None,
                     "peak_mb": memory["peak"] if memory else None, "memory": memory,
                     "peak_vs_held": memory["peak"] / held if held else None,
                     "decoder_share": decoder_share(folders[precision], m) if backend == "onnxruntime" else None})
    if var is None:  # shapes and floor from a model without data
        with torch.device("meta"):
            var, ecm = official_standin(name)
    result = {"title": TITLES[name], "description": describe(var, ecm), "repeats": repeats, "round_seconds": round_s,
              "rows": rows, "tensorrt": None if trt_reason is None else f"not available: {trt_reason}",
              "kv_cache": kv_per_scale(folders), "floor": image_floors(var, ecm), "adapter_overhead": None}
    if NO_ADAPTERS in best:
        paired = float(np.median([a / b for a, b in zip(rounds[ORT32], rounds[NO_ADAPTERS])]))
        result["adapter_overhead"] = {"with_s": best[ORT32], "without_s": best[NO_ADAPTERS],
                                      "ratio": best[ORT32] / best[NO_ADAPTERS], "median_paired_ratio": paired}
    return result


def settle_floors(model: dict[str, Any], gflops: float, gbps: float) -> None:
    """Replace the model's Floor objects by their figures at these rates; every row gets its multiple."""
    floors: dict[str, Floor] = model["floor"]
    fp32 = floors["fp32"]
    model["floor"] = {"flops": fp32.flops, "flops_total": fp32.total_flops,
                      "bytes": {p: f.bytes for p, f in floors.items()},
                      "bytes_total": {p: f.total_bytes for p, f in floors.items()},
                      "seconds": {p: f.seconds(gflops, gbps) for p, f in floors.items()},
                      "bound": {p: f.bound(gflops, gbps) for p, f in floors.items()}}
    for row in model["rows"]:
        row["floor_s"] = model["floor"]["seconds"][row["precision"]]
        row["x_floor"] = row["s_per_img"] / row["floor_s"]


def table(header: list[str], rows: list[list[str]], notes: list[tuple[str, str]] = ()) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned; each note
    (label, text) is a last line whose text spans the other columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    widths[0] = max([widths[0], *(len(label) for label, _ in notes)])
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return lines + [f"{label.ljust(widths[0])}  {text}" for label, text in notes]


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mb(n: float) -> str:
    mb = n / 2**20
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """Every figure of a run, as the tables ``ecm-bench`` prints."""
    machine = result["machine"]
    lines = [f"machine: {machine['cpus']} CPU cores, fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s, memory "
             f"{machine['memory_gbps']:.1f} GB/s (best of start and end of the run); TensorRT: {machine['tensorrt']}"]
    for model in result["models"].values():
        lines += ["", f"== {model['title']}: {model['description']}",
                  f"   batch 1, best of {model['repeats']} alternating rounds of about {model['round_seconds']:g} s "
                  "(whole images) per backend; peak MB: peak RSS of a fresh process above its set-up"]
        rows = [[r["label"], f"{r['s_per_img']:.4f}", _x(r["vs_eager"]), _x(r.get("vs_fp32")),
                 "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}", _x(r.get("peak_vs_held")),
                 "-" if r.get("decoder_share") is None else f"{100 * r['decoder_share']:.0f}%",
                 f"{r['x_floor']:.1f}x", str(r["images_per_round"])] for r in model["rows"]]
        notes = [] if model["tensorrt"] is None else [("TensorRT fp16 / int8", model["tensorrt"])]
        lines += table(["backend / precision", "s/img", "vs eager", "vs ORT fp32", "peak MB", "peak/(weights+KV)",
                        "decoder", "x floor", "img/round"], rows, notes)
        ao = model["adapter_overhead"]
        if ao is not None:
            lines.append(f"adapter overhead (ONNX Runtime fp32, with / without adapters): {ao['with_s']:.4f} / "
                         f"{ao['without_s']:.4f} s/img = {ao['ratio']:.2f}x (median of paired rounds "
                         f"{ao['median_paired_ratio']:.2f}x)")
        if model.get("exports"):
            done = [f"{p} {e['wall_s']:.0f} s, peak RSS {e['peak_mb'] / 1024:.2f} GiB"
                    for p, e in model["exports"].items()]
            lines.append("ecm-export with its defaults, each in a process of its own: " + "; ".join(done))
        fl = model["floor"]
        parts = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in fl["flops"].items() if v)
        lines.append(f"analytic floor per image: {fl['flops_total'] / 1e9:.3g} GFLOP ({parts}); at the fp32 matmul "
                     "rate (INT8 kernels may beat it)")
        lines += ["  " + s for s in table(
            ["precision", "bytes/img MB", "weights MB", "KV MB", "floor s/img", "bound"],
            [[p, _mb(fl["bytes_total"][p]), _mb(b["step weights"] + b["once-per-image weights"]),
              _mb(b["kv cache"]), f"{fl['seconds'][p]:.4f}", fl["bound"][p]] for p, b in fl["bytes"].items()])]
        kv = model["kv_cache"]
        lines.append(f"KV cache per scale (K and V of backbone + adapters, batch 1, CFG rows included; INT8 "
                     f"{kv['int8'].split(' (')[0]}), MB:")
        lines += ["  " + s for s in table(
            ["scale", "tokens", "written fp32", "cache fp32", "written fp16", "cache fp16"],
            [[f"{r['scale']} ({r['patch']}x{r['patch']})", str(r["tokens"]), _mb(r["written_fp32"]),
              _mb(r["cache_fp32"]), _mb(r["written_fp16"]), _mb(r["cache_fp16"])] for r in kv["per_scale"]])]
    cost = result["training"]
    lines += ["", f"ECM training iteration, {cost['model']} (L {cost['L']}, depth {cost['depth']}), batch "
              f"{cost['batch']}, mean of {cost['iters']} alternating iterations each:", *cost_lines(cost)]
    return lines


def run_bench(names: list[str], repeats: int, round_seconds: float, memory_images: int, train_iters: int,
              train_batch: int, jobs: int, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Every figure of ``ecm-bench`` for the models ``names`` (of MODELS), as one JSON-ready dict.

    Exports every model to ONNX (fp32 with and without adapters, fp16, INT8) into a temporary
    folder, then measures eager PyTorch, ONNX Runtime and, where present, TensorRT in alternating
    rounds; ``quick`` sizes the machine-rate probes and the exports' reports down for a smoke run.
    """
    start = time.perf_counter()
    size = (1024, 256) if quick else (2048, 256)
    log("measuring this machine's matmul rate and memory bandwidth ...")
    rates = [(matmul_gflops(size[0]), memory_gbps(size[1]))]
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ecm-bench-") as tmp:
        work = Path(tmp)
        folders = export_all([n for n in names if n not in OFFICIAL], work, jobs, 1 if quick else 4, log)
        trt_reason = None
        for name in names:
            target, exports = name, None
            if name in OFFICIAL:
                target, exports = standin_exports(name, work, log)
                folders[name] = {p: work / name / p for p in exports}
            trt_reason = tensorrt_plans(folders[name], log)
            models[name] = bench_model(name, str(target), folders[name], trt_reason, repeats, round_seconds,
                                       memory_images, log)
            models[name]["exports"] = exports
            if name in OFFICIAL:  # a stand-in and its exports are gigabytes: gone before the next model
                _model.cache_clear()
                shutil.rmtree(work / name)
    training = iteration_cost(train_iters, train_batch, warmup=0 if quick else 1, images=16 if quick else 256,
                              progress=log)
    log("measuring the machine's rates again ...")
    rates.append((matmul_gflops(size[0]), memory_gbps(size[1])))
    gflops, gbps = max(r[0] for r in rates), max(r[1] for r in rates)
    for model in models.values():
        settle_floors(model, gflops, gbps)
    return {
        "settings": {"models": names, "repeats": repeats, "round_seconds": round_seconds,
                     "memory_images": memory_images, "train_iters": train_iters, "train_batch": train_batch,
                     "quick": quick},
        "machine": {"cpus": os.cpu_count(), "matmul_gflops": gflops, "memory_gbps": gbps,
                    "rates_measured": [list(r) for r in rates],
                    "tensorrt": "available" if trt_reason is None else f"not available: {trt_reason}"},
        "models": models, "training": training, "wall_s": time.perf_counter() - start}
