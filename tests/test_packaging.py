"""Packaging and entry points: the runtime stays torch-free, public names load lazily, every console script
answers --help."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

SCRIPTS = sorted(tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
                 ["project"]["scripts"])


def run_py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_runtime_and_package_import_without_torch():
    out = run_py("import sys, ecm, ecm.runtime, ecm.cli.run, ecm.runtime.loop, ecm.runtime.ort_backend; "
                 "import ecm.bench.memory; print('torch' in sys.modules)")  # ecm.bench.memory: the runtime's probe
    assert out.strip() == "False"


def test_public_names_load_lazily():
    out = run_py("import sys, ecm; print('torch' in sys.modules, ecm.VAR.__module__, ecm.VQVAE.__module__, "
                 "ecm.ECM.__module__, ecm.load_default.__module__)")
    assert out.split() == ["False", "ecm.model.var", "ecm.model.vqvae", "ecm.model.adapters", "ecm.model.embedded"]


def test_the_console_scripts_are_the_documented_ones():
    assert SCRIPTS == ["ecm-bench", "ecm-demo", "ecm-eval", "ecm-export", "ecm-pack-default", "ecm-params",
                       "ecm-prepare", "ecm-pretrain", "ecm-run", "ecm-train"]


@pytest.mark.parametrize("cmd", SCRIPTS)
def test_cli_help(cmd):
    exe = f"{sys.prefix}/bin/{cmd}"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage" in out.stdout
