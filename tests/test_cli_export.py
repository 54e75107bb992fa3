"""ecm-export from the command line: defaults, the latest training run, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from ecm.runtime.files import file_sha256
from ecm.runtime.manifest import MANIFEST_NAME, Manifest

from ecm.cli.export import main as export
from ecm.model.embedded import default_paths


def invoke(args):
    result = CliRunner().invoke(export, args)
    return result.exit_code, result.output


def test_export_picks_the_latest_training_run(tmp_path, monkeypatch):
    """With no checkpoint arguments, the newest runs/*/ecm.safetensors here is exported, on the backbone its
    run.json records (here an fp32 copy of the embedded one stored elsewhere: other bytes, same weights)."""
    from ecm.model.checkpoint import save_model
    from ecm.model.embedded import load_backbone

    vae, var = load_backbone()
    save_model(vae, tmp_path / "bb" / "vae.safetensors", "vqvae", vae.config)
    save_model(var, tmp_path / "bb" / "var.safetensors", "var", var.config)
    run = tmp_path / "runs" / "ecm-canny"
    run.mkdir(parents=True)
    shutil.copy(default_paths()[2], run / "ecm.safetensors")
    (run / "run.json").write_text(json.dumps({"command": "ecm-train", "vae": str(tmp_path / "bb" / "vae.safetensors"),
                                              "var": str(tmp_path / "bb" / "var.safetensors")}))
    monkeypatch.chdir(tmp_path)
    code, out = invoke(["--precision", "fp32", "--no-build"])
    assert code == 0, out
    assert "latest ecm-train result" in out and "runs/ecm-canny/ecm.safetensors" in out
    m = Manifest.load(tmp_path)
    assert m.sources["ecm"] == file_sha256(run / "ecm.safetensors") and m.precision == "fp32"
    assert m.sources["var"] == file_sha256(tmp_path / "bb" / "var.safetensors") != file_sha256(default_paths()[1])
    assert m.control.type == "canny" and (tmp_path / "var_ecm.verify.json").is_file()
    assert "ONNX Runtime vs eager" in out and "free-running tokens identical at every scale" in out
    assert "device memory (fp32): weights" in out and "batch 8:" in out and "fits Orin Nano 8GB" in out


@pytest.mark.parametrize("args, message", [
    (["--ecm", "/nonexistent/ecm.safetensors"], "does not exist"),
    (["--var", "/nonexistent/var.pth"], "does not exist"),
    (["--opset", "23"], "opset 23 is not supported"),
    (["--build-only", "."], "no manifest"),
    (["--calib", "."], "--calib calibrates INT8 exports"),
    (["--precision", "int8", "--calib", "/nonexistent/maps"], "does not exist or is not a folder"),
    (["--precision", "int8", "--calib", "."], "holds no images"),
    (["--precision", "int8", "--int8-activations", "fp16", "--calib", "."], "--calib has no use"),
])
def test_bad_arguments_give_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out = invoke(args)
    assert code == 2 and "error: " in out and message in out and "Traceback" not in out


def test_adapters_of_another_backbone_are_refused(tmp_path):
    from ecm.model.adapters import load_ecm, save_ecm

    ecm, _ = load_ecm(default_paths()[2])
    foreign = tmp_path / "foreign.safetensors"
    save_ecm(ecm, foreign, backbone_hash="0123456789abcdef", control="canny", step=1)
    code, out = invoke(["--ecm", str(foreign), "--out", str(tmp_path / "out")])
    assert code == 2 and "trained on backbone 0123456789abcdef" in out
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = invoke(["--out", str(blocker / "sub"), "--no-build"])
    assert code == 2 and "cannot write" in out and "Traceback" not in out


def test_unknown_precision_is_refused():
    code, out = invoke(["--precision", "fp8"])
    assert code == 2 and "fp8" in out
