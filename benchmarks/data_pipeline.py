"""The training data pipeline at scale (issue 16's figures), measured side by side in one run.

1. Procedural 64-px folders of 2 000 and 50 000 PNG files: ecm-prepare's images/s and bytes per
   image, then ecm-train streaming each cache: peak memory of the training process tree, and
   the ratio of the 50 000-image run's to the 2 000-image run's (memory must not grow with data).
2. The streaming loader's batches/s against the training step's steps/s, for the embedded default
   (on the 50 000-image cache) and for the official-shaped d16 at 256 px (random weights).
3. d16 at 256 px end to end on real photos (tests/data/photos): ecm-prepare -> ecm-train -> ecm-eval
   with the official-shaped stand-in's checkpoint files; their times, memory and figures.

    python benchmarks/data_pipeline.py --json data-pipeline.json       # about 25 minutes on two cores
    python benchmarks/data_pipeline.py --skip-d16 --small 500 --large 5000   # a quick look
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
from ecm.runtime.errors import exit_on_error

from ecm.bench.data_pipeline import (
    epoch_estimate,
    loader_against_step,
    measured,
    script,
    write_procedural_folder,
)
from ecm.bench.models import standin_checkpoints, write_standin
from ecm.data.cache import TokenCache
from ecm.model.embedded import load_backbone
from ecm.train.prepare import summarize

IMAGENET_TRAIN = 1_281_167
PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "photos"


def prepare_and_train(n: int, work: Path, steps: int, batch: int, workers: int) -> dict:
    """Write ``n`` images, prepare their cache, train on it; each command's time and memory."""
    src, cache, run = work / f"imgs-{n}", work / f"cache-{n}", work / f"run-{n}"
    click.echo(f"[{n} images] writing the procedural PNG files ...")
    write_s = write_procedural_folder(src, n)
    click.echo(f"[{n} images] ecm-prepare --workers {workers} ...")
    prep = measured([script("ecm-prepare"), str(src), "--out", str(cache), "--workers", str(workers)],
                    work / f"prepare-{n}.log")
    s = summarize(cache)
    click.echo(f"[{n} images] ecm-train --data (streamed) --steps {steps} --batch {batch} ...")
    train = measured([script("ecm-train"), "--data", str(cache), "--steps", str(steps), "--batch", str(batch),
                      "--workers", "2", "--out", str(run)], work / f"train-{n}.log")
    return {"images": n, "write_s": write_s, "prepare": {**prep, "images_per_s": n / prep["wall_s"]},
            "cache": {"bytes_per_image": s.bytes_per_image, "token_bytes": s.token_bytes, "map_bytes": s.map_bytes,
                      "bytes_on_disk": s.bytes_on_disk}, "train": train}


def d16_end_to_end(work: Path, steps: int, batch: int) -> dict:
    """ecm-prepare, ecm-train and ecm-eval on the d16 stand-in at 256 px over real photos; and the loader
    against the d16 training step."""
    click.echo("[d16] writing the official-shaped stand-in's checkpoint files ...")
    ck = write_standin("d16", work / "d16")
    cache, run = work / "d16-cache", work / "d16-run"
    click.echo("[d16] ecm-prepare (256 px, the official VQVAE's shape) ...")
    prep = measured([script("ecm-prepare"), str(PHOTOS), "--out", str(cache), "--vae", str(ck.vae)],
                    work / "d16-prepare.log")
    s = summarize(cache)
    click.echo(f"[d16] ecm-train --steps {steps} --batch {batch} ...")
    train = measured([script("ecm-train"), "--data", str(cache), "--vae", str(ck.vae), "--var", str(ck.var),
                      "--steps", str(steps), "--batch", str(batch), "--workers", "1", "--out", str(run)],
                     work / "d16-train.log")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    click.echo("[d16] ecm-eval --data (2 images) ...")
    ev = measured([script("ecm-eval"), "--ecm", str(run / "ecm.safetensors"), "--data", str(cache), "--num-images",
                   "2", "--grid", str(work / "d16-eval.png"), "--json", str(work / "d16-eval.json")],
                  work / "d16-eval.log")
    click.echo("[d16] loader against the training step ...")
    var, _ = standin_checkpoints(work / "d16").load()
    speed = loader_against_step(TokenCache(cache), var, batch, 3, 1, log=click.echo)
    click.echo("[d16] seconds per training sample for each early-centric cut, and an ImageNet epoch ...")
    epoch = epoch_estimate(TokenCache(cache), var, batch, 0.8, IMAGENET_TRAIN, log=click.echo)
    return {"epoch": epoch, "prepare": {**prep, "images_per_s": s.images / prep["wall_s"], "images": s.images},
            "cache": {"bytes_per_image": s.bytes_per_image, "token_bytes": s.token_bytes, "map_bytes": s.map_bytes},
            "train": {**train, "losses": [r["loss"] for r in log], "tok_per_s": [r["tok_per_s"] for r in log],
                      "tokens": [r["tokens"] for r in log], "sec": [r["sec"] for r in log]},
            "eval": {**ev, **json.loads((work / "d16-eval.json").read_text())}, "loader": speed}


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/ecm-bench-data"),
              show_default=True, help="Scratch folder (deleted at the end unless --keep).")
@click.option("--small", default=2000, show_default=True, help="Images of the small folder.")
@click.option("--large", default=50000, show_default=True, help="Images of the large folder.")
@click.option("--steps", default=300, show_default=True, help="Training steps on each procedural cache.")
@click.option("--batch", default=32, show_default=True, help="Batch size of the embedded default's training.")
@click.option("--workers", default=2, show_default=True, help="ecm-prepare worker processes.")
@click.option("--skip-d16", is_flag=True, help="Leave out the d16 measurements (about 10 minutes).")
@click.option("--skip-procedural", is_flag=True, help="Leave out the procedural folders (d16 only).")
@click.option("--keep", is_flag=True, help="Keep the scratch folder.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure here.")
@exit_on_error
def main(work, small, large, steps, batch, workers, skip_d16, skip_procedural, keep, json_path) -> None:
    """Prepare throughput, cache bytes per image, training memory against dataset size, loader against step."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        d16 = None if skip_d16 else d16_end_to_end(work, 3, 2)
        runs, default = [], None
        if not skip_procedural:
            runs = [prepare_and_train(n, work, steps, batch, workers) for n in (small, large)]
            click.echo("[default] loader against the training step, on the large cache ...")
            _, var = load_backbone()
            default = loader_against_step(TokenCache(work / f"cache-{large}"), var, batch, 30, 2, log=click.echo)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo("")
    if runs:
        procedural_lines(runs, small, large)
    rows = ([("default 64 px", default)] if default else []) + ([("d16 256 px", d16["loader"])] if d16 else [])
    for name, s in rows:
        click.echo(f"{name}: loader {s['loader_batches_per_s']:.1f} batches/s ({s['workers']} workers; "
                   f"{s['inline_batches_per_s']:.1f} in-process) vs training {s['steps_per_s']:.3f} steps/s at batch "
                   f"{s['batch']}: {s['ratio']:.0f}x ({s['ratio_inline']:.0f}x in-process; target >= 5x)")
    if d16:
        d16_lines(d16)
    if json_path:
        json_path.write_text(json.dumps({"runs": runs, "default_loader": default, "d16": d16}, indent=2))


def procedural_lines(runs: list[dict], small: int, large: int) -> None:
    click.echo(f"{'images':>8}{'prepare img/s':>15}{'bytes/img':>11}{'train main RSS':>16}{'tree PSS':>10}"
               f"{'tree RSS':>10}  (MiB)")
    for r in runs:
        t = r["train"]
        click.echo(f"{r['images']:8d}{r['prepare']['images_per_s']:15.0f}{r['cache']['bytes_per_image']:11.0f}"
                   f"{t['peak_main_rss_mb']:16.0f}{t['peak_tree_pss_mb']:10.0f}{t['peak_tree_rss_mb']:10.0f}")
    a, b = runs[0]["train"], runs[1]["train"]
    click.echo(f"training peak memory, {large} vs {small} images: main RSS "
               f"{b['peak_main_rss_mb'] / a['peak_main_rss_mb']:.3f}x, process tree PSS "
               f"{b['peak_tree_pss_mb'] / a['peak_tree_pss_mb']:.3f}x (target <= 1.15x)")


def d16_lines(d16: dict) -> None:
    click.echo(f"d16 256 px: prepare {d16['prepare']['images_per_s']:.2f} img/s, "
               f"{d16['cache']['bytes_per_image']:.0f} bytes/img (tokens {d16['cache']['token_bytes']}, map "
               f"{d16['cache']['map_bytes']}); train losses {[round(x, 3) for x in d16['train']['losses']]}, "
               f"peak RSS {d16['train']['peak_main_rss_mb']:.0f} MiB; eval {d16['eval']['control']} "
               f"{d16['eval']['metric']} ECM {d16['eval']['ecm']:.4f} / backbone {d16['eval']['backbone']:.4f}")
    e = d16["epoch"]
    click.echo(f"d16 epoch estimate ({e['images']} images, early-centric 0.8): "
               f"{e['expected_seconds_per_sample']:.2f} s per sample here = {e['cpu_hours_per_epoch']:.0f} CPU hours; "
               f"this CPU {e['cpu_flops'] / 1e9:.0f} GFLOP/s -> " + ", ".join(
                   f"{g} {h * 60:.0f} GPU-minutes" for g, h in e["gpu_hours_per_epoch"].items()))


if __name__ == "__main__":
    main()
