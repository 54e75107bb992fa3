"""ECM: efficient control models for VAR, trainable in hours and deployable on edge GPUs.

Public names are imported lazily (PEP 562) so that ``import ecm.runtime`` never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VQVAE": "ecm.model.vqvae",
    "VAR": "ecm.model.var",
    "KVCache": "ecm.model.kv_cache",
    "ECM": "ecm.model.adapters",
    "load_default": "ecm.model.embedded",
    "Generation": "ecm.model.var",
    "VQVAEConfig": "ecm.model.config",
    "VARConfig": "ecm.model.config",
    "vqvae_config": "ecm.model.config",
    "var_config": "ecm.model.config",
    "register_control": "ecm.runtime.controls",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ecm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
