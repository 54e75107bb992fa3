"""The device memory a deployment needs, and the Jetson modules it fits.

A generation on a GPU holds the graphs' weights, the KV caches of every scale (they grow with the
batch), the activations of the largest step (the last scale, whose attention reads every earlier
token) and the decoder's feature maps. Weights are what the export wrote; the rest follows from the
manifest's shapes. Activations are an estimate: the largest tensors alive at once (attention
scores, the FFN's hidden layer, the logits and a few residual streams at the last scale; three
full-resolution feature maps of the decoder), not TensorRT's own count, which only a build tells.

Jetson memory is unified: the OS, the CUDA context and every other process share it, so a plan is
said to fit a module when it leaves OS_RESERVE of the module's memory free (at least
OS_RESERVE_MIN_GB): a desktop JetPack image uses about 1.5-3 GB at idle, and carve-outs hide a
few hundred MB more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from ecm.runtime.manifest import Manifest
from ecm.runtime.scales import total_tokens

from ecm.model.adapters import ECM
from ecm.model.config import VQVAEConfig
from ecm.model.var import VAR

#: Jetson modules and their memory in GB.
JETSONS = {"Orin Nano 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 32GB": 32, "AGX Orin 64GB": 64, "Thor 128GB": 128}
OS_RESERVE = 0.15  # share of a module's memory left to the OS, the CUDA context and other processes
OS_RESERVE_MIN_GB = 2.0
BATCHES = (1, 4, 8)
GB = 1e9


def usable_gb(module_gb: float) -> float:
    """What a module leaves an application, GB."""
    return module_gb - max(OS_RESERVE * module_gb, OS_RESERVE_MIN_GB)


@dataclass
class MemoryPlan:
    """Bytes a deployment of one export needs on its device, per batch size."""

    precision: str
    weights: dict[str, int]  # graph role -> bytes of its weights
    kv_cache: dict[int, int]  # batch -> bytes of the K and V caches over all scales
    activations: dict[int, int]  # batch -> estimated peak bytes of activations (step or decoder, the larger)

    def total(self, batch: int) -> int:
        return sum(self.weights.values()) + self.kv_cache[batch] + self.activations[batch]

    def fits(self, batch: int) -> list[str]:
        """The Jetson modules that leave the OS its reserve with this plan at ``batch``, smallest first."""
        return [name for name, gb in JETSONS.items() if self.total(batch) <= usable_gb(gb) * GB]

    def lines(self) -> list[str]:
        """What ecm-export prints: one line for the weights, one per batch size."""
        w = " + ".join(f"{role} {b / GB:.2f}" for role, b in self.weights.items())
        out = [f"device memory ({self.precision}): weights {sum(self.weights.values()) / GB:.2f} GB ({w})"]
        for B in self.kv_cache:
            fits = ", ".join(self.fits(B)) or "none of the Jetson modules"
            out.append(f"  batch {B}: {self.total(B) / GB:.2f} GB = weights + KV cache {self.kv_cache[B] / GB:.2f} "
                       f"+ activations ~{self.activations[B] / GB:.2f}; fits {fits}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": {B: self.total(B) for B in self.kv_cache},
                "fits": {B: self.fits(B) for B in self.kv_cache}}


def step_activation_bytes(m: Manifest, batch: int, ffn_ratio: float = 4.0) -> int:
    """The largest step's live activations (fp32): attention scores over every token, the FFN's hidden layer,
    the logits and four residual streams of the last scale, for 2B rows (classifier-free guidance)."""
    n, L, rows = m.latent_size**2, total_tokens(m.patch_nums), 2 * batch
    scores = rows * m.num_heads * n * L
    hidden = rows * n * int(ffn_ratio * m.embed_dim)
    logits = rows * n * m.vocab_size
    residual = 4 * rows * n * m.embed_dim
    return 4 * (scores + hidden + logits + residual)


def decoder_feature_elements(vae: VQVAEConfig) -> int:
    """Elements of the decoder's largest feature map for one image (its widest level times that level's area)."""
    R = vae.resolution
    return max(vae.ch * mult * (R >> level) ** 2 for level, mult in enumerate(vae.ch_mult))


def decoder_activation_bytes(batch: int, feature_elements: int, element_bytes: int) -> int:
    """Three of the decoder's largest feature maps alive at once (input, output, residual) per image."""
    return 3 * batch * feature_elements * element_bytes


def memory_plan(m: Manifest, weights: dict[str, int], decoder_elements: int,
                batches: tuple[int, ...] = BATCHES) -> MemoryPlan:
    """The plan of an export with ``weights`` (role -> bytes) whose decoder's largest feature map holds
    ``decoder_elements`` per image."""
    element = 4 if m.precision == "fp32" else 2  # INT8 exports run the fp16 decoder on a GPU
    kv = {B: m.kv_cache_bytes(B) for B in batches}
    act = {B: max(step_activation_bytes(m, B), decoder_activation_bytes(B, decoder_elements, element))
           for B in batches}
    return MemoryPlan(m.precision, weights, kv, act)


def smallest_fit(plan: MemoryPlan, batch: int = 1) -> str:
    """The smallest Jetson module the plan fits at ``batch``, or a dash."""
    return next(iter(plan.fits(batch)), "-")


def model_weight_bytes(var: VAR, ecm: ECM | None, precision: str) -> dict[str, int]:
    """What an export of ``var`` (+ ``ecm``; models without data, on the meta device, will do) would write:
    backbone + adapters (step and control graphs), image encoder and decoder, at ``precision``. INT8 means the
    TensorRT form: INT8 linear weights but the vocabulary head's, the encoder fp32, everything else fp16 (W8A16,
    the fp16 decoder)."""
    per = {"fp32": 4, "fp16": 2, "int8": 2}[precision]
    nets = [net for net in (var, ecm) if net is not None]
    linear = {id(mod.weight) for net in nets for name, mod in net.named_modules()
              if isinstance(mod, torch.nn.Linear) and name != "head"}
    backbone = sum(p.numel() * (1 if precision == "int8" and id(p) in linear else per)
                   for net in nets for p in net.parameters())
    vae = var.vae
    decoder = sum(p.numel() for mod in (vae.decoder, vae.post_quant_conv, vae.quantize) for p in mod.parameters())
    encoder = sum(p.numel() for mod in (vae.encoder, vae.quant_conv, vae.quantize) for p in mod.parameters())
    return {"backbone + adapters": backbone, "encoder": encoder * (2 if precision == "fp16" else 4),
            "decoder": decoder * per}
