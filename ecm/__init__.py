"""ECM: efficient control models for VAR, trainable in hours and deployable on edge GPUs.

Public names are imported lazily (PEP 562) so that ``import ecm.runtime`` never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VQVAE": "ecm.vqvae",
    "VAR": "ecm.var",
    "KVCache": "ecm.kv_cache",
    "ECM": "ecm.adapters",
    "load_default": "ecm.default_model",
    "Generation": "ecm.var",
    "VQVAEConfig": "ecm.config",
    "VARConfig": "ecm.config",
    "vqvae_config": "ecm.config",
    "var_config": "ecm.config",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ecm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
