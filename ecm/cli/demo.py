"""``ecm-demo``: a web page (Gradio) over the torch-free runtime, previewing every scale as it is drawn.

One engine is opened once; requests queue (one generation at a time runs on it). Each control of
the engine gets an upload (a control map, or a photo whose map is extracted and shown) and a
weight; the first also a sketch pad. Inpainting and outpainting take an image and a mask or
margins. Generate streams the images after every scale, then the final ones with the seconds per
image. Scripted use: ``gradio_client.Client(url).predict(..., api_name="/generate")``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image

from ecm.cli.run import batch_size, default_engine, read_inpaint
from ecm.runtime.controls import find_control
from ecm.runtime.engine import BACKENDS, open_engine
from ecm.runtime.errors import ECMError, exit_on_error
from ecm.runtime.images import MAX_GREYNESS, greyness, grid, prepare_condition, read_image, to_rgb, zoom
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest

#: Previews are shown at least this many pixels wide.
PREVIEW = 256


def sketch_map(value: Any) -> Image.Image | None:
    """A sketch pad's drawing as an edge map (white lines on black), or None if nothing was drawn."""
    if not isinstance(value, dict) or value.get("composite") is None:
        return None
    rgba = np.asarray(value["composite"])
    if rgba.ndim != 3:
        return None
    alpha = rgba[..., 3:4] / 255 if rgba.shape[2] == 4 else 1
    grey = (rgba[..., :3] * alpha + 255 * (1 - alpha)).mean(axis=2)  # over white, as the pad shows it
    lines = np.abs(grey - np.median(grey)) > 64  # strokes: whatever differs from the background
    return Image.fromarray(np.where(lines, 255, 0).astype(np.uint8)) if lines.any() else None


def condition(m: Manifest, name: str, path: str | None, drawn: Image.Image | None) -> np.ndarray | None:
    """The control graph's input from an upload (a map, or a photo whose map is extracted) or a drawing."""
    spec = m.controls[m.control_index(name)]
    if path is None and drawn is None:
        return None
    img = drawn if path is None else read_image(path, f"{name} condition")
    kind = find_control(name)
    R, scale = spec.resolution, kind.map_scale if kind is not None else 1
    if kind is None or kind.extractor is None:
        return prepare_condition(img, spec, source=f"the {name} condition")
    is_map = (greyness(np.asarray(to_rgb(img))) <= MAX_GREYNESS) if kind.binary else img.size == (R // scale,) * 2
    return prepare_condition(img, spec, extract=not is_map, source=f"the {name} condition")


class Demo:
    """The engine, its loops (one per batch size) and the lock that lets one generation run at a time."""

    def __init__(self, engine: Path, backend: str = "auto", device: str = "cpu", threads: int = 0):
        self.m, self.runner = open_engine(engine, backend, device, threads)
        self.loops: dict[int, ScaleLoop] = {}
        self.lock = threading.Lock()

    def loop(self, n: int) -> ScaleLoop:
        B = batch_size(self.m, self.runner, n)
        if B not in self.loops:
            self.loops[B] = ScaleLoop(self.m, self.runner, B)
        return self.loops[B]

    def generate(self, conds: dict[str, np.ndarray], weights: dict[str, float], inpaint: Any, label: int, seed: int,
                 n: int, sampling: Sampling) -> Iterator[tuple[str, Any]]:
        """Events ('preview', image after a scale) as they come, then ('done', (images, seconds per image, seconds
        to the first preview))."""
        events: queue.Queue = queue.Queue()

        first: list[float] = []

        def work() -> None:
            try:
                with self.lock:
                    loop, images, start = self.loop(n), [], time.perf_counter()
                    B = loop.batch
                    for at in range(0, n, B):
                        def preview(si: int, batch: np.ndarray, at: int = at) -> None:
                            if not first:
                                first.append(time.perf_counter() - start)
                            events.put(("preview", (si, batch[:min(B, n - at)])))

                        traj = loop.run(np.full(B, label), {k: np.repeat(c[None], B, 0) for k, c in conds.items()},
                                        sampling, weights=weights, inpaint=inpaint.batch(B) if inpaint else None,
                                        seed=seed + at, on_scale=preview)
                        images += list(traj.images[:min(B, n - at)])
                    events.put(("done", (images, (time.perf_counter() - start) / n, first[0])))
            except ECMError as e:
                events.put(("error", str(e)))

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, value = events.get()
            yield kind, value
            if kind in ("done", "error"):
                return


def build_app(demo: Demo) -> Any:
    """The Gradio Blocks page over ``demo``'s engine."""
    import gradio as gr

    m = demo.m
    with gr.Blocks(title="ecm: controllable VAR") as app:
        precision = m.precision_label(demo.runner.device == "cpu")
        gr.Markdown(f"## ecm: controllable VAR, drawn coarse to fine\n"
                    f"Engine: {m.image_size} px, {m.num_scales} scales, {precision}, "
                    f"{demo.runner.name} on {demo.runner.device}; controls: "
                    f"{', '.join(m.control_names) or 'none (the backbone alone)'}.")
        with gr.Row():
            with gr.Column():
                uploads, weights, sketch = [], [], None
                for k, name in enumerate(m.control_names):
                    with gr.Tab(name):
                        uploads.append(gr.File(label=f"{name}: a control map, or a photo (its {name} map is "
                                               "extracted)", file_types=["image"], type="filepath",
                                               elem_id=f"cond-{name}"))
                        if k == 0:
                            sketch = gr.Sketchpad(label=f"or draw the {name} map", type="numpy")
                        weights.append(gr.Slider(0, 2, value=1.0, step=0.05, label=f"{name} weight"))
                with gr.Accordion("Inpainting / outpainting", open=False):
                    init = gr.File(label="image to keep", file_types=["image"], type="filepath")
                    mask = gr.File(label="mask: white = generate (or give margins)", file_types=["image"],
                                   type="filepath")
                    margins = gr.Textbox(label="outpaint margins, e.g. left=16,right=16", value="")
                label = gr.Dropdown(list(range(m.num_classes)), value=0, label="class")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="seed")
                    count = gr.Slider(1, 8, value=1, step=1, label="images")
                with gr.Row():
                    cfg = gr.Number(m.cfg, label="CFG")
                    top_k = gr.Number(m.top_k, precision=0, label="top-k")
                    top_p = gr.Number(m.top_p, label="top-p")
                    temperature = gr.Textbox(m.temperature, label="temperature (T, A:B, A:B@k, linear:A:B)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                shown = gr.Gallery(label="conditions as the model sees them", columns=4, height=180, format="png")
                preview = gr.Image(label="coarse to fine: a preview after each scale", type="numpy", format="png",
                                   elem_id="preview", image_mode="RGB", height=256)
                gallery = gr.Gallery(label="images", columns=4, height=300, format="png", elem_id="result")
                status = gr.Markdown(elem_id="status")

        def generate(*args: Any) -> Iterator[tuple[Any, Any, Any, str]]:
            K = len(m.control_names)
            files, drawn, w = args[:K], args[K], args[K + 1:2 * K + 1]
            init_path, mask_path, margin_text, label_, seed_, n, cfg_, k_, p_, t_ = args[2 * K + 1:]
            try:
                conds = {}
                for i, name in enumerate(m.control_names):
                    c = condition(m, name, files[i], sketch_map(drawn) if i == 0 else None)
                    if c is not None:
                        conds[name] = c
                canvas = read_inpaint(init_path, mask_path, margin_text or None, m)
                if K and not conds and canvas is None:
                    raise ECMError(f"give a {m.control_names[0]} condition (upload or draw one), or an image to "
                                   "inpaint")
                sampling = Sampling.defaults(m, cfg=cfg_, top_k=int(k_), top_p=p_, temperature=t_)
                events = demo.generate(conds, {name: float(x) for name, x in zip(m.control_names, w)
                                               if name in conds}, canvas, int(label_), int(seed_), int(n), sampling)
                yield list(conds.values()), None, None, "generating ..."
                for kind, value in events:  # only what changed goes to the page: each update is a transfer
                    if kind == "error":
                        raise ECMError(value)
                    if kind == "preview":
                        si, batch = value
                        shown_batch = zoom(grid([list(batch)]), max(1, PREVIEW // m.image_size))
                        yield gr.skip(), shown_batch, gr.skip(), f"scale {si + 1} of {m.num_scales} ..."
                    else:
                        images, per_image, first = value
                        yield (gr.skip(), gr.skip(), images,
                               f"{len(images)} image{'s' * (len(images) > 1)}, {per_image:.3f} s per image, first "
                               f"preview after {first:.3f} s ({demo.runner.name} on {demo.runner.device})")
            except ECMError as e:
                raise gr.Error(str(e)) from None

        inputs = [*uploads, sketch if sketch is not None else gr.State(None), *weights, init, mask, margins, label,
                  seed, count, cfg, top_k, top_p, temperature]
        button.click(generate, inputs=inputs, outputs=[shown, preview, gallery, status], api_name="generate")
    return app


@click.command()
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="An ecm-export folder or one of its files (var_ecm.plan: TensorRT). Default: the embedded default "
                   "model, exported to ONNX on first use.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on (0.0.0.0: every interface, for a Jetson on the network).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT for .plan, ONNX Runtime otherwise.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime device (cuda needs onnxruntime-gpu).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime CPU threads (0 = all cores).")
@exit_on_error
def main(engine: Path | None, port: int, host: str, backend: str, device: str, threads: int) -> None:
    """Serve a web page that generates with an exported engine and previews every scale."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a demo that phones nobody
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ECMError("ecm-demo needs Gradio: pip install 'ecm[demo]'") from None
    demo = Demo(engine or default_engine(progress=click.echo), backend, device, threads)
    app = build_app(demo).queue(default_concurrency_limit=1)
    click.echo(f"serving on http://{host}:{port} (Ctrl+C stops)")
    try:
        app.launch(server_name=host, server_port=port, quiet=True)
    except OSError as e:
        raise ECMError(f"cannot serve on {host}:{port} ({e}); pass another --port") from None
