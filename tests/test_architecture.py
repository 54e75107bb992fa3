"""The house rules of ARCHITECTURE.md, read off the source: which layer imports which, no import circles,
and a torch-free runtime. Every import counts, deferred and type-only ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> folder, as pyproject.toml's package-dir maps them.
PACKAGES = {"ecm.export": "export", "ecm.runtime": "runtime", "ecm.calibration": "calibration", "ecm": "ecm"}
#: Layer -> the layers it may import besides itself (ARCHITECTURE.md). The runtime, at the bottom, holds the facts
#: every layer shares; data is torch-free like it; the console scripts and benchmarks sit on top of everything.
ALLOWED = {
    "runtime": set(),
    "model": {"runtime"},
    "data": {"runtime"},
    "train": {"model", "data", "runtime"},
    "eval": {"model", "data", "runtime"},
    "export": {"model", "data", "runtime"},
    "calibration": {"export", "model", "data", "runtime"},
    "bench": {"calibration", "export", "train", "eval", "model", "data", "runtime"},
    "cli": {"bench", "calibration", "export", "train", "eval", "model", "data", "runtime"},
    "api": set(),  # ecm/__init__.py hands out public names lazily and imports nothing of ours
}
TORCH_FREE = ("runtime", "data")


def modules() -> dict[str, Path]:
    """Every module of the project by import name."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if pkg == "ecm" and parts and f"ecm.{parts[0]}" in PACKAGES:
                continue
            out[".".join([pkg, *parts])] = path
    return out


def layer(module: str) -> str:
    """The layer a module belongs to: the sub-package under ``ecm`` (``ecm`` itself is 'api')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "api"


def imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module of ours and every top-level third-party package ``source`` imports, anywhere in it."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from ecm.model import var` imports a module
    return found


def ours(names: set[str], known: set[str]) -> set[str]:
    return {n for n in names if n in known}


def violations(module: str, source: str, known: set[str], is_package: bool = False) -> list[str]:
    """The imports of ``module`` that break the layer rules, as readable lines."""
    own = layer(module)
    bad = [f"{module} ({own}) imports {n} ({layer(n)})" for n in sorted(ours(imports(module, source, is_package),
                                                                        known))
           if layer(n) != own and layer(n) not in ALLOWED[own]]
    if own in TORCH_FREE:
        bad += [f"{module} ({own}) imports torch" for n in imports(module, source, is_package)
                if n == "torch" or n.startswith("torch.")]
    return bad


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: ours(imports(m, p.read_text(), p.name == "__init__.py"), set(mods)) - {m} for m, p in mods.items()}


def test_every_module_keeps_to_its_layer():
    mods = modules()
    assert {layer(m) for m in mods} == set(ALLOWED)  # every layer has a rule and is used
    bad = [v for m, p in mods.items() for v in violations(m, p.read_text(), set(mods), p.name == "__init__.py")]
    assert bad == []


@pytest.mark.parametrize("module, line, broken", [
    ("ecm.runtime.loop", "from ecm.export.pipeline import export_model", True),  # the runtime reaching up
    ("ecm.runtime.loop", "import torch", True),
    ("ecm.model.var", "from ecm.train.loop import fit", True),
    ("ecm.export.verify", "from ecm.eval.fidelity import evaluate", True),
    ("ecm.data.datasets", "def f():\n    from torch import nn", True),  # deferred imports count too
    ("ecm.calibration.record", "from ecm.train.adapters import ControlData", True),
    ("ecm.export.verify", "from ecm.data.datasets import ProceduralShapes", False),
    ("ecm.cli.run", "from ecm.export.pipeline import export_model", False),
    ("ecm.runtime.loop", "from .manifest import Manifest", False),
])
def test_the_layer_check_catches_a_forbidden_import(module, line, broken):
    assert bool(violations(module, line, set(modules()))) is broken


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_in_a_circle():
    assert cycles(graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds them


def test_the_runtime_loads_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import ecm.runtime, ecm.runtime.engine, ecm.runtime.loop, "
            "ecm.runtime.ort_backend, ecm.runtime.images, ecm.runtime.controls, ecm.cli.run, ecm.data.datasets")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
