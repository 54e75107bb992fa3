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


def test_tensor_files_read_one_tensor_at_a_time_exactly(tmp_path):
    """The lazy reader gives torch.load's and safetensors' tensors bit for bit, views of shared storages
    included, and refuses pickles that hold anything but tensors and dicts."""
    import pickle
    import zipfile

    from safetensors.torch import save_file

    from ecm.model.tensor_files import read_tensor_file

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"w": torch.randn(3, 5), "half": torch.randn(7).half(), "bf": torch.randn(2, 2).bfloat16(),
             "idx": torch.arange(5), "view": base[1:3, 2:5], "t": base.t(), "empty": torch.zeros(0, 4)}
    torch.save(state, tmp_path / "s.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "s.safetensors"), metadata={"a": "b"})
    for name, want_meta in (("s.pth", {}), ("s.safetensors", {"a": "b"})):
        lazy, meta = read_tensor_file(tmp_path / name)
        assert meta == want_meta and set(lazy) == set(state)
        for k, v in state.items():
            assert lazy[k].shape == v.shape and lazy[k].dtype == v.dtype
            got = lazy[k].load()
            assert torch.equal(got, v) and got.dtype == v.dtype

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": torch.ones(1)}, tmp_path / "evil.pth")
    with zipfile.ZipFile(tmp_path / "evil.pth") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"x": Evil()}, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(CheckpointError, match=r"print is not part of a state dict"):
        read_tensor_file(tmp_path / "evil.pth")
    (tmp_path / "huge.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header is longer than the file"):
        read_tensor_file(tmp_path / "huge.safetensors")
