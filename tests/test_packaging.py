"""Layering and entry points: the runtime stays torch-free; every CLI answers --help."""

import subprocess
import sys

import pytest


def run_py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_runtime_and_package_import_without_torch():
    out = run_py("import sys, ecm, ecm.runtime, ecm.runtime.cli, ecm.runtime.loop, ecm.runtime.ort_backend; "
                 "import ecm.measure; print('torch' in sys.modules)")  # ecm.measure: the runtime's memory probe
    assert out.strip() == "False"


def test_public_names_load_lazily():
    out = run_py("import ecm; print(ecm.VAR.__module__, ecm.VQVAE.__module__)")
    assert out.split() == ["ecm.var", "ecm.vqvae"]


@pytest.mark.parametrize("cmd", ["ecm-train", "ecm-pretrain", "ecm-eval", "ecm-export", "ecm-run", "ecm-bench"])
def test_cli_help(cmd):
    exe = f"{sys.prefix}/bin/{cmd}"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "Usage" in out.stdout
