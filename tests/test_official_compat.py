"""Our modules have exactly the keys and shapes of the released VAR checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from ecm import VAR, VQVAE, var_config, vqvae_config

#: Every key and shape of the released checkpoints, made by building the official model classes.
REFERENCE = Path(__file__).resolve().parent / "data" / "var_official_state_dict_shapes.json"
OFFICIAL_PARAMS_M = {16: 310.3, 20: 600.9, 24: 1033.4, 30: 2010.0}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def shapes(module: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_vqvae_keys_and_shapes(reference):
    with torch.device("meta"):
        vae = VQVAE(vqvae_config("official"))
    assert shapes(vae) == reference["vae_ch160v4096z32"]
    loaded = VQVAE.from_checkpoint(vae.state_dict())
    assert loaded.config == vae.config
    assert shapes(loaded) == reference["vae_ch160v4096z32"]
    assert sum(p.numel() for p in vae.parameters()) / 1e6 == pytest.approx(108.9, abs=0.05)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_var_keys_and_shapes(reference, depth):
    with torch.device("meta"):
        var = VAR(var_config(f"d{depth}"))
    assert shapes(var) == reference[f"var_d{depth}"]
    assert sum(p.numel() for p in var.parameters()) / 1e6 == pytest.approx(OFFICIAL_PARAMS_M[depth], abs=0.05)
    loaded = VAR.from_checkpoint(var.state_dict())  # config, depth included, inferred from shapes
    assert loaded.config == var.config
    assert shapes(loaded) == reference[f"var_d{depth}"]


def test_official_flat_pth_file_round_trips(tmp_path, tiny_pair):
    vae, var = tiny_pair
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save(var.state_dict(), tmp_path / "var.pth")
    # A flat state dict cannot tell the scales or GroupNorm groups of a non-official model: pass them.
    vae2 = VQVAE.from_checkpoint(tmp_path / "vae.pth", patch_nums=vae.config.patch_nums,
                                 norm_groups=vae.config.norm_groups)
    var2 = VAR.from_checkpoint(tmp_path / "var.pth", vae=vae2)
    assert vae2.config == vae.config and var2.config.depth == var.config.depth
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(vae.img_to_idxBl(img), vae2.img_to_idxBl(img)))
    var2.cond_drop_rate = 0
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(img))
    label = torch.tensor([3])
    assert torch.equal(var(label, x), var2(label, x))
