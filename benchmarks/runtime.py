"""The torch-free runtime against eager PyTorch, side by side in one run.

For the embedded default model and a random-weight d16-proportioned model (width 1024, 16 heads,
the ten official scales, 4096 codes; 4 blocks + 2 ECM adapters, so it runs on two CPU cores):

* seconds per image, batch 1: ONNX Runtime on the CPU (fp32 export) vs eager ``VAR.generate``;
  they alternate in rounds of about a second each, and each figure is the best round of
  ``--repeats`` (shared machines are noisy);
* the ECM overhead: the same runtime with and without the adapters (a backbone-only export);
* peak memory of the runtime (peak RSS above a process that has imported the runtime and set
  ONNX Runtime up, a fixed ~9 MB reported apart) against its weights + KV cache, and RSS
  growth over 20 consecutive images, measured in a fresh process per model.

The measuring itself is ``ecm.bench.timing``'s, as in ``ecm-bench``, which reports these figures beside
the other backends and precisions.

    python benchmarks/runtime.py [--repeats 5]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch
from ecm.export.pipeline import ExportOptions, Models, export_model
from ecm.runtime.manifest import Manifest

from ecm.bench.memory import probe_memory
from ecm.bench.models import load_model
from ecm.bench.suite import eager_generation, runtime_generation
from ecm.bench.timing import alternate, images_per_round


def measure(name: str, var, ecm, work: Path, repeats: int) -> dict:
    quiet = lambda _: None  # noqa: E731
    with_ecm, without = work / f"{name}-ecm", work / f"{name}-backbone"
    click.echo(f"[{name}] exporting (fp32, with and without adapters) ...")
    export_model(Models(var, ecm), with_ecm, ExportOptions(precision="fp32", verify=False), quiet)
    export_model(Models(var), without, ExportOptions(precision="fp32", verify=False), quiet)
    m = Manifest.load(with_ecm)
    eager = eager_generation(var, ecm, m)
    runtime = runtime_generation(with_ecm, m)
    backbone = runtime_generation(without, m, adapters=False)
    for fn in (eager, runtime, backbone):  # warm-up
        fn()
    images = images_per_round(runtime)  # about a second per measurement
    click.echo(f"[{name}] timing, best of {repeats} alternating rounds of {images} image(s) ...")
    t = alternate({"eager": eager, "runtime": runtime, "backbone": backbone}, repeats, images)
    best = {k: min(v) for k, v in t.items()}
    return {"model": name, **best, "memory": probe_memory("onnxruntime", with_ecm, 20)}


@click.command()
@click.option("--repeats", default=9, show_default=True, help="Alternating timing rounds per model.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here.")
def main(repeats: int, json_path: Path | None) -> None:
    """Seconds per image, ECM overhead and memory of the runtime vs eager PyTorch."""
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure("embedded default", *load_model("default"), Path(tmp), repeats))
        rows.append(measure("d16-proportioned", *load_model("d16-4"), Path(tmp), repeats))
    click.echo("")
    click.echo(f"{'model':18}{'eager s/img':>12}{'runtime s/img':>15}{'runtime/eager':>15}{'ECM overhead':>14}"
               f"{'peak MB':>9}{'weights+KV MB':>15}{'peak ratio':>12}{'RSS growth img 5->20':>22}")
    for r in rows:
        mem = r["memory"]
        budget = mem["weights"] + mem["kv"]
        growth = mem["after"][-1] - mem["after"][4]
        click.echo(f"{r['model']:18}{r['eager']:12.3f}{r['runtime']:15.3f}{r['runtime'] / r['eager']:14.2f}x"
                   f"{r['runtime'] / r['backbone']:13.2f}x{mem['peak']:9.0f}{budget:15.0f}{mem['peak'] / budget:11.2f}x"
                   f"{growth:+19.1f} MB")
        r.update(ratio=r["runtime"] / r["eager"], ecm_overhead=r["runtime"] / r["backbone"],
                 peak_ratio=mem["peak"] / budget, growth_mb=growth)
    for r in rows:
        mem = r["memory"]
        click.echo(f"{r['model']}: after 20 images {mem['anon_after']:.0f} MB allocated + "
                   f"{mem['file_after']:.0f} MB of mapped files (ONNX Runtime's code paged in) above set-up")
    setup = max(r["memory"]["setup"] for r in rows)
    click.echo(f"targets: runtime/eager <= 0.8x, ECM overhead <= 1.15x, peak <= 1.5x weights + KV, no growth. "
               f"ONNX Runtime's one-time set-up ({setup:.0f} MB) is outside the peak. Absolute times vary between "
               "machines; the ratios are what this measures.")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
