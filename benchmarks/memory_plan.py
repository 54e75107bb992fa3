"""The device memory of the official backbones (+ ECM base) at fp16 and INT8, and the Jetson modules they fit.

Counted on models without data (meta tensors: nothing is allocated, d30 included), with the same
plan ``ecm-export`` writes into the manifest (``ecm.export.memory_plan``); prints the README's
table in Markdown.

    python benchmarks/memory_plan.py [--models d16,d20,d24,d30] [--batches 1,8]
"""

from __future__ import annotations

import click
import torch
from ecm.export.memory_plan import GB, decoder_feature_elements, memory_plan, model_weight_bytes, smallest_fit
from ecm.export.pipeline import ExportOptions, make_manifest

from ecm.model.adapters import ECM, ecm_config
from ecm.model.config import var_config, vqvae_config
from ecm.model.var import VAR
from ecm.model.vqvae import VQVAE


@click.command()
@click.option("--models", default="d16,d20,d24,d30", show_default=True, help="Official VAR presets, comma-separated.")
@click.option("--batches", default="1,8", show_default=True, help="Images per run, comma-separated.")
def main(models: str, batches: str) -> None:
    sizes = tuple(int(b) for b in batches.split(","))
    head = ["model", "params", "precision", "weights GB"]
    for B in sizes:
        head += [f"KV cache GB (batch {B})", f"activations GB (batch {B})", f"total GB (batch {B})",
                 f"smallest Jetson (batch {B})"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for name in models.split(","):
        vae_cfg = vqvae_config("official")
        var_cfg = var_config(name, vae_cfg)
        with torch.device("meta"):
            var = VAR(var_cfg, VQVAE(vae_cfg))
            ecm = ECM(ecm_config(var_cfg, vae_cfg.downsample))
        params = sum(p.numel() for p in var.parameters()) + sum(p.numel() for p in ecm.parameters())
        for precision in ("fp16", "int8"):
            m = make_manifest(var, ecm, ExportOptions(precision=precision))
            plan = memory_plan(m, model_weight_bytes(var, ecm, precision), decoder_feature_elements(vae_cfg), sizes)
            row = [f"{name} + ECM", f"{params / 1e9:.2f} B", precision, f"{sum(plan.weights.values()) / GB:.2f}"]
            for B in sizes:
                row += [f"{b / GB:.2f}" for b in (plan.kv_cache[B], plan.activations[B], plan.total(B))]
                row.append(smallest_fit(plan, B))
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
