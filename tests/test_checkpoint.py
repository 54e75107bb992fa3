"""Checkpoints: our own format round-trips; bad files give one clear line, never a traceback."""

import pytest
import torch
from ecm.runtime.errors import CheckpointError, ECMError

from ecm import VAR, VQVAE, var_config, vqvae_config
from ecm.model.checkpoint import atomic_path, save_model


def test_ecm_format_round_trips_in_fp16(tmp_path, tiny_pair):
    vae, var = tiny_pair
    save_model(vae, tmp_path / "vae.safetensors", "vqvae", vae.config)
    save_model(var, tmp_path / "var.safetensors", "var", var.config, dtype=torch.float16)
    vae2 = VQVAE.from_checkpoint(tmp_path / "vae.safetensors")
    var2 = VAR.from_checkpoint(tmp_path / "var.safetensors", vae=vae2)
    assert var2.config == var.config and vae2.config == vae.config
    assert var2.pos_1LC.dtype == torch.float32
    for a, b in zip(var.parameters(), var2.parameters()):
        assert torch.equal(a.half().float(), b)


def test_wrong_keys_name_the_first_mismatches(tiny_pair):
    _, var = tiny_pair
    sd = dict(var.state_dict())
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        VAR.from_checkpoint(sd, vae=var.vae)
    msg = str(e.value)
    assert "missing head.bias" in msg and "unexpected extra.weight" in msg and "\n" not in msg


def test_wrong_shapes_are_reported(tiny_pair, tmp_path):
    vae, var = tiny_pair
    sd = dict(var.state_dict())
    sd["lvl_embed.weight"] = torch.zeros(7, var.config.embed_dim)
    with pytest.raises(CheckpointError, match=r"wrong shape lvl_embed\.weight"):
        VAR.from_checkpoint(sd, patch_nums=vae.config.patch_nums)


def test_vqvae_file_loaded_as_var_is_refused(tmp_path, tiny_pair):
    vae, _ = tiny_pair
    save_model(vae, tmp_path / "vae.safetensors", "vqvae", vae.config)
    with pytest.raises(CheckpointError, match="holds a vqvae, not a var"):
        VAR.from_checkpoint(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a VAR checkpoint"):
        VAR.from_checkpoint(vae.state_dict())


def test_var_with_another_vqvae_is_refused(tiny_pair, d16_pair):
    _, var = tiny_pair
    with pytest.raises(CheckpointError, match="does not match this VAR"):
        VAR.from_checkpoint(var.state_dict(), vae=VQVAE(vqvae_config("tiny", vocab_size=256)))
    with pytest.raises(CheckpointError, match="L = 130 tokens but patch_nums"):
        VAR.from_checkpoint(var.state_dict(), vae=d16_pair[0])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_garbage_files(tmp_path, tiny_pair, suffix):
    vae, _ = tiny_pair
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(vae.state_dict(), good)
    else:
        save_model(vae, good, "vqvae", vae.config)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"definitely not a checkpoint")
    for path in (cut, junk):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            VQVAE.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        VQVAE.from_checkpoint(tmp_path / "missing.pth")


def test_non_state_dict_pickle_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        VQVAE.from_checkpoint(tmp_path / "list.pth")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_unwritable_destination_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ECMError, match="cannot write"), atomic_path(blocker / "sub" / "m.safetensors"):
        pass


def test_overrides_apply_to_inferred_config(tiny_pair):
    _, var = tiny_pair
    loaded = VAR.from_checkpoint(var.state_dict(), vae=var.vae, cond_drop_rate=0.0)
    assert loaded.config == var_config("tiny", cond_drop_rate=0.0)
