"""What a new user hit following the README (issue 13): one test per defect, named after it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ecm.calibration import CalibOptions, export_int8
from ecm.calibration.record import calibration_set
from ecm.export.onnx_files import load_onnx, save_onnx
from ecm.export.pipeline import ExportOptions, Models
from ecm.export.verify import compare, eager_reference
from ecm.runtime import controls
from ecm.runtime.controls import canny_edges, control_type, to_rgb_map
from ecm.runtime.errors import ECMError
from ecm.runtime.files import file_sha256
from ecm.runtime.images import preprocess, read_image
from ecm.runtime.manifest import MANIFEST_NAME, Manifest
from onnx import numpy_helper
from PIL import Image

from ecm.cli.eval import evaluate as eval_cli
from ecm.cli.export import main as export_cli
from ecm.cli.export import resolve_checkpoints
from ecm.cli.run import load_conditions
from ecm.cli.run import main as run_cli
from ecm.cli.train import train as train_cli
from ecm.data.controls import Control
from ecm.data.datasets import ImageFolder, ProceduralShapes
from ecm.model.checkpoint import save_model
from ecm.model.embedded import default_paths, load_backbone
from ecm.model.sampler import flip_margins, sample_tokens

PHOTO = Path(__file__).parent / "data" / "photos" / "chelsea.jpg"  # 289 x 192, CC0 (see data/photos/README.md)
QUIET = dict(progress=lambda _: None)


def invoke(cmd, args):
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------ 1
def test_int8_export_into_a_folder_holding_an_export(fp32_export, tiny_pair, tiny_ecm, tmp_path, monkeypatch):
    """An fp32 export in the current folder, then a weight-only INT8 export into it: onnx resolved the weights
    file against the current directory, found the earlier one and crashed; now it replaces that export."""
    used = tmp_path / "used"
    shutil.copytree(fp32_export.folder, used)
    monkeypatch.chdir(used)
    export_int8(Models(tiny_pair[1], tiny_ecm), Path("."), ExportOptions(verify=False),
                CalibOptions(activations="fp16", report_images=1), **QUIET)
    m = Manifest.load(used)
    assert m.precision == "int8" and (used / "var_ecm.cpu.onnx.data").is_file()
    assert not list(used.glob("var_ecm.s*.onnx*"))  # the static graphs of the export it replaced are gone
    assert {p.name for p in used.glob("*.onnx")} == set(m.graphs.values())
    edges = tmp_path / "edges.png"
    Image.fromarray(canny_edges(ProceduralShapes(1, 64, seed=1)[0][0])).save(edges)
    code, out = invoke(run_cli, ["--engine", used, "--cond", edges, "--out", tmp_path / "o.png"])
    assert code == 0 and "int8 (CPU form)" in out, out


def test_weights_files_are_written_beside_the_graph_whatever_the_current_directory(tmp_path, monkeypatch):
    import onnx
    from onnx import helper

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    (tmp_path / "m.onnx.data").write_bytes(b"an earlier file of that name here")
    monkeypatch.chdir(tmp_path)
    save_onnx(helper.make_model(graph), tmp_path / "sub" / "m.onnx")
    assert (tmp_path / "sub" / "m.onnx.data").stat().st_size == 4096 * 4
    assert np.array_equal(numpy_helper.to_array(load_onnx(tmp_path / "sub" / "m.onnx").graph.initializer[0]),
                          numpy_helper.to_array(w))


# ------------------------------------------------------------------------------------ 2
def rotated_copy(upright: Image.Image, path: Path) -> None:
    """Store ``upright`` turned a quarter anticlockwise with EXIF orientation 6, as a phone does."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.rotate(90, expand=True).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_wherever_an_image_is_read(fp32_export, tmp_path):
    upright = Image.open(PHOTO).convert("RGB")
    for name in ("train", "upright", "maps", "conds"):
        (tmp_path / name).mkdir()
    upright.save(tmp_path / "upright" / "cat.jpg", quality=95)
    rotated_copy(upright, tmp_path / "train" / "cat.jpg")
    assert Image.open(tmp_path / "train" / "cat.jpg").size == (192, 289)  # stored sideways

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 3

    assert read_image(tmp_path / "train" / "cat.jpg").size == (289, 192)
    # training data
    assert close(ImageFolder(tmp_path / "train", 64)[0][0], ImageFolder(tmp_path / "upright", 64)[0][0])
    # control maps paired from a folder
    rotated_copy(upright, tmp_path / "maps" / "cat.jpg")
    ctrl = Control("folder:photo", tmp_path / "maps", resolution=64)
    assert close(ctrl(None, tmp_path / "train" / "cat.jpg"), preprocess(upright, 64))
    # ecm-run and calibration conditions: an edge map photographed sideways
    edges = Image.fromarray(canny_edges(np.asarray(upright)))
    edges.save(tmp_path / "edges.png")
    rotated_copy(edges, tmp_path / "conds" / "edges.jpg")
    m = Manifest.load(fp32_export.folder)
    got = load_conditions((tmp_path / "conds" / "edges.jpg",), m, None)[0]["canny"]
    want = load_conditions((tmp_path / "edges.png",), m, None)[0]["canny"]
    assert (got == want).mean() > 0.97


# ------------------------------------------------------------------------------------ 3
def test_a_photo_is_not_silently_used_as_an_edge_map(fp32_export, tmp_path):
    engine, out = fp32_export.folder, tmp_path / "o.png"
    code, msg = invoke(run_cli, ["--engine", engine, "--cond", PHOTO, "--out", out])
    assert code == 2 and "chelsea.jpg does not look like a canny map" in msg
    assert "--control canny" in msg and "--raw-cond" in msg and not out.exists()
    for extra in (["--control", "canny"], ["--raw-cond"]):
        code, msg = invoke(run_cli, ["--engine", engine, "--cond", PHOTO, "--out", out, *extra])
        assert code == 0, msg
    # real edge maps pass: as PNG, as JPEG, enlarged, and shrunk
    edges = Image.fromarray(canny_edges(np.asarray(Image.open(PHOTO).convert("RGB"))))
    variants = {"e.png": edges, "e.jpg": edges, "big.png": edges.resize((600, 400), Image.BICUBIC),
                "small.png": edges.resize((144, 96), Image.LANCZOS)}
    for name, img in variants.items():
        img.save(tmp_path / name)
        code, msg = invoke(run_cli, ["--engine", engine, "--cond", tmp_path / name, "--out", out])
        assert code == 0, (name, msg)


# ------------------------------------------------------------------------------------ 4
SOBEL = '''
import cv2


def sobel(img_HW3):
    g = cv2.cvtColor(img_HW3, cv2.COLOR_RGB2GRAY)
    return cv2.convertScaleAbs(cv2.Sobel(g, cv2.CV_16S, 1, 1, ksize=3))
'''


def plugin_package(root: Path, name: str) -> Path:
    """An installed package (module + dist-info) declaring control ``name`` in the entry-point group ecm.controls."""
    module = f"{name}_plugin"
    (root / f"{module}.py").write_text(SOBEL)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ecm.controls]\n{name} = {module}:sobel\n")
    return root


@pytest.fixture
def sobel_plugin(tmp_path_factory, monkeypatch):
    """Control 'sobel_ep', declared on the fly by a package on sys.path."""
    root = plugin_package(tmp_path_factory.mktemp("site"), "sobel_ep")
    monkeypatch.syspath_prepend(str(root))
    yield "sobel_ep"
    controls._REGISTRY.pop("sobel_ep", None)
    if "sobel_ep" in controls._plugins:
        controls._plugins.remove("sobel_ep")


def test_a_plugin_control_reaches_every_cli(sobel_plugin, fp32_export, tiny_pair, tiny_ecm, tmp_path):
    name = sobel_plugin
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    import sobel_ep_plugin

    assert np.array_equal(control_type(name).extract(photo), to_rgb_map(sobel_ep_plugin.sobel(photo)))
    # ecm-train and ecm-eval
    run = tmp_path / "run"
    code, out = invoke(train_cli, ["--control", name, "--steps", 1, "--batch", 2, "--num-images", 4, "--out", run])
    assert code == 0, out
    code, out = invoke(eval_cli, ["--ecm", run / "ecm.safetensors", "--num-images", 2, "--grid", tmp_path / "g.png"])
    assert code == 0 and f"{name} map RMSE on 2 held-out images" in out, out
    # an export of such adapters: its calibration (and verification) conditions come from the plug-in
    engine = tmp_path / "engine"
    shutil.copytree(fp32_export.folder, engine)
    manifest = json.loads((engine / MANIFEST_NAME).read_text())
    manifest["controls"][0]["type"] = name
    (engine / MANIFEST_NAME).write_text(json.dumps(manifest))
    m = Manifest.load(engine)
    cset = calibration_set(tiny_pair[1], tiny_ecm, m, None, tmp_path / "cache", samples=2, batch=2, **QUIET)
    recorded = np.load(cset.batch_files[0])["cond"]
    shapes = ProceduralShapes(2, 64, seed=2000)
    assert np.array_equal(recorded[1], to_rgb_map(sobel_ep_plugin.sobel(shapes[1][0])))
    # ecm-run extracts the plug-in's map from a photo
    code, out = invoke(run_cli, ["--engine", engine, "--cond", PHOTO, "--control", name, "--out", tmp_path / "o.png"])
    assert code == 0, out
    code, out = invoke(run_cli, ["--engine", engine, "--cond", PHOTO, "--control", "sobl", "--out", tmp_path / "o.png"])
    assert code == 2 and "unknown control type 'sobl'" in out and "ecm.controls" in out


@pytest.mark.slow
def test_a_pip_installed_plugin_control_works_from_the_command_line(tmp_path):
    """The same through the console scripts in fresh processes: train, export with INT8 calibration, run."""
    env = {**os.environ, "PYTHONPATH": str(plugin_package(tmp_path, "sobel_cli"))}
    bin_ = Path(sys.executable).parent

    def run(*args: str) -> str:
        r = subprocess.run([str(bin_ / args[0]), *args[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout + r.stderr

    run("ecm-train", "--control", "sobel_cli", "--steps", "2", "--batch", "4", "--num-images", "8")
    out = run("ecm-export", "--precision", "int8", "--int8-activations", "int8", "--calib-samples", "2",
              "--calib-batch", "2", "--report-images", "1", "--no-build", "--out", "engine")
    assert "latest ecm-train result" in out and Manifest.load(tmp_path / "engine").control.type == "sobel_cli"
    run("ecm-run", "--engine", "engine", "--cond", str(PHOTO), "--control", "sobel_cli")


# ------------------------------------------------------------------------------------ 5
def test_calibration_cycles_a_small_folder_of_maps(fp32_export, tiny_pair, tiny_ecm, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for i, seed in enumerate((1, 2)):
        img = ProceduralShapes(1, 64, seed=seed)[0][0]
        Image.fromarray(canny_edges(img)).save(maps / f"m{i}.png")
    said: list[str] = []
    m = Manifest.load(fp32_export.folder)
    cset = calibration_set(tiny_pair[1], tiny_ecm, m, maps, tmp_path / "cache", samples=5, batch=2,
                           progress=said.append)
    assert cset.meta.samples == 5 and len(cset.batch_files) == 3
    assert any("2 condition map(s)" in s and "5 calibration samples" in s and "other seeds and classes" in s
               for s in said), said
    batches = [np.load(p) for p in cset.batch_files]
    conds = np.concatenate([b["cond"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    which = [int(np.array_equal(c, conds[1])) for c in conds]  # map 0 or map 1
    assert which == [0, 1, 0, 1, 0]
    assert len({(w, int(lab)) for w, lab in zip(which, labels)}) == 5  # a repeated map gets another class
    uniforms = np.concatenate([b["u0"] for b in batches])
    assert len(set(uniforms.ravel().tolist())) == 5  # and its own seed


# ------------------------------------------------------------------------------------ 6
def test_export_and_eval_use_the_backbone_the_adapters_were_trained_on(tmp_path, monkeypatch):
    """Adapters trained on a backbone stored elsewhere: ecm-export / ecm-eval --ecm find it through run.json,
    checked by its hash; once those files are gone, one line names them."""
    vae, var = load_backbone()
    bb = tmp_path / "backbone"
    save_model(vae, bb / "vae.safetensors", "vqvae", vae.config)  # fp32: other bytes than the embedded fp16
    save_model(var, bb / "var.safetensors", "var", var.config)
    monkeypatch.chdir(tmp_path)
    code, out = invoke(train_cli, ["--vae", "backbone/vae.safetensors", "--var", "backbone/var.safetensors",
                                   "--steps", 1, "--batch", 2, "--num-images", 4, "--out", "run"])
    assert code == 0, out
    adapters = tmp_path / "run" / "ecm.safetensors"
    _, vae_path, var_path, _ = resolve_checkpoints((adapters,), None, None, True)
    assert (vae_path, var_path) == (bb / "vae.safetensors", bb / "var.safetensors")
    assert file_sha256(var_path) != file_sha256(default_paths()[1])
    code, out = invoke(eval_cli, ["--ecm", adapters, "--num-images", 1, "--grid", tmp_path / "g.png"])
    assert code == 0, out
    (bb / "var.safetensors").unlink()
    code, out = invoke(export_cli, ["--ecm", adapters, "--out", tmp_path / "exp"])
    assert code == 2 and f"{bb / 'var.safetensors'} is gone" in out and "--vae and --var" in out
    assert "Traceback" not in out and not (tmp_path / "exp" / MANIFEST_NAME).exists()


# ------------------------------------------------------------------------------------ 7
def test_flip_margins_measure_how_close_a_draw_was_to_another_token():
    logits_2BlV = torch.tensor([[[3.0, 2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])  # cond row, uncond row
    probs = logits_2BlV[0, 0].softmax(0).double()
    kw = dict(cfg_t=0.0, temperature=1.0, top_k=0, top_p=0.0)
    for u, margin in ((probs[0] - 1e-3, "small"), (probs[0] / 2, "large")):
        u_Bl = torch.tensor([[float(u)]])
        got = sample_tokens(logits_2BlV, u_Bl, **kw)
        assert int(got) == 0
        m = float(flip_margins(logits_2BlV, u_Bl, got, torch.tensor([[1]]), **kw))
        assert (m < 0.01) if margin == "small" else (m == pytest.approx(0.5))  # the two logits lie 1.0 apart
        # the margin is what it says: that much change of the logits flips the draw, a little less does not
        for d, flips in ((m * 1.01, True), (m * 0.99, False)):
            shifted = logits_2BlV.clone()
            shifted[0, 0, 0] -= d
            shifted[0, 0, 1:] += d
            assert (int(sample_tokens(shifted, u_Bl, **kw)) == 1) is flips
    same = flip_margins(logits_2BlV, torch.tensor([[0.5]]), torch.tensor([[0]]), torch.tensor([[0]]), **kw)
    assert float(same) == 0


def test_the_check_line_tells_near_ties_from_a_broken_export(fp16_export, fp32_export, tiny_pair, tiny_ecm,
                                                             tmp_path):
    line = fp16_export.report.summary()
    assert line.split(": ", 1)[1].startswith("teacher-forced top-1")
    d = fp16_export.report.divergence
    assert d is not None and d.only_near_ties, line  # random weights: flat logits, fp16 flips near-ties
    assert "all on near-ties" in line and "not an export fault" in line
    broken = tmp_path / "broken"
    shutil.copytree(fp32_export.folder, broken)
    model = load_onnx(broken / "var_ecm.onnx")
    bias = next(t for t in model.graph.initializer if t.name == "var.head.bias")
    noise = np.random.default_rng(0).normal(0, 0.5, numpy_helper.to_array(bias).shape).astype(np.float32)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + noise, bias.name))
    save_onnx(model, broken / "var_ecm.onnx")
    m = Manifest.load(broken)
    report, _ = compare(broken, eager_reference(tiny_pair[1], tiny_ecm, m, 4))
    assert report.min_teacher_agreement < 0.9 and not report.divergence.only_near_ties
    assert "beyond fp32 rounding" in report.summary()


# ------------------------------------------------------------------------------------ 8
def test_training_shows_its_data_preparation(tmp_path):
    code, out = invoke(train_cli, ["--steps", 1, "--batch", 2, "--num-images", 6, "--out", tmp_path / "run"])
    assert code == 0, out
    prep = out.find("preparing data (images, control maps, tokens)")
    assert prep >= 0 and "6/6" in out[prep:] and out.find("ecm-canny") > prep


def test_an_unreadable_plugin_is_one_line(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    (root / "broken_ctl.py").write_text("raise ImportError('needs a library that is not installed')\n")
    info = root / "broken_ctl-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken_ctl\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ecm.controls]\nbroken = broken_ctl:fn\n")
    monkeypatch.syspath_prepend(str(root))
    try:
        with pytest.raises(ECMError, match=r"control plug-in 'broken'.*failed to load.*needs a library"):
            control_type("nothing-declares-this")
    finally:
        controls._plugins.remove("broken")
