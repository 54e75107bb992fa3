"""Reliability: every CLI on bad arguments and bad files, interrupted training and export, long and concurrent runs.

Each failure mode must end in one ``error: ...`` line and a non-zero exit, or in a recovery: never in a
traceback, a lost or corrupt checkpoint, or a half-written artifact taken for a valid one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ecm.runtime.manifest import MANIFEST_NAME, Manifest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ecm.cli.eval import evaluate
from ecm.cli.export import main as export_cli
from ecm.cli.params import params
from ecm.cli.run import main as run_cli
from ecm.cli.train import pretrain, train
from ecm.model.adapters import load_ecm
from ecm.model.embedded import default_paths

#: ``python -c RUN args...`` is ``ecm-run args...`` without relying on the console script being on PATH.
RUN = "from ecm.cli.run import main; main()"
#: Runs ``module.command(args)`` and SIGKILLs the process the instant a file would be renamed onto ``target``
#: (the ``nth`` time): the worst moment for an atomic write (everything written, nothing committed) or between
#: two of them.
KILL_ON_RENAME = r"""
import os, signal, sys
target, nth, module, command = sys.argv[1:5]
del sys.argv[1:5]
real_replace, seen = os.replace, []
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(os.fsdecode(dst)) == target:
        seen.append(dst)
        if len(seen) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
getattr(__import__(module, fromlist=[command]), command)(sys.argv[1:])
"""


# ------------------------------------------------------------------------------------ helpers
def invoke(cmd, args) -> tuple[int, str]:
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    return result.exit_code, result.output


def assert_error(code: int, out: str, message: str) -> None:
    """Exit 2 with exactly one ``error: ...`` line that holds ``message``, and no traceback."""
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out


def assert_usage_error(code: int, out: str, message: str) -> None:
    """click's own refusal of an option value: exit 2, the option named, no traceback."""
    assert code == 2 and "Error: Invalid value" in out and message in out and "Traceback" not in out, out


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares ``width x height`` pixels but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` (hidden export staging excluded) -> (inode, mtime): what 'untouched' means."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".ecm-export-")}


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of an export folder made of hard links: instant, and the original stays as it was."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def own(path: Path) -> Path:
    """Give ``path`` (a hard link into a shared fixture) its own bytes before damaging it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def truncate(path: Path) -> None:
    own(path).write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_manifest(folder: Path, recompute: bool = False, **fields) -> None:
    """Change manifest fields: by hand (recorded shapes dropped), or as ecm-export would write another model."""
    if recompute:
        m = Manifest.load(folder)
        for k, v in fields.items():
            setattr(m, k, v)
        d = m.to_dict()
    else:
        d = {k: v for k, v in json.loads((folder / MANIFEST_NAME).read_text()).items() if k != "scales"}
        d.update(fields)
    own(folder / MANIFEST_NAME).write_text(json.dumps(d))


def run_process(*args, **kw) -> subprocess.CompletedProcess:
    """``ecm-run`` in a process of its own, arguments passed as bytes so that any file name survives."""
    argv = [sys.executable, "-c", RUN, *(os.fsencode(a) if isinstance(a, (str, bytes, Path)) else str(a).encode()
                                        for a in args)]
    return subprocess.run(argv, capture_output=True, timeout=600, **kw)


def killed_on_rename(target: Path, module: str, command: str, *args, cwd: Path | None = None, nth: int = 1) -> str:
    """Run ``module.command`` in a process that is SIGKILLed when a file is renamed onto ``target`` the ``nth``
    time."""
    argv = [sys.executable, "-c", KILL_ON_RENAME, os.path.abspath(target), str(nth), module, command,
            *map(str, args)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad files of every kind next to a good 64 px condition; checkpoints damaged in their shapes too."""
    d = tmp_path_factory.mktemp("files")
    arr = np.zeros((64, 64), np.uint8)
    arr[12:50, 20] = arr[12:50, 44] = arr[12, 20:45] = arr[49, 20:45] = 255
    Image.fromarray(arr).save(d / "edge.png")
    png = (d / "edge.png").read_bytes()
    vae_path, var_path, ecm_path = default_paths()
    contents = {
        "empty.png": b"", "cut.png": png[: len(png) // 2], "text.png": b"just some text\n",
        "bomb.png": png_header(20000, 20000),
        "empty.safetensors": b"", "cut.safetensors": ecm_path.read_bytes()[:100_000], "png.safetensors": png,
        "empty.pth": b"", "text.pth": b"just some text\n",
    }
    for name, data in contents.items():
        (d / name).write_bytes(data)
    for name, src, key in (("var_shape.safetensors", var_path, "head.bias"), ("ecm_shape.safetensors", ecm_path, None)):
        with safe_open(str(src), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        key = key or sorted(tensors)[0]
        tensors[key] = torch.zeros(tensors[key].numel() + 1, dtype=tensors[key].dtype)  # one value too many
        save_file(tensors, str(d / name), metadata=meta)
    Image.fromarray(np.full((1, 200_000), 255, np.uint8)).save(d / "strip.png")  # 1 x 200000: a few hundred bytes
    paths = {p.name: p for p in d.iterdir()}
    paths.update({"vae": vae_path, "var": var_path, "ecm": ecm_path, "missing.png": d / "missing.png", "dir": d})
    for name in ("empty.png", "cut.png", "bomb.png"):  # image folders holding one bad file
        (d / f"data-{name}").mkdir()
        shutil.copy(d / "edge.png", d / f"data-{name}" / "good.png")
        shutil.copy(d / name, d / f"data-{name}" / name)
        paths[f"data-{name}"] = d / f"data-{name}"
    return paths


# ------------------------------------------------------------------------------------ ecm-run
@pytest.mark.parametrize("name, message", [
    ("empty.png", "cannot read"), ("cut.png", "cannot read"), ("text.png", "cannot read"),
    ("bomb.png", "exceeds limit of"), ("missing.png", "does not exist"), ("data-bomb.png", "does not exist"),
])
def test_run_refuses_bad_condition_files(fp32_export, files, tmp_path, name, message):
    """Empty, truncated, non-image, decompression-bomb, missing and folder conditions: one line, no output."""
    code, out = invoke(run_cli, ["--engine", fp32_export.folder, "--cond", files[name], "--out", tmp_path / "o.png"])
    assert_error(code, out, message)
    assert str(files[name].name) in out and not (tmp_path / "o.png").exists()


def _swap_decoder_for_control(f: Path) -> None:
    (f / "var_ecm.decoder.onnx").unlink()
    shutil.copy(f / "var_ecm.control.onnx", f / "var_ecm.decoder.onnx")


ENGINE_DAMAGE = {
    "no manifest": (lambda f: (f / MANIFEST_NAME).unlink(), "has no var_ecm.json"),
    "empty manifest": (lambda f: own(f / MANIFEST_NAME).write_bytes(b""), "cannot read manifest"),
    "truncated manifest": (lambda f: truncate(f / MANIFEST_NAME), "cannot read manifest"),
    "non-UTF-8 manifest": (lambda f: own(f / MANIFEST_NAME).write_bytes(b'{"a": "\xff"}'), "cannot read manifest"),
    "manifest not an object": (lambda f: own(f / MANIFEST_NAME).write_text("[1, 2]"), "not a JSON object"),
    "manifest graphs edited": (lambda f: edit_manifest(f, graphs=None), "invalid graphs None"),
    "manifest heads edited": (lambda f: edit_manifest(f, num_heads=0), "invalid num_heads 0"),
    "manifest sizes edited": (lambda f: edit_manifest(f, batch="1", top_k="x"), "invalid batch '1'"),
    "manifest of another model": (lambda f: edit_manifest(f, True, vocab_size=1024), "does not fit the manifest"),
    "manifest of another precision": (lambda f: edit_manifest(f, True, precision="fp16"), "does not fit the manifest"),
    "graph of another role": (_swap_decoder_for_control, "does not fit the manifest"),
    "weights truncated": (lambda f: truncate(f / "var_ecm.onnx.data"), "cannot load"),
    "weights empty": (lambda f: own(f / "var_ecm.control.onnx.data").write_bytes(b""), "cannot load"),
    "weights missing": (lambda f: (f / "var_ecm.decoder.onnx.data").unlink(), "cannot load"),
    "graph missing": (lambda f: (f / "var_ecm.decoder.onnx").unlink(), "is missing"),
    "graph empty": (lambda f: own(f / "var_ecm.onnx").write_bytes(b""), "cannot load"),
}


@pytest.mark.parametrize("damage", ENGINE_DAMAGE)
def test_run_refuses_damaged_engines(fp32_export, files, tmp_path, damage):
    """Engines with damaged, missing or mismatched files, and hand-edited manifests: one line, before any work."""
    folder = linked_copy(fp32_export.folder, tmp_path / "engine")
    hurt, message = ENGINE_DAMAGE[damage]
    hurt(folder)
    code, out = invoke(run_cli, ["--engine", folder, "--cond", files["edge.png"], "--out", tmp_path / "o.png"])
    assert_error(code, out, message)
    assert "re-export" in out or "ecm-export" in out
    assert not (tmp_path / "o.png").exists()


def test_run_refuses_engine_paths_of_the_wrong_type(fp32_export, files, tmp_path):
    """An image, an empty folder or a foreign file as --engine: one line each."""
    for engine, message in [(files["edge.png"], "no var_ecm.json"), (tmp_path, "no var_ecm.json"),
                            (fp32_export.folder / "golden", "no var_ecm.json"),
                            (fp32_export.folder / "var_ecm.verify.json", "is not part of the export")]:
        code, out = invoke(run_cli, ["--engine", engine, "--cond", files["edge.png"], "--out", tmp_path / "o.png"])
        assert_error(code, out, message)


@pytest.mark.parametrize("args, message", [
    (["--cfg", "nan"], "cfg nan must be a finite number"),
    (["--cfg", "inf"], "cfg inf must be a finite number"),
    (["--top-p", "nan"], "top-p nan"),
    (["--temperature", "1e-50"], "must be a number in [1e-06, 1e+06]"),
    (["--temperature", "1:0.8@\u00b2"], "switch after '@'"),
    (["-n", 10**9, "--batch", 10**9], "not enough memory for a batch of 1000000000"),
])
def test_run_refuses_bad_arguments(fp32_export, files, tmp_path, args, message):
    """Values that used to give silent garbage (NaN guidance, a temperature float32 rounds to 0), a traceback
    (superscript digits) or an out-of-memory traceback: one line each."""
    code, out = invoke(run_cli, ["--engine", fp32_export.folder, "--cond", files["edge.png"], "--out",
                                 tmp_path / "o.png", *args])
    assert_error(code, out, message)


@pytest.mark.parametrize("args, option", [
    (["--threads", 10**6], "--threads"), (["--threads", -1], "--threads"), (["--batch", 0], "--batch"),
    (["-n", 0], "--num-images"), (["--seed", "x"], "--seed"), (["--backend", "cuda"], "--backend"),
])
def test_run_refuses_out_of_range_options(fp32_export, files, tmp_path, args, option):
    """Thread counts that would hang ONNX Runtime while it starts a million threads, and other impossible values."""
    code, out = invoke(run_cli, ["--engine", fp32_export.folder, "--cond", files["edge.png"], "--out",
                                 tmp_path / "o.png", *args])
    assert_usage_error(code, out, option)


def test_a_batch_larger_than_the_run_is_cut_to_it(fp32_export, files, tmp_path):
    """--batch 100000 for one image allocates one image's buffers, and draws the same image as --batch 1."""
    for batch in (1, 100_000):
        code, out = invoke(run_cli, ["--engine", fp32_export.folder, "--cond", files["edge.png"], "--batch", batch,
                                     "--out", tmp_path / f"b{batch}.png"])
        assert code == 0, out
    assert (tmp_path / "b1.png").read_bytes() == (tmp_path / "b100000.png").read_bytes()


def test_run_with_non_utf8_paths(fp32_export, files, tmp_path):
    """File names that are not UTF-8 (any bytes are legal on Linux) work, and errors about them print in one line."""
    base = os.fsencode(tmp_path)
    cond, out = base + b"/cond-\xff\xfe.png", base + b"/out-\xff.png"
    try:
        shutil.copy(files["edge.png"], os.fsdecode(cond))
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    r = run_process("--engine", fp32_export.folder, "--cond", cond, "--out", out)
    assert r.returncode == 0 and os.path.isfile(out) and b"wrote" in r.stdout, r.stderr
    assert np.asarray(Image.open(os.fsdecode(out))).shape == (64, 64, 3)
    r = run_process("--engine", fp32_export.folder, "--cond", base + b"/missing-\xff.png", "--out", out)
    err = r.stderr.decode("utf-8", "replace")
    assert_error(r.returncode, err, "does not exist")
    assert "missing-" in err


def test_a_long_thin_strip_does_not_blow_up_in_memory(fp32_export, files, tmp_path):
    """A few hundred bytes of PNG declaring 1 x 200000 pixels used to be resized to 14 million x 72 (GBs)."""
    probe = ("import atexit; from ecm.runtime.memory import peak_rss_mb; "
             "atexit.register(lambda: print('peak', peak_rss_mb())); " + RUN)
    r = subprocess.run([sys.executable, "-c", probe, "--engine", str(fp32_export.folder), "--cond",
                        str(files["strip.png"]), "--out", str(tmp_path / "o.png")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    peak = float(r.stdout.split()[-1])
    assert peak < 600, f"peak resident memory {peak:.0f} MiB"
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (64, 64, 3)


# ------------------------------------------------------------------------------------ torch CLIs
@pytest.mark.parametrize("cmd, option, name, message", [
    (train, "--var", "empty.safetensors", "truncated or corrupt"),
    (train, "--var", "png.safetensors", "truncated or corrupt"),
    (train, "--vae", "empty.pth", "truncated or corrupt"),
    (train, "--vae", "text.pth", "truncated or corrupt"),
    (train, "--var", "ecm", "holds a ecm, not a var"),
    (train, "--vae", "var", "holds a var, not a vqvae"),
    (train, "--var", "var_shape.safetensors", "wrong shape head.bias"),
    (export_cli, "--ecm", "cut.safetensors", "truncated or corrupt"),
    (export_cli, "--ecm", "var", "not an ECM adapter checkpoint"),
    (export_cli, "--ecm", "ecm_shape.safetensors", "do not fit their own config"),
    (export_cli, "--var", "edge.png", "not a readable PyTorch checkpoint"),
    (export_cli, "--vae", "missing.png", "does not exist"),
    (evaluate, "--ecm", "empty.safetensors", "truncated or corrupt"),
    (evaluate, "--ecm", "vae", "not an ECM adapter checkpoint"),
])
def test_torch_clis_refuse_bad_checkpoints(files, tmp_path, cmd, option, name, message):
    """Empty, truncated, wrong-format, wrong-kind and wrong-shape checkpoints: one line, nothing written."""
    out_dir = tmp_path / "out"
    extra = {train: ["--out", out_dir], export_cli: ["--out", out_dir, "--no-build"],
             evaluate: ["--num-images", 1, "--grid", out_dir / "g.png"]}[cmd]
    code, out = invoke(cmd, [option, files[name], *extra])
    assert_error(code, out, message)
    assert not (out_dir / MANIFEST_NAME).exists() and not (out_dir / "g.png").exists()


@pytest.mark.parametrize("cmd, args, message", [
    (train, ["--data", "data-empty.png"], "cannot read image"),
    (train, ["--data", "data-cut.png"], "cannot read image"),
    (train, ["--data", "data-bomb.png"], "exceeds limit of"),
    (pretrain, ["--data", "data-bomb.png"], "exceeds limit of"),
    (evaluate, ["--data", "data-cut.png", "--num-images", 2], "cannot read image"),
    (train, ["--lr", "nan"], "learning rate nan must be a finite number > 0"),
    (train, ["--lr", "0"], "learning rate 0.0 must be a finite number > 0"),
    (pretrain, ["--var-lr", "-1"], "learning rate -1.0 must be a finite number > 0"),
    (evaluate, ["--cfg", "nan"], "cfg nan must be a finite number"),
    (evaluate, ["--top-p", "2"], "top-p 2.0 must lie in [0, 1]"),
    (evaluate, ["--top-k", "-2"], "top-k -2 must be >= 0"),
    (evaluate, ["--temperature", "0"], "temperature '0'"),
    (evaluate, ["--engine", "dir", "--num-images", 1], "no manifest"),
    (params, ["--preset", "d99"], "unknown VAR preset 'd99'"),
])
def test_torch_clis_refuse_bad_data_and_values(files, tmp_path, cmd, args, message):
    """Image folders with one bad file (empty, truncated, a decompression bomb) and impossible numbers."""
    args = [files.get(a, a) if isinstance(a, str) else a for a in args]
    extra = {train: ["--out", tmp_path / "run"], pretrain: ["--out", tmp_path / "run"],
             evaluate: ["--grid", tmp_path / "g.png"], params: []}[cmd]
    code, out = invoke(cmd, [*args, *extra])
    assert_error(code, out, message)
    assert not (tmp_path / "run" / "train_state.pt").exists() and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("cmd, option", [(train, "--seed"), (pretrain, "--seed"), (evaluate, "--seed")])
def test_negative_seeds_are_refused(tmp_path, cmd, option):
    """NumPy's seed sequences take no negative seed: refused up front instead of a traceback at step 1."""
    code, out = invoke(cmd, [option, -1, "--out" if cmd is not evaluate else "--grid", tmp_path / "x"])
    assert_usage_error(code, out, "-1 is not in the range x>=0")


def test_torch_clis_with_non_utf8_paths(files, tmp_path):
    """Non-UTF-8 folder and file names reach the messages intact (escaped) and fail in one line."""
    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/data-\xff"))
    try:
        data.mkdir()
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    shutil.copy(files["empty.png"], data / "bad.png")
    code, out = invoke(train, ["--data", data, "--out", Path(os.fsdecode(os.fsencode(tmp_path) + b"/run-\xfe"))])
    assert_error(code, out, "cannot read image")
    assert "bad.png" in out
    damaged = os.fsencode(tmp_path) + b"/ecm-\xff.safetensors"  # a real process: it echoes the path first
    shutil.copy(files["cut.safetensors"], os.fsdecode(damaged))
    r = subprocess.run([sys.executable, "-c", "from ecm.cli.export import main; main()", b"--ecm", damaged,
                        b"--out", os.fsencode(tmp_path / "e"), b"--no-build"], capture_output=True, timeout=600)
    assert b"exporting " in r.stdout and b"ecm-" in r.stdout
    assert_error(r.returncode, r.stderr.decode("utf-8", "replace"), "truncated or corrupt")


# ------------------------------------------------------------------------------------ interrupted training
TRAIN_ARGS = ["--batch", 2, "--num-images", 4, "--early-centric", 1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_killed_between_its_two_checkpoint_files_resumes_exactly(tmp_path):
    """SIGKILL after the weights of step 2 are in place but before the resume point is: nothing is corrupt, and
    --resume (which used to refuse: 'start the run again') continues from step 1 to the same weights."""
    run = tmp_path / "run"
    args = [*TRAIN_ARGS, "--out", run]
    code, out = invoke(train, ["--steps", 1, *args])
    assert code == 0, out
    killed_on_rename(run / "train_state.pt", "ecm.cli.train", "train", "--steps", 2, *args, "--resume")
    weights, meta = load_ecm(run / "ecm.safetensors")  # whole, and from the killed step
    assert meta["step"] == "2"
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == 1
    killed_log = _log(run)
    assert [r["step"] for r in killed_log] == [1, 2]
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".train_state.pt.")  # the unfinished write, by its own name
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a record cut short by a later stop

    code, out = invoke(train, ["--steps", 2, *args, "--resume"])
    assert code == 0, out
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2]
    assert log[1]["loss"] == pytest.approx(killed_log[1]["loss"], rel=1e-5)
    resumed, meta = load_ecm(run / "ecm.safetensors")
    assert meta["step"] == "2"
    for (name, a), b in zip(weights.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.slow
def test_training_killed_while_writing_its_weights_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL with step 2's weights fully written but not yet renamed: step 1's files are intact and resume."""
    run = tmp_path / "run"
    args = [*TRAIN_ARGS, "--out", run]
    code, out = invoke(train, ["--steps", 1, *args])
    assert code == 0, out
    before = (run / "ecm.safetensors").read_bytes()
    killed_on_rename(run / "ecm.safetensors", "ecm.cli.train", "train", "--steps", 2, *args, "--resume")
    assert (run / "ecm.safetensors").read_bytes() == before
    assert load_ecm(run / "ecm.safetensors")[1]["step"] == "1"
    code, out = invoke(train, ["--steps", 2, *args, "--resume"])
    assert code == 0, out
    assert [r["step"] for r in _log(run)] == [1, 2] and load_ecm(run / "ecm.safetensors")[1]["step"] == "2"


def test_a_damaged_resume_point_is_a_clear_error(files, tmp_path):
    """A train_state.pt that is not one (disk trouble): one line saying how to go on, the weights untouched."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(files["ecm"], run / "ecm.safetensors")
    (run / "train_state.pt").write_bytes(b"\0" * 100)
    code, out = invoke(train, ["--steps", 2, *TRAIN_ARGS, "--out", run, "--resume"])
    assert_error(code, out, "cannot resume from")
    assert (run / "ecm.safetensors").read_bytes() == files["ecm"].read_bytes()


# ------------------------------------------------------------------------------------ interrupted export
EXPORT_ARGS = ["--precision", "fp32", "--no-build"]


def test_export_killed_midway_leaves_the_previous_export_untouched(fp32_export, files, tmp_path):
    """SIGKILL while the new graphs are being written: the folder's previous export is exactly as it was and
    still runs; the hidden staging folder is never taken for an export."""
    out = linked_copy(fp32_export.folder, tmp_path / "deploy")
    before = snapshot(out)
    p = subprocess.Popen([sys.executable, "-c", "from ecm.cli.export import main; main()", *EXPORT_ARGS,
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        for line in p.stdout:
            if "exporting the step graph" in line:
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.kill()
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    for staging in out.glob(".ecm-export-*"):
        code, text = invoke(run_cli, ["--engine", staging, "--cond", files["edge.png"], "--out", tmp_path / "s.png"])
        assert_error(code, text, "has no var_ecm.json")
    code, text = invoke(run_cli, ["--engine", out, "--cond", files["edge.png"], "--out", tmp_path / "o.png"])
    assert code == 0, text


@pytest.mark.slow
def test_export_killed_while_moving_into_place_is_refused_then_redone(fp32_export, files, tmp_path):
    """SIGKILL with the new graphs moved in but the manifest not yet: ecm-run and --build-only refuse the folder
    in one line (the old manifest went first, so old and new files are never mixed); exporting again repairs it."""
    out = linked_copy(fp32_export.folder, tmp_path / "deploy")
    killed_on_rename(out / MANIFEST_NAME, "ecm.cli.export", "main", *EXPORT_ARGS, "--out", out, cwd=tmp_path)
    assert not (out / MANIFEST_NAME).exists()
    code, text = invoke(run_cli, ["--engine", out, "--cond", files["edge.png"], "--out", tmp_path / "o.png"])
    assert_error(code, text, "has no var_ecm.json")
    code, text = invoke(export_cli, ["--build-only", out])
    assert_error(code, text, "no manifest")
    code, text = invoke(export_cli, [*EXPORT_ARGS, "--out", out])
    assert code == 0, text
    code, text = invoke(run_cli, ["--engine", out, "--cond", files["edge.png"], "--out", tmp_path / "o.png"])
    assert code == 0, text


# ------------------------------------------------------------------------------------ long and concurrent runs
ENDURANCE = r"""
import json, os, sys
import numpy as np
from ecm.runtime.engine import open_engine
from ecm.runtime.images import prepare_condition, read_image
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.memory import rss_mb
folder, cond_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m, backend = open_engine(folder, threads=1)  # one thread: steadier timing on a shared machine
loop, sampling = ScaleLoop(m, backend, 1), Sampling.defaults(m)
cond = prepare_condition(read_image(cond_path), m.control, extract=False)[None]
first, rss, fds = {}, {}, {}
for i in range(n):
    img = loop.run(np.array([i % m.num_classes]), cond, sampling, seed=i % 16).images[0]
    assert img.shape == (m.image_size, m.image_size, 3) and img.dtype == np.uint8
    key = (i % m.num_classes, i % 16)
    assert np.array_equal(first.setdefault(key, img), img), f"image {i} differs from its first draw"
    if i + 1 in (20, n):
        rss[i + 1], fds[i + 1] = rss_mb(), len(os.listdir("/proc/self/fd"))
print(json.dumps({"rss": rss, "fds": fds}))
"""


def test_200_consecutive_images_without_memory_growth(fp32_export, files):
    """200 images in one process: every one valid, the same seed always the same image, resident memory and
    open files flat after the first 20."""
    r = subprocess.run([sys.executable, "-c", ENDURANCE, str(fp32_export.folder), str(files["edge.png"]), "220"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.splitlines()[-1])
    rss, fds = stats["rss"], stats["fds"]
    assert rss["220"] - rss["20"] < 8, f"resident memory grew from {rss['20']:.1f} to {rss['220']:.1f} MiB"
    assert fds["220"] == fds["20"]


def test_concurrent_runs_on_one_engine(fp32_export, files, tmp_path):
    """Four ecm-run processes at once on one engine folder (two writing the same --out): all succeed with the
    same image for the same seed, no temporary file is left, and the engine folder is not touched."""
    before = snapshot(fp32_export.folder)
    outs = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "same.png", tmp_path / "same.png"]
    argv = [sys.executable, "-c", RUN, "--engine", str(fp32_export.folder), "--cond", str(files["edge.png"]),
            "--seed", "3", "-n", "2", "--threads", "1"]
    procs = [subprocess.Popen([*argv, "--out", str(o)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for o in outs]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 for code, _ in results), results
    assert len({o.read_bytes() for o in outs}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "same.png"]
    assert snapshot(fp32_export.folder) == before


@pytest.mark.slow
def test_two_first_runs_at_once_share_the_default_engine(files, tmp_path):
    """Two ecm-run without --engine on a fresh cache at the same time: both export the embedded default model,
    one folder ends up in the cache, complete, and both draw the same image."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cond = default_paths()[0].parent.parent / "samples" / "0_circle.png"
    procs = [subprocess.Popen([sys.executable, "-c", RUN, "--cond", str(cond), "--out", str(tmp_path / f"{k}.png")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for k in "ab"]
    results = [(p.wait(timeout=1200), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 for code, _ in results), results
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    cached = list((tmp_path / "cache" / "ecm").iterdir())
    assert len(cached) == 1 and Manifest.load(cached[0]).control.type == "canny"
