"""ecm-demo: the Gradio page, scripted through gradio_client and driven in a real headless browser."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from ecm.runtime.engine import open_engine
from ecm.runtime.loop import Sampling, ScaleLoop
from PIL import Image

gradio = pytest.importorskip("gradio", reason="ecm-demo needs the demo extra (make setup installs it)")
from gradio_client import Client, handle_file  # noqa: E402

from ecm.cli.demo import Demo, build_app  # noqa: E402
from ecm.cli.run import load_conditions  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_args(m, cond=None, n: int = 1, seed: int = 0, label: int = 3) -> list:
    """/generate's inputs: one upload and weight per control, the sketch, the editing inputs, the sampling."""
    K = len(m.controls)
    uploads = [handle_file(str(cond)) if cond is not None else None] + [None] * (K - 1)
    return [*uploads, None, *[1.0] * K, None, None, "", label, seed, n, m.cfg, m.top_k, m.top_p, m.temperature]


@pytest.fixture(scope="module")
def server(fp32_export):
    demo = Demo(fp32_export.folder)
    app = build_app(demo).queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False), demo
    app.close()


def test_gradio_client_streams_every_scale_and_gets_ecm_runs_image(server, fp32_export, edge_png):
    client, demo = server
    m = demo.m
    job = client.submit(*call_args(m, edge_png, n=2, seed=5), api_name="/generate")
    updates = list(job)
    assert len(updates) == m.num_scales + 2  # conditions, a preview after every scale (one batch of 2), the result
    *_, gallery, status = job.result()
    assert "2 images" in status and "s per image" in status and "first preview after" in status
    got = np.stack([np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery])
    cond = load_conditions((edge_png,), m, None)[0]["canny"]
    with open_engine(fp32_export.folder)[1] as backend:  # the images ecm-run draws, same seed
        want = ScaleLoop(m, backend, 2).run(np.full(2, 3), np.repeat(cond[None], 2, 0), Sampling.defaults(m),
                                            seed=5).images
    assert np.array_equal(got, want)


def test_a_bad_upload_gets_a_message_and_the_server_keeps_serving(server, edge_png, tmp_path):
    client, demo = server
    bad = tmp_path / "edge.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="cannot read canny condition"):
        client.predict(*call_args(demo.m, bad), api_name="/generate")
    with pytest.raises(Exception, match="give a canny condition"):
        client.predict(*call_args(demo.m, None), api_name="/generate")
    *_, gallery, status = client.predict(*call_args(demo.m, edge_png), api_name="/generate")
    assert len(gallery) == 1 and "1 image" in status


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="needs Debian's chromium and chromium-driver "
                    "(make test-all installs them)")
def test_a_headless_browser_uploads_generates_and_sees_previews_first(fp32_export, edge_png, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the browser extra)")
    from ecm.bench.demo_page import drive_page

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from ecm.cli.demo import main; main()", "--engine",
                             str(fp32_export.folder), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        run = drive_page(webdriver, f"http://127.0.0.1:{port}/", edge_png, screenshot=tmp_path / "page.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert run.final_size == (64, 64)
    assert 1 <= run.previews and run.first_preview_s < run.result_s
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_the_page_imports_no_torch():
    code = "import sys, ecm.cli.demo, gradio; print('torch imported:', 'torch' in sys.modules)"
    assert "torch imported: False" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                      check=True).stdout
