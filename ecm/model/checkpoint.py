"""Reading and writing checkpoints: official flat state dicts and our own self-describing files.

Official ``.pth`` files are flat state dicts; their config is inferred from the shapes. Ours are
safetensors files whose metadata holds ``{"ecm_kind": ..., "config": <json>}``. Every failure is
an :class:`ECMError` subclass with a one-line message, never a raw torch traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ecm.model.config import VARConfig, VQVAEConfig, config_from_dict, config_to_dict
from ecm.model.tensor_files import LazyTensor, read_tensor_file
from ecm.runtime.errors import CheckpointError, first_line
from ecm.runtime.files import atomic_path
from ecm.runtime.scales import PATCH_NUMS_256, total_tokens

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------ files
def save_safetensors(tensors: StateDict, path: str | Path, metadata: dict[str, str]) -> None:
    """Write tensors with string metadata atomically."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def save_model(model: nn.Module, path: str | Path, kind: str, cfg: VQVAEConfig | VARConfig,
               dtype: torch.dtype | None = None, extra: dict[str, str] | None = None) -> None:
    """Save a model as a self-describing safetensors file (optionally cast, e.g. to fp16)."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    meta = {"ecm_kind": kind, "config": json.dumps(config_to_dict(cfg)), **(extra or {})}
    save_safetensors(sd, path, meta)


def read_checkpoint(source: str | Path | dict[str, Any], lazy: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A state dict and its metadata (empty for official files) from a path or a dict.

    ``lazy``: a file's tensors come as :class:`LazyTensor` (shape and dtype now, values on ``load()``),
    so a model can take them one at a time (:func:`build_and_load`).
    """
    if isinstance(source, dict):
        if "state_dict" in source and isinstance(source["state_dict"], dict):
            return dict(source["state_dict"]), {k: v for k, v in source.items() if isinstance(v, str)}
        return dict(source), {}
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    found = read_tensor_file(path)
    if found is None:  # PyTorch's legacy format: read whole
        return _read_torch(path)
    tensors, meta = found
    return (tensors if lazy else {k: t.load() for k, t in tensors.items()}), meta


def checkpoint_step(path: str | Path) -> int:
    """The training step recorded in an ecm checkpoint's metadata."""
    _, meta = read_checkpoint(path)
    if "step" not in meta:
        raise CheckpointError(f"{path} records no training step, so it cannot be resumed; start a new run")
    return int(meta["step"])


def _read_torch(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many unrelated types for a bad file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(e, 160)}); it may be "
                              "truncated or corrupt: re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    state, meta = read_checkpoint(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a flat state dict (entry {bad[0]!r} is not a tensor); "
                              "extract the model's state dict first")
    return state, meta


# ------------------------------------------------------------------------------------ loading
def check_state_dict(model: nn.Module, state: StateDict, what: str) -> None:
    """Raise one clear error naming the first missing, unexpected or mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {_first(shapes)} (checkpoint vs model)")
    if problems:
        raise CheckpointError(f"checkpoint does not fit this {what}: {'; '.join(problems)}; is it the "
                              f"right file for a {what}?")


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def build_and_load(build: Callable[[], nn.Module], state: StateDict, what: str) -> Any:
    """Build a model on the meta device, check ``state`` against it, then adopt its tensors (as fp32) one
    at a time, reading lazy ones as it goes: the model costs its size once, however large.

    Models load themselves through this (``VQVAE.from_checkpoint``, ``VAR.from_checkpoint``), so
    this module knows file formats and configs but none of the model classes.
    """
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state, what)
    for name, value in state.items():
        t = value.load() if isinstance(value, LazyTensor) else value
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        t = t.float() if t.is_floating_point() else t
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
        else:
            module._buffers[attr] = t
    return model.eval()


def config_from_meta(meta: dict[str, str], kind: str, cls: type, overrides: dict[str, Any] | None = None) -> Any:
    """The config stored in an ecm checkpoint's metadata, checked to be of ``kind``."""
    if meta.get("ecm_kind") not in (None, kind):
        raise CheckpointError(f"checkpoint holds a {meta['ecm_kind']}, not a {kind}; pass the {kind} file")
    try:
        data = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint metadata has no valid {kind} config; re-save it with ecm") from None
    return config_from_dict(cls, {**data, **(overrides or {})})


def _count(state: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _require(state: StateDict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"checkpoint has no {key!r}, so it is not a {what} checkpoint; "
                              f"check that you passed the {what} file")
    return state[key]


def infer_vqvae_config(state: StateDict, **overrides: Any) -> VQVAEConfig:
    """The VQVAE config that an official-layout state dict was built with."""
    ch = _require(state, "encoder.conv_in.weight", "VQVAE").shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(_require(state, f"encoder.down.{i}.block.0.conv1.weight", "VQVAE").shape[0] // ch
                    for i in range(levels))
    num_scales = _require(state, "quantize.ema_vocab_hit_SV", "VQVAE").shape[0]
    patch_nums = overrides.pop("patch_nums", PATCH_NUMS_256 if num_scales == len(PATCH_NUMS_256) else None)
    if patch_nums is None or len(patch_nums) != num_scales:
        raise CheckpointError(f"checkpoint has {num_scales} scales; pass patch_nums=(...) with that many")
    found = dict(
        vocab_size=_require(state, "quantize.embedding.weight", "VQVAE").shape[0],
        z_channels=state["quantize.embedding.weight"].shape[1],
        ch=ch, ch_mult=ch_mult,
        num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
        using_sa=any(k.startswith(f"encoder.down.{levels - 1}.attn.") for k in state),
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in state,
        quant_conv_ks=_require(state, "quant_conv.weight", "VQVAE").shape[-1],
        share_quant_resi=_count(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."),
        patch_nums=tuple(patch_nums),
    )
    return VQVAEConfig(**{**found, **overrides})


def infer_var_config(state: StateDict, patch_nums: tuple[int, ...] | None = None, **overrides: Any) -> VARConfig:
    """The VAR config that an official-layout state dict was built with (depth included)."""
    C, Cvae = _require(state, "word_embed.weight", "VAR").shape
    L = _require(state, "pos_1LC", "VAR").shape[1]
    patch_nums = tuple(patch_nums or PATCH_NUMS_256)
    if total_tokens(patch_nums) != L:
        raise CheckpointError(f"checkpoint has L = {L} tokens but patch_nums {patch_nums} give "
                              f"{total_tokens(patch_nums)}; pass the VQVAE it was trained with")
    found = dict(
        depth=_count(state, r"blocks\.(\d+)\."),
        embed_dim=C,
        num_heads=_require(state, "blocks.0.attn.scale_mul_1H11", "VAR").shape[1],
        mlp_ratio=_require(state, "blocks.0.ffn.fc1.weight", "VAR").shape[0] / C,
        num_classes=_require(state, "class_emb.weight", "VAR").shape[0] - 1,
        vocab_size=_require(state, "head.weight", "VAR").shape[0],
        Cvae=Cvae,
        patch_nums=patch_nums,
    )
    return VARConfig(**{**found, **overrides})


def tensor_hash(state: dict[str, torch.Tensor], exact: bool = False, length: int = 16) -> str:
    """A content hash of a state dict: keys, shapes and values, ``length`` hex digits.

    By default values are hashed at fp16 precision, so a backbone shipped in fp16 keeps the
    identity of its fp32 original (adapters record it to refuse other backbones); ``exact=True``
    hashes them as they are.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu()
        v = v.half() if v.is_floating_point() and not exact else v
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()[:length]
