"""Fold what is constant at deployment into fewer, cheaper operations.

AdaLN tables: a class-conditional VAR modulates every norm by ``ada_lin(class_emb[label])``; that
is a constant per class, so it becomes a row lookup (:func:`fold_class_tables`).

LayerNorm affine parameters go into the linear layer that follows, where that is exact:

``W (x_hat * gamma + beta) + b = (W diag(gamma)) x_hat + (W beta + b)``: the norm keeps only its
normalisation and the graph loses a multiply and an add per norm. Applied to every norm that
feeds exactly one linear layer: the ECM adapters' attention input and the control encoder. The
adapters' second norm feeds the FFN they share (folding would copy it per adapter), and the
backbone's norms are modulated per class (AdaLN), so those stay as they are. Each adapter's
gate goes into its own up-projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ecm.model.adapters import ECM
from ecm.model.var import VAR


@torch.no_grad()
def _fold(norm: nn.LayerNorm, weight: torch.Tensor) -> torch.Tensor:
    """Scale the columns of ``weight`` by gamma in place; return W @ beta, the norm's shift as a bias."""
    shift = weight @ norm.bias
    weight.mul_(norm.weight)
    return shift


def _plain(norm: nn.LayerNorm) -> nn.LayerNorm:
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


@torch.no_grad()
def fold_ecm_norms(ecm: ECM) -> ECM:
    """Fold every foldable LayerNorm of ``ecm`` in place; returns ``ecm``."""
    D = ecm.config.width
    for j, adapter in enumerate(ecm.adapters):
        attn = adapter.attn
        shift = _fold(adapter.ln1, attn.mat_qkv.weight)
        attn.q_bias += shift[:D]
        attn.zero_k_bias.copy_(shift[D:2 * D])  # k gets a bias now; the name is the official one
        attn.v_bias += shift[2 * D:]
        adapter.ln1 = _plain(adapter.ln1)
        adapter.up.weight.mul_(ecm.gates[j].unsqueeze(1))  # the gate scales this adapter's own up-projection
        adapter.up.bias.mul_(ecm.gates[j])
    ecm.gates = None
    for block in ecm.encoder.blocks:
        block.qkv.bias += _fold(block.ln1, block.qkv.weight)
        block.mlp.fc1.bias += _fold(block.ln2, block.mlp.fc1.weight)
        block.ln1, block.ln2 = _plain(block.ln1), _plain(block.ln2)
    # the final norm precedes area sampling (rows sum to one, so a shift passes through) and ctrl_proj
    ecm.ctrl_proj.bias += _fold(ecm.encoder.norm, ecm.ctrl_proj.weight)
    ecm.encoder.norm = _plain(ecm.encoder.norm)
    return ecm


class ClassTable(nn.Module):
    """An AdaLN modulation precomputed for every class: a row lookup replaces SiLU + Linear."""

    def __init__(self, table_KD: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table_KD)

    def forward(self, label_B: torch.Tensor) -> torch.Tensor:
        return self.table[label_B].float()


@torch.no_grad()
def fold_class_tables(var: VAR, dtype: torch.dtype = torch.float32) -> VAR:
    """Replace every AdaLN ``ada_lin`` of ``var`` by its table over the classes (+ unconditional), in place.

    The modulation depends on the class alone, so a step reads two table rows instead of the
    whole ``ada_lin`` weight (a third of a VAR block's weights). The tables hold as many values as
    those weights for 1000 classes and far fewer for small class sets. After folding, the blocks
    take class labels where they took class embeddings.
    """
    emb_KD = var.class_emb.weight
    for owner in [*var.blocks, var.head_nm]:
        owner.ada_lin = ClassTable(owner.ada_lin(emb_KD).to(dtype))
    return var
