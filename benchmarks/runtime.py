"""The torch-free runtime against eager PyTorch, side by side in one run.

For the embedded default model and a random-weight d16-proportioned model (width 1024, 16 heads,
the ten official scales, 4096 codes; 4 blocks + 2 ECM adapters, so it runs on two CPU cores):

* seconds per image, batch 1: ONNX Runtime on the CPU (fp32 export) vs eager ``VAR.generate``;
  the two alternate, and each figure is the best of ``--repeats`` rounds (shared machines are noisy);
* the ECM overhead: the same runtime with and without the adapters (a backbone-only export);
* peak memory of the runtime (peak RSS above the process's RSS once NumPy and ONNX Runtime are
  imported) against its weights + KV cache, and RSS growth over 20 consecutive images, measured in
  a fresh process per model.

    python benchmarks/runtime.py [--repeats 5]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from ecm.export.pipeline import ExportOptions, export_model
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend
from ecm.runtime.scales import PATCH_NUMS_256

from ecm import var_config, vqvae_config
from ecm.adapters import ECM, ecm_config
from ecm.data import to_model_range
from ecm.default_model import load_default

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import make_pair, randomize_  # noqa: E402

MEMORY_PROBE = r"""
import json, sys
import numpy as np
import onnxruntime  # noqa: F401  (imported before the baseline)
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend
from ecm.runtime.memory import rss_mb, peak_rss_mb, weight_bytes
folder = sys.argv[1]
m = Manifest.load(folder)
base = rss_mb()
loop = ScaleLoop(m, OrtBackend(folder, m), 1)
cond = np.zeros((1, m.control.resolution, m.control.resolution, 3), np.uint8) if m.control else None
after = []
for i in range(20):
    loop.run(np.array([i % m.num_classes]), cond, Sampling.defaults(m), seed=i)
    after.append(rss_mb() - base)
print(json.dumps({"peak": peak_rss_mb() - base, "after": after, "weights": weight_bytes(folder) / 2**20,
                  "kv": m.kv_cache_bytes(1) / 2**20}))
"""


def d16_proportioned() -> tuple:
    vae_cfg = vqvae_config("tiny", vocab_size=4096, z_channels=32, ch_mult=(1, 1, 1, 1, 2), patch_nums=PATCH_NUMS_256)
    _, var = make_pair(vae_cfg, var_config("d16", vae=vae_cfg, depth=4), seed=10)
    ecm = randomize_(ECM(ecm_config(var.config, vae_cfg.downsample, "base", num_adapters=2)), seed=3)
    return var, ecm


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def condition(m: Manifest) -> np.ndarray:
    R = m.control.resolution
    cond = np.zeros((1, R, R, 3), np.uint8)
    cond[:, R // 4:3 * R // 4, R // 3] = 255
    cond[:, R // 2, R // 4:3 * R // 4] = 255
    return cond


def measure(name: str, var, ecm, work: Path, repeats: int) -> dict:
    quiet = lambda _: None  # noqa: E731
    with_ecm, without = work / f"{name}-ecm", work / f"{name}-backbone"
    click.echo(f"[{name}] exporting (fp32, with and without adapters) ...")
    export_model(var, ecm, with_ecm, ExportOptions(precision="fp32", verify=False), quiet)
    export_model(var, None, without, ExportOptions(precision="fp32", verify=False), quiet)
    m, mb = Manifest.load(with_ecm), Manifest.load(without)
    cond = condition(m)
    loop = ScaleLoop(m, OrtBackend(with_ecm, m), 1)
    loop_bb = ScaleLoop(mb, OrtBackend(without, mb), 1)
    s, sb = Sampling.defaults(m), Sampling.defaults(mb, temperature=m.temperature)
    label, ctrl = np.array([1]), to_model_range(cond)

    def eager() -> None:
        with torch.no_grad():
            var.generate([1], ecm=ecm, control_B3HW=ctrl, seed=0, candidates=m.candidates)

    runtime = lambda: loop.run(label, cond, s, seed=0)  # noqa: E731
    backbone = lambda: loop_bb.run(label, None, sb, seed=0)  # noqa: E731
    for fn in (eager, runtime, backbone):  # warm-up
        fn()
    t = {"eager": [], "runtime": [], "backbone": []}
    click.echo(f"[{name}] timing, best of {repeats} alternating rounds ...")
    for _ in range(repeats):
        t["eager"].append(best_of(eager, 1))
        t["runtime"].append(best_of(runtime, 1))
        t["backbone"].append(best_of(backbone, 1))
    best = {k: min(v) for k, v in t.items()}
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(with_ecm)], capture_output=True, text=True,
                           check=True)
    mem = json.loads(probe.stdout)
    return {"model": name, **best, "memory": mem}


@click.command()
@click.option("--repeats", default=5, show_default=True, help="Alternating timing rounds per model.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here.")
def main(repeats: int, json_path: Path | None) -> None:
    """Seconds per image, ECM overhead and memory of the runtime vs eager PyTorch."""
    torch.manual_seed(0)
    _, var, ecm = load_default()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure("embedded default", var, ecm, Path(tmp), repeats))
        rows.append(measure("d16-proportioned", *d16_proportioned(), Path(tmp), repeats))
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
    click.echo("targets: runtime/eager <= 0.8x, ECM overhead <= 1.15x, peak <= 1.5x weights + KV, no growth. "
               "Absolute times vary between machines; the ratios are what this measures.")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
