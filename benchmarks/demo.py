"""ecm-demo's page against ecm-run on the same engine and seed: time to the first preview, time per image.

    python benchmarks/demo.py [--engine FOLDER] [--rounds 9] [--screenshot docs/ecm-demo.png]

Alternating rounds (median of each): the scale loop as ecm-run runs it, without and with the page's
per-scale previews, in this process; and the page, served by ``ecm-demo`` in a process of its own,
through gradio_client (HTTP, queue, PNG transfer). The page's image must be ecm-run's, byte for byte.
With --screenshot, a headless chromium (Debian's) drives the page once and saves it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
from ecm.runtime.loop import Sampling
from PIL import Image

from ecm.cli.demo import Demo
from ecm.cli.run import default_engine, load_conditions

EDGES = Path(__file__).resolve().parent.parent / "ecm" / "assets" / "samples" / "edit" / "edges.png"


@click.command()
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="An ecm-export folder. Default: the embedded default model's export.")
@click.option("--rounds", default=9, show_default=True, type=click.IntRange(min=1), help="Alternating rounds.")
@click.option("--screenshot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also drive the page in headless chromium and save a screenshot here.")
def main(engine: Path | None, rounds: int, screenshot: Path | None) -> None:
    from gradio_client import Client, handle_file

    engine = engine or default_engine()
    demo = Demo(engine)
    m = demo.m
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "from ecm.cli.demo import main; main()", "--engine", str(engine),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            break
        except Exception:  # still starting
            time.sleep(0.5)
    args = [handle_file(str(EDGES)), *[None] * (len(m.controls) - 1), None, *[1.0] * len(m.controls), None, None,
            "", 5, 0, 1, m.cfg, m.top_k, m.top_p, m.temperature]
    cond = load_conditions((EDGES,), m, None)[0]
    loop, sampling = demo.loop(1), Sampling.defaults(m)

    def direct(previews: bool) -> tuple[float, float, np.ndarray]:
        first, start = [], time.perf_counter()
        hook = (lambda si, _: first.append(first[0] if first else time.perf_counter() - start)) if previews else None
        images = loop.run(np.array([5]), {k: c[None] for k, c in cond.items()}, sampling, seed=0, on_scale=hook).images
        total = time.perf_counter() - start
        return (first[0] if first else total), total, images[0]

    def page() -> tuple[float, float, np.ndarray]:
        start, first = time.perf_counter(), None
        job = client.submit(*args, api_name="/generate")
        for update in job:
            if first is None and isinstance(update, tuple) and update[1] is not None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return first, total, np.asarray(Image.open(job.result()[2][0]["image"]).convert("RGB"))

    page()  # warm-up: first requests set the queue and the sessions up
    runs: dict[str, list[tuple[float, float]]] = {"ecm-run": [], "ecm-run + previews": [], "page": []}
    for _ in range(rounds):
        for name, fn in (("ecm-run", lambda: direct(False)), ("ecm-run + previews", lambda: direct(True)),
                         ("page", page)):
            first, total, image = fn()
            runs[name].append((first, total))
            if name == "ecm-run":
                want = image
            elif name == "page" and not np.array_equal(image, want):
                raise SystemExit("the page's image differs from ecm-run's")
    med = {name: np.median(np.array(r), axis=0) for name, r in runs.items()}
    click.echo(f"{engine}: {m.image_size} px, 1 image, seed 0, median of {rounds} alternating rounds; the page's "
               "image = ecm-run's, byte for byte")
    click.echo(f"{'':22} {'first preview s':>16} {'per image s':>12}")
    for name, (first, total) in med.items():
        click.echo(f"{name:22} {first if name != 'ecm-run' else float('nan'):16.4f} {total:12.4f}")
    page_first, page_total = med["page"]
    click.echo(f"page / ecm-run + previews: first preview {page_first / med['ecm-run + previews'][0]:.2f}x, "
               f"per image {page_total / med['ecm-run + previews'][1]:.2f}x; page / ecm-run per image "
               f"{page_total / med['ecm-run'][1]:.2f}x (page - ecm-run: {page_total - med['ecm-run'][1]:.3f} s)")
    if screenshot is not None:
        from selenium import webdriver

        from ecm.bench.demo_page import drive_page

        run = drive_page(webdriver, f"http://127.0.0.1:{port}/", EDGES, screenshot=screenshot)
        click.echo(f"browser: {run.previews} previews, first after {run.first_preview_s:.3f} s, result after "
                   f"{run.result_s:.3f} s; screenshot {screenshot}")
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
