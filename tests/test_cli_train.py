"""ecm-train / ecm-eval / ecm-pretrain on bad input: one clear line and a non-zero exit."""

import pytest
from click.testing import CliRunner

from ecm.cli.eval import evaluate
from ecm.cli.params import params
from ecm.cli.train import pretrain, train


def invoke(cmd, args):
    result = CliRunner().invoke(cmd, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("args, message", [
    (["--control", "dpeth"], "unknown control type 'dpeth'"),
    (["--data", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--control", "folder:depth"], "--control folder:depth needs --control-dir"),
    (["--var", "/nonexistent.pth"], "checkpoint /nonexistent.pth does not exist"),
])
def test_train_bad_input(tmp_path, args, message):
    code, out = invoke(train, [*args, "--out", str(tmp_path / "run")])
    assert code == 2 and f"error: {message}" in out and "Traceback" not in out


def test_train_refuses_to_overwrite_or_resume_nothing(tmp_path):
    code, out = invoke(train, ["--out", str(tmp_path), "--resume"])
    assert code == 2 and "nothing to resume" in out
    (tmp_path / "train_state.pt").write_bytes(b"")
    code, out = invoke(train, ["--out", str(tmp_path)])
    assert code == 2 and "already holds a training run" in out


def test_train_on_an_empty_image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    code, out = invoke(train, ["--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "run")])
    assert code == 2 and "no images" in out


def test_eval_with_a_foreign_adapter_file(tmp_path):
    junk = tmp_path / "ecm.safetensors"
    junk.write_bytes(b"junk")
    code, out = invoke(evaluate, ["--ecm", str(junk), "--num-images", "2", "--grid", str(tmp_path / "g.png")])
    assert code == 2 and "truncated or corrupt" in out


def test_pretrain_unknown_preset(tmp_path):
    code, out = invoke(pretrain, ["--var-preset", "d99", "--out", str(tmp_path / "bb")])
    assert code == 2 and "unknown VAR preset 'd99'" in out


def test_params_reports_d16_under_ten_percent():
    code, out = invoke(params, ["--preset", "d16"])
    share = float(out.splitlines()[1].split()[3].rstrip("%"))
    assert code == 0 and share <= 10.0


def test_train_then_resume_then_eval(tmp_path):
    import json

    from PIL import Image

    run = tmp_path / "run"
    base = ["--steps", "2", "--batch", "4", "--num-images", "16", "--out", str(run)]
    code, out = invoke(train, base)
    assert code == 0, out
    assert (run / "ecm.safetensors").is_file() and (run / "run.json").is_file()
    code, out = invoke(train, [*base[:1], "3", *base[2:], "--resume"])
    assert code == 0, out
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    grid, js = tmp_path / "grid.png", tmp_path / "eval.json"
    code, out = invoke(evaluate, ["--ecm", str(run / "ecm.safetensors"), "--num-images", "2", "--grid", str(grid),
                                  "--json", str(js)])
    assert code == 0, out
    assert "canny F1 on 2 held-out images" in out
    figures = json.loads(js.read_text())
    assert figures["metric"] == "F1" and 0 <= figures["ecm"] <= 1 and figures["ground_truth"] == 1.0
    assert Image.open(grid).size[0] == 4 * 64 * 3
