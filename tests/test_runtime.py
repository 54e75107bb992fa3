"""ecm-run and the scale loop: torch-free, the eager model's images, seeds, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ecm.runtime.images import prepare_condition, read_image
from ecm.runtime.manifest import MANIFEST_NAME, ControlSpec
from PIL import Image

from ecm.cli.run import main as run_cli
from ecm.model.pixels import to_model_range, to_uint8


def invoke(args):
    result = CliRunner().invoke(run_cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_runtime_never_imports_torch(fp32_export, edge_png, tmp_path):
    code = ("import sys; from ecm.cli.run import main; "
            f"main(['--engine', {str(fp32_export.folder)!r}, '--cond', {str(edge_png)!r}, '-n', '2', "
            f"'--out', {str(tmp_path / 'o.png')!r}], standalone_mode=False); "
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch imported: False" in out and (tmp_path / "o.png").is_file()


def test_ecm_run_draws_the_eager_models_image(fp32_export, tiny_pair, tiny_ecm, edge_png, tmp_path):
    code, out = invoke(["--engine", fp32_export.folder / "var_ecm.onnx", "--cond", edge_png, "--class", 3,
                        "--seed", 7, "--out", tmp_path / "one.png"])
    assert code == 0, out
    got = np.asarray(Image.open(tmp_path / "one.png"))
    cond = prepare_condition(read_image(edge_png), ControlSpec(resolution=64), extract=False)
    with torch.no_grad():
        want = tiny_pair[1].generate([3], ecm=tiny_ecm, control_B3HW=to_model_range(cond[None]), seed=7,
                                     candidates=fp32_export.manifest.candidates)
    assert np.abs(got.astype(int) - to_uint8(want.images)[0].astype(int)).max() <= 1


def test_image_j_depends_on_its_seed_only(fp32_export, edge_png, tmp_path):
    code, _ = invoke(["--engine", fp32_export.folder, "--cond", edge_png, "-n", 3, "--batch", 2, "--seed", 5,
                      "--out", tmp_path / "grid.png", "--save-steps"])
    assert code == 0
    code, _ = invoke(["--engine", fp32_export.folder, "--cond", edge_png, "--seed", 7, "--out", tmp_path / "s7.png"])
    assert code == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    cell = grid.shape[0]  # one row: condition, then three images, zoomed to the same square cells
    third = grid[:, 3 * (cell + 2):3 * (cell + 2) + cell]
    single = np.asarray(Image.open(tmp_path / "s7.png")).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(third, single)
    steps = np.asarray(Image.open(tmp_path / "grid_steps.png"))
    assert steps.shape[1] == 6 * cell + 5 * 2 and steps.shape[0] == 3 * cell + 2 * 2
    code, _ = invoke(["--engine", fp32_export.folder, "--cond", edge_png, "--seed", 7, "--out", tmp_path / "again.png"])
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "s7.png").read_bytes()


@pytest.mark.parametrize("make", ["rgba", "i16", "palette", "grey", "large", "tiny"])
def test_any_condition_image_is_converted(fp32_export, edge_png, tmp_path, make):
    base = Image.open(edge_png).convert("L")
    img = {"rgba": lambda: base.convert("RGBA"), "i16": lambda: base.point(lambda v: v * 257, "I").convert("I;16"),
           "palette": lambda: base.convert("P"), "grey": lambda: base,
           "large": lambda: base.resize((300, 200)), "tiny": lambda: base.resize((16, 16))}[make]()
    path = tmp_path / f"cond_{make}.png"
    img.save(path)
    cond = prepare_condition(read_image(path), ControlSpec(resolution=64), extract=False)
    assert cond.shape == (64, 64, 3) and cond.dtype == np.uint8 and set(np.unique(cond)) <= {0, 255}
    if make in ("rgba", "i16", "palette", "grey"):
        assert np.array_equal(cond[..., 0], np.asarray(base))
    code, out = invoke(["--engine", fp32_export.folder, "--cond", path, "--out", tmp_path / "o.png"])
    assert code == 0, out


def test_photos_get_their_edges_extracted(fp32_export, tmp_path):
    from ecm.data.datasets import ProceduralShapes

    photo = tmp_path / "photo.png"
    Image.fromarray(ProceduralShapes(size=1, resolution=64, seed=1000)[0][0]).save(photo)
    code, out = invoke(["--engine", fp32_export.folder, "--cond", photo, "--control", "canny",
                        "--out", tmp_path / "o.png"])
    assert code == 0, out


@pytest.fixture
def broken_copy(fp32_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(fp32_export.folder, folder)
    return folder


def test_truncated_graph(broken_copy, edge_png, tmp_path):
    onnx_path = broken_copy / "var_ecm.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:5000])
    code, out = invoke(["--engine", broken_copy, "--cond", edge_png, "--out", tmp_path / "o.png"])
    assert code == 2 and "cannot load" in out and "re-export" in out and "Traceback" not in out


def test_manifest_of_another_version(broken_copy, edge_png, tmp_path):
    path = broken_copy / MANIFEST_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 0}))
    code, out = invoke(["--engine", broken_copy, "--cond", edge_png, "--out", tmp_path / "o.png"])
    assert code == 2 and "schema version 0" in out and "re-export" in out


def test_plan_without_tensorrt(broken_copy, edge_png, tmp_path):
    (broken_copy / "var_ecm.plan").write_bytes(b"not a plan")
    code, out = invoke(["--engine", broken_copy / "var_ecm.plan", "--cond", edge_png, "--out", tmp_path / "o.png"])
    assert code == 2 and ("TensorRT is not installed" in out or "no TensorRT plans" in out)


@pytest.mark.parametrize("args, message", [
    (["--engine", "/nonexistent/var_ecm.onnx"], "does not exist"),
    (["--class", "8"], "--class 8 is out of range: this model has 8 classes"),
    (["--control", "folder:depth"], "this engine's adapters follow 'canny'"),
    (["--control", "depth"], "unknown control type 'depth'; choose one of canny"),
    (["--top-k", "-3"], "top-k -3"),
    (["--temperature", "hot"], "temperature"),
    (["--out", "/proc/forbidden/o.png"], "cannot write"),
    (["--seed", "-1"], "-1 is not in the range"),
])
def test_bad_arguments(fp32_export, edge_png, tmp_path, args, message):
    full = ["--engine", fp32_export.folder, "--cond", edge_png, "--out", tmp_path / "o.png", *args]
    code, out = invoke(full)
    assert code == 2 and message in out and "Traceback" not in out


def test_not_an_image_and_no_condition(fp32_export, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("this is text")
    code, out = invoke(["--engine", fp32_export.folder, "--cond", junk, "--out", tmp_path / "o.png"])
    assert code == 2 and "cannot read" in out and "junk.png" in out
    code, out = invoke(["--engine", fp32_export.folder, "--out", tmp_path / "o.png"])
    assert code == 2 and "pass --cond" in out


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnx_runtime(fp32_export, edge_png, tmp_path):
    from ecm.export.tensorrt import build_plans, missing_tensorrt

    reason = missing_tensorrt()
    if reason is not None:
        pytest.skip(f"the TensorRT backend needs a GPU and TensorRT: {reason}")
    folder = tmp_path / "export"
    shutil.copytree(fp32_export.folder, folder)
    build_plans(folder, progress=lambda _: None)
    code, out = invoke(["--engine", folder / "var_ecm.plan", "--cond", edge_png, "--out", tmp_path / "trt.png", "-v"])
    assert code == 0, out
    code, out = invoke(["--engine", folder / "var_ecm.onnx", "--cond", edge_png, "--out", tmp_path / "ort.png"])
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png")).astype(int) for k in ("trt", "ort"))
    assert np.abs(a - b).mean() < 8  # fp32 plans: same tokens except rare near-ties


@pytest.mark.slow
def test_the_three_commands_of_the_workflow(tmp_path, monkeypatch):
    """In an empty folder: ecm-train --control canny, ecm-export --precision fp16, ecm-run (minutes)."""
    from ecm.runtime.controls import canny_edges

    from ecm.cli.export import main as export
    from ecm.cli.train import train
    from ecm.data.datasets import ProceduralShapes

    monkeypatch.chdir(tmp_path)
    Image.fromarray(canny_edges(ProceduralShapes(size=1, resolution=64, seed=1000)[0][0])).save("edge.png")
    outputs = []
    for cmd, args in [(train, ["--control", "canny"]), (export, ["--precision", "fp16"]),
                      (run_cli, ["--engine", "var_ecm.onnx", "--cond", "edge.png"])]:
        result = CliRunner().invoke(cmd, args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "latest ecm-train result" in outputs[1] and "wrote ecm_run.png" in outputs[2]
    assert np.asarray(Image.open("ecm_run.png")).shape == (64, 64, 3)


def test_previews_come_from_the_latent_without_the_decoder(fp32_export, edge_png):
    from ecm.runtime.engine import open_engine
    from ecm.runtime.loop import Sampling, ScaleLoop, latent_preview

    m = fp32_export.manifest
    assert m.preview is not None and len(m.preview) == m.latent_channels + 1  # fitted on the export's references
    cond = prepare_condition(read_image(edge_png), m.control)
    seen = []
    with open_engine(fp32_export.folder)[1] as backend:
        traj = ScaleLoop(m, backend, 1).run(np.array([2]), cond[None], Sampling.defaults(m), record=True,
                                            on_scale=lambda si, images: seen.append((si, images)))
    assert [si for si, _ in seen] == list(range(m.num_scales))
    assert all(images.shape == (1, m.image_size, m.image_size, 3) for _, images in seen)
    assert np.array_equal(seen[-1][1], latent_preview(traj.f_hat, m.preview, m.image_size))
    assert not np.array_equal(seen[0][1], seen[-1][1])  # each scale shows its own latent
