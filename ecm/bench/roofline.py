"""The analytic floor of one image's generation: its FLOPs and bytes moved, and this machine's rates.

FLOPs count every matrix product (2 per multiply-add) of one image's generation with CFG (two
rows), from the model config: per scale, that scale's tokens through the blocks' QKV, projection
and FFN layers and attention over the prefix, the AdaLN modulation, the vocabulary head and the
ECM adapters; the control encoder once; between scales the f_hat update and the next input. The
VQVAE decoder is counted by running it under torch's FlopCounterMode. Norms, softmax and
sampling are not counted.

Bytes count the weights read (the step's once per scale; AdaLN, control encoder and decoder once
per image, as the modulation depends on the class only) and the KV caches (every scale reads its
prefix and writes its own keys and values), in each export's storage precision.

The floor is ``max(FLOPs / matmul rate, bytes / bandwidth)`` with the rates measured here: no
implementation on this machine generates an image faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ecm.model.adapters import ECM, ECMConfig
from ecm.model.config import VARConfig
from ecm.model.var import VAR
from ecm.runtime.scales import begin_ends


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per stored element of each kind of tensor in one precision."""

    linear: float  # the linear layers of backbone, adapters and control encoder
    head: float  # the vocabulary head
    decoder: float
    kv: float  # the KV caches


#: As the exports store them: fp16 keeps the head in fp32; INT8 keeps the decoder and the KV cache in
#: fp32 and the head in at most fp16 (the CPU form keeps it fp32: the floor takes the smaller).
PRECISION_BYTES = {
    "fp32": ElementBytes(linear=4, head=4, decoder=4, kv=4),
    "fp16": ElementBytes(linear=2, head=4, decoder=2, kv=2),
    "int8": ElementBytes(linear=1, head=2, decoder=4, kv=4),
}


@dataclass(frozen=True)
class Floor:
    """FLOPs and bytes of one image's generation, by part."""

    flops: dict[str, float]
    bytes: dict[str, float]

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def seconds(self, gflops: float, gbps: float) -> float:
        """The floor: the slower of computing every FLOP and moving every byte at these rates."""
        return max(self.total_flops / (gflops * 1e9), self.total_bytes / (gbps * 1e9))

    def bound(self, gflops: float, gbps: float) -> str:
        """'compute' or 'memory': which of the two sets the floor."""
        return "compute" if self.total_flops / gflops >= self.total_bytes / gbps else "memory"


def _linear(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer over n rows."""
    return 2 * n * d_in * d_out


def _separable(rows: int, src: int, dst: int) -> int:
    """FLOPs of resampling ``rows`` src x src maps to dst x dst as ``P X P^T`` (none if the size is kept)."""
    return 0 if src == dst else 2 * rows * dst * src * src + 2 * rows * dst * src * dst


def generation_flops(cfg: VARConfig, ecm: ECMConfig | None = None, batch: int = 1) -> dict[str, int]:
    """FLOPs of generating ``batch`` images with CFG (2 x batch rows), by part; the decoder apart."""
    C, V, Cv, HW = cfg.embed_dim, cfg.vocab_size, cfg.Cvae, cfg.patch_nums[-1]
    R = 2 * batch
    parts = dict.fromkeys(("blocks", "attention", "adaln", "head", "adapters", "control encoder", "between scales"), 0)
    K = len(cfg.patch_nums)
    for si, (pn, (b, e)) in enumerate(zip(cfg.patch_nums, begin_ends(cfg.patch_nums))):
        n, prefix = R * (e - b), e  # rows x tokens of this scale; the tokens it attends to
        parts["blocks"] += cfg.depth * (_linear(n, C, 3 * C) + _linear(n, C, C) + 2 * _linear(n, C, cfg.mlp_hidden))
        parts["attention"] += cfg.depth * 4 * n * prefix * C  # q k^T and softmax(.) v
        parts["adaln"] += cfg.depth * _linear(R, C, 6 * C) + _linear(R, C, 2 * C)
        parts["head"] += _linear(n, C, V)
        if ecm is not None:
            D, hidden = ecm.width, round(ecm.width * ecm.ffn_ratio)
            per = (_linear(n, C, D) + _linear(n, D, 3 * D) + 4 * n * prefix * D + _linear(n, D, D)
                   + 2 * _linear(n, D, hidden) + _linear(n, D, C))
            parts["adapters"] += ecm.num_adapters * per
        # f_hat += phi(bicubic(codes -> HW)); the next input is f_hat area-sampled to the next scale, embedded
        between = _separable(batch * Cv, pn, HW) + 2 * batch * HW * HW * Cv * Cv * 9
        if si + 1 < K:
            pn_next = cfg.patch_nums[si + 1]
            between += _separable(batch * Cv, HW, pn_next) + _linear(batch * pn_next * pn_next, Cv, C)
        parts["between scales"] += between
    if ecm is not None:
        parts["control encoder"] = control_encoder_flops(ecm, batch)
    return parts


def control_encoder_flops(ecm: ECMConfig, batch: int = 1) -> int:
    """FLOPs of the control encoder (a ViT on the last scale's grid), its area sampling and projection."""
    W, hw, p = ecm.enc_width, ecm.patch_nums[-1], ecm.patch_size
    N = batch * hw * hw
    flops = 2 * N * W * 3 * p * p  # patch embedding
    per_block = _linear(N, W, 3 * W) + 4 * batch * (hw * hw) ** 2 * W + _linear(N, W, W) + 2 * _linear(N, W, 4 * W)
    flops += ecm.enc_depth * per_block
    flops += sum(_separable(batch * W, hw, pn) for pn in ecm.patch_nums)
    L = sum(pn * pn for pn in ecm.patch_nums)
    return flops + _linear(batch * L, W, ecm.width)


def counted_flops(fn: object, *args: object, **kwargs: object) -> int:
    """FLOPs of the matrix products and convolutions ``fn(*args, **kwargs)`` runs, counted by torch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def generation_bytes(var: VAR, ecm: ECM | None, precision: str, batch: int = 1) -> dict[str, float]:
    """Bytes read and written generating ``batch`` images in ``precision`` ('fp32', 'fp16', 'int8'), by part."""
    cfg, es = var.config, PRECISION_BYTES[precision]
    K, L, C, R = len(cfg.patch_nums), cfg.L, cfg.embed_dim, 2 * batch
    blocks = [(b.attn.mat_qkv, b.attn.proj, b.ffn) for b in var.blocks]
    step = _params(var.word_embed, *(m for block in blocks for m in block))
    adaln = _params(*(b.ada_lin for b in var.blocks), var.head_nm)
    once = _params(var.vae.decoder, var.vae.post_quant_conv) * es.decoder + adaln * es.linear
    kv_per_token = 2 * cfg.depth * R * C  # K and V of every layer, every row
    if ecm is not None:
        step += _params(ecm.adapters, ecm.shared_ffn)
        once += _params(ecm.encoder, ecm.ctrl_proj) * es.linear
        kv_per_token += 2 * ecm.config.num_adapters * R * ecm.config.width
    # every scale attends to its whole prefix (read) and writes its own tokens: sum of prefixes + L
    prefixes = sum(e for _, e in begin_ends(cfg.patch_nums))
    return {"step weights": K * (step * es.linear + _params(var.head) * es.head), "once-per-image weights": once,
            "kv cache": (prefixes + L) * kv_per_token * es.kv}


def image_floors(var: VAR, ecm: ECM | None) -> dict[str, Floor]:
    """The floor of one image of ``var`` (+ ``ecm``) in each precision of PRECISION_BYTES."""
    flops: dict[str, float] = dict(generation_flops(var.config, ecm.config if ecm is not None else None))
    HW = var.config.patch_nums[-1]
    f_hat = torch.zeros(1, var.config.Cvae, HW, HW, device=var.head.weight.device)  # meta for a model without data
    flops["decoder"] = counted_flops(var.vae.fhat_to_img, f_hat)
    return {precision: Floor(flops, generation_bytes(var, ecm, precision)) for precision in PRECISION_BYTES}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matrix-product rate, GFLOP/s: the best of ``repeats`` n x n products (PyTorch)."""
    a_NN, b_NN = torch.randn(n, n), torch.randn(n, n)
    a_NN @ b_NN  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a_NN @ b_NN
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def memory_gbps(mb: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth, GB/s: the best of ``repeats`` copies of ``mb`` MiB (read + write)."""
    src = np.ones(mb * 2**18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy also faults the destination's pages in
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9
