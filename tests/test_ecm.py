"""ECM adapters: exact zero start, step == teacher forcing, frozen backbone, exact resume, errors."""

import json

import numpy as np
import pytest
import torch
from ecm.runtime.errors import CheckpointError, ECMError

from ecm.data.controls import Control
from ecm.data.datasets import ProceduralShapes
from ecm.model.adapters import ECM, ecm_config, load_ecm, save_ecm
from ecm.model.checkpoint import tensor_hash
from ecm.model.pixels import to_model_range
from ecm.train.adapters import ControlData, sample_num_scales, train_ecm
from ecm.train.loop import TrainSpec
from tests.conftest import randomize_


def make_ecm(var, vae, seed=0, random_gates=True):
    torch.manual_seed(seed)
    ecm = ECM(ecm_config(var.config, vae.config.downsample))
    if random_gates:
        randomize_(ecm, seed, std=0.05)
    return ecm.eval()


@pytest.fixture(scope="module")
def batch(tiny_pair):
    vae, _ = tiny_pair
    ds = ProceduralShapes(4, 64, seed=5)
    imgs = np.stack([ds[i][0] for i in range(4)])
    ctrl = to_model_range(np.stack([Control("canny", resolution=64)(im) for im in imgs]))
    idx_list = vae.img_to_idxBl(to_model_range(imgs))
    return torch.tensor([ds[i][1] for i in range(4)]), vae.quantize.idxBl_to_var_input(idx_list), ctrl


@torch.no_grad()
def test_fresh_adapters_leave_the_backbone_exactly_unchanged(tiny_pair, batch):
    vae, var = tiny_pair
    label, x, ctrl = batch
    ecm = make_ecm(var, vae, random_gates=False)
    assert torch.count_nonzero(ecm.gates) == 0
    assert torch.equal(var(label, x, ecm, ecm.control_tokens(ctrl)), var(label, x))
    a = var.generate(label[:2], seed=1, temperature="1.0:0.8", ecm=ecm, control_B3HW=ctrl[:2])
    b = var.generate(label[:2], seed=1, temperature="1.0:0.8")
    assert all(torch.equal(p, q) for p, q in zip(a.idx_list, b.idx_list)) and torch.equal(a.images, b.images)


@torch.no_grad()
def test_cached_step_with_adapters_equals_teacher_forcing(tiny_pair, batch):
    vae, var = tiny_pair
    label, x, ctrl = batch
    ecm = make_ecm(var, vae)
    ctrl_BLC = ecm.control_tokens(ctrl)
    tf = var(label, x, ecm, ctrl_BLC)
    assert (tf - var(label, x)).abs().max() > 1e-2  # the adapters do act
    cond = var.class_cond(label)
    cache, state = var.new_cache(4), ecm.start(ctrl, cfg_rows=False)
    out = []
    for si, (b, e) in enumerate(var.begin_ends):
        x_BlC = var.first_token_map(cond) if si == 0 else var.word_embed(x[:, b - 1:e - 1]) + var.lvl_pos()[:, b:e]
        out.append(var.step(si, x_BlC, cond, cache, state))
    assert (torch.cat(out, 1) - tf).abs().max() <= 1e-4
    # a prefix of the scales is the same as the first scales of the full sequence
    assert (var(label, x, ecm, ctrl_BLC, num_scales=3)[:, :14] - tf[:, :14]).abs().max() <= 1e-5


def test_early_centric_sampling():
    rng = np.random.default_rng(0)
    full = [sample_num_scales(rng, 10, 0.0) for _ in range(100)]
    early = [sample_num_scales(rng, 10, 0.7) for _ in range(2000)]
    assert set(full) == {10}
    assert min(early) == 2 and max(early) == 10 and 0.6 < np.mean(np.array(early) < 10) < 0.8


@pytest.fixture(scope="module")
def control_data(tiny_pair):
    return ControlData(ProceduralShapes(32, 64, seed=3), Control("canny", resolution=64), tiny_pair[0], show=False)


def run(tiny_pair, control_data, out, steps, resume=False, seed=0):
    vae, var = tiny_pair
    ecm = make_ecm(var, vae, random_gates=False)
    spec = TrainSpec(steps=steps, batch=4, lr=1e-3, warmup=2, seed=seed, save_every=2)
    return ecm, train_ecm(ecm, var, control_data, out, spec, "canny", 0.5, 0.1, resume=resume)


def test_training_moves_only_the_adapters_and_resumes_exactly(tiny_pair, control_data, tmp_path):
    _, var = tiny_pair
    before = tensor_hash(var.state_dict())
    ecm, full = run(tiny_pair, control_data, tmp_path / "full", 4)
    assert tensor_hash(var.state_dict()) == before
    assert all(p.grad is None for p in var.parameters())
    assert torch.count_nonzero(ecm.gates) > 0  # the injection opened
    run(tiny_pair, control_data, tmp_path / "split", 2)
    _, rest = run(tiny_pair, control_data, tmp_path / "split", 4, resume=True)
    assert [r["step"] for r in rest] == [3, 4]
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[2:]]
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_adapters_refuse_another_backbone(tiny_pair, control_data, tmp_path):
    vae, var = tiny_pair
    ecm = make_ecm(var, vae)
    save_ecm(ecm, tmp_path / "ecm.safetensors", tensor_hash(var.state_dict()), "canny", 0)
    assert load_ecm(tmp_path / "ecm.safetensors", var)[1]["control"] == "canny"
    other = randomize_(type(var)(var.config, vae), seed=99)
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_ecm(tmp_path / "ecm.safetensors", other)
    with pytest.raises(CheckpointError, match="not an ECM adapter checkpoint"):
        load_ecm(_vae_file(vae, tmp_path), var)


def _vae_file(vae, tmp_path):
    from ecm.model.checkpoint import save_model

    save_model(vae, tmp_path / "vae.safetensors", "vqvae", vae.config)
    return tmp_path / "vae.safetensors"


def test_unknown_control_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(ECMError, match="unknown control type 'dpeth'"):
        Control("dpeth")
    with pytest.raises(ECMError, match="does not exist"):
        Control("folder:depth", tmp_path / "nope")
    (tmp_path / "maps").mkdir()
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{name}.png")
    Image.new("L", (8, 8)).save(tmp_path / "maps" / "a.png")
    ctrl = Control("folder:depth", tmp_path / "maps", resolution=8)
    with pytest.raises(ECMError, match=r"2 of 3 images have no control map .*b\.png, c\.png"):
        ctrl.check_pairs(sorted((tmp_path / "imgs").iterdir()))


def test_resume_refuses_changed_settings_and_trims_the_log(tiny_pair, control_data, tmp_path):
    vae, var = tiny_pair
    run(tiny_pair, control_data, tmp_path, 2)
    with (tmp_path / "log.jsonl").open("a") as log:  # a step logged after the last checkpoint
        log.write('{"step": 3, "loss": 1.0}\n')
    ecm = make_ecm(var, vae, random_gates=False)
    spec = TrainSpec(steps=4, batch=4, lr=5e-4, warmup=2, save_every=2)  # another learning rate
    with pytest.raises(CheckpointError, match=r"other settings .*lr 0\.001 -> 0\.0005"):
        train_ecm(ecm, var, control_data, tmp_path, spec, "canny", 0.5, 0.1, resume=True)
    _, rest = run(tiny_pair, control_data, tmp_path, 3, resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and rest[0]["step"] == 3


def test_canny_thresholds_and_unreadable_maps(tmp_path):
    from PIL import Image

    img = ProceduralShapes(1, 64, seed=1)[0][0]
    loose = Control("canny", canny_low=10, canny_high=20)(img)
    strict = Control("canny", canny_low=250, canny_high=400)(img)
    assert (loose > 0).sum() > (strict > 0).sum()
    with pytest.raises(ECMError, match="low <= high"):
        Control("canny", canny_low=200, canny_high=100)
    (tmp_path / "maps").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "maps" / "a.png")
    (tmp_path / "maps" / "b.png").write_bytes(b"not a png")
    ctrl = Control("folder:depth", tmp_path / "maps", resolution=8)
    ctrl.check_pairs([tmp_path / "a.jpg", tmp_path / "b.jpg"])  # both have a map; b's is found unreadable when read
    assert ctrl(img, tmp_path / "a.jpg").shape == (8, 8, 3)
    with pytest.raises(ECMError, match=r"cannot read control map .*b\.png"):
        ctrl(img, tmp_path / "b.jpg")


@pytest.mark.parametrize("preset", ["d16", "d20", "d24", "d30"])
def test_adapter_heads_divide_the_width_of_every_official_size(tiny_pair, batch, preset):
    """d30's adapters are 480 wide: one head per 64 channels does not divide it; the heads must, or the
    adapters' attention cannot even run (the width is kept, the heads chosen around 64 channels each)."""
    from ecm.runtime.errors import ConfigError

    from ecm.model.config import var_config

    cfg = ecm_config(var_config(preset), 16)
    assert cfg.width % cfg.heads == 0 and 48 <= cfg.width // cfg.heads <= 80
    vae, var = tiny_pair
    label, x, ctrl = batch
    ecm = randomize_(ECM(ecm_config(var.config, vae.config.downsample, adapter_dim=cfg.width)), 0)
    with torch.no_grad():
        assert var(label, x, ecm, ecm.control_tokens(ctrl)).shape[1] == x.shape[1] + 1
    with pytest.raises(ConfigError, match="do not divide"):
        ecm_config(var.config, vae.config.downsample, adapter_dim=480, adapter_heads=7)
