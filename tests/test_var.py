"""The cached per-scale step is the teacher-forcing forward; generation is reproducible."""

import pytest
import torch

from ecm.model.sampler import cfg_weight, mix_cfg


def step_logits(var, label_B, x_BLCv):
    """Logits of every scale from the cached step, fed the teacher-forcing inputs."""
    cond_BD = var.class_cond(label_B)
    cache = var.new_cache(label_B.shape[0])
    out = []
    for si in range(len(var.patch_nums)):
        b, e = var.begin_ends[si]
        if si == 0:
            x_BlC = var.first_token_map(cond_BD)
        else:
            x_BlC = var.word_embed(x_BLCv[:, b - var.first_l: e - var.first_l]) + var.lvl_pos()[:, b:e]
        out.append(var.step(si, x_BlC, cond_BD, cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pair", ["tiny_pair", "d16_pair"])
@torch.no_grad()
def test_cached_step_equals_teacher_forcing(pair, request):
    vae, var = request.getfixturevalue(pair)
    res = vae.config.resolution
    img = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_BLCv = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(img))
    label_B = torch.tensor([1, var.num_classes])  # one conditional, one unconditional row
    tf = var(label_B, x_BLCv)
    assert tf.shape == (2, var.config.L, var.config.vocab_size) and tf.dtype == torch.float32
    assert tf.abs().max() > 1  # the check below is not vacuous
    st = step_logits(var, label_B, x_BLCv)
    for si, (b, e) in enumerate(var.begin_ends):
        diff = (st[:, b:e] - tf[:, b:e]).abs().max().item()
        assert diff <= 1e-4, f"scale {si}: max abs diff {diff}"


def test_cond_drop_follows_the_official_semantics(tiny_pair):
    vae, var = tiny_pair
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.zeros(1, 3, 64, 64)))
    with torch.no_grad():
        uncond = var(torch.tensor([var.num_classes]), x)
        var.cond_drop_rate = 1.0
        try:
            dropped = var(torch.tensor([2]), x)
        finally:
            var.cond_drop_rate = 0.0
    assert torch.equal(uncond, dropped)


def test_greedy_is_deterministic_and_is_the_cfg_argmax(tiny_pair):
    _, var = tiny_pair
    a = var.generate([0, 5], cfg=3.0, top_k=1, seed=0)
    b = var.generate([0, 5], cfg=3.0, top_k=1, seed=123)  # uniforms do not matter when greedy
    assert all(torch.equal(x, y) for x, y in zip(a.idx_list, b.idx_list))
    assert torch.equal(a.images, b.images)
    # The first scale's token is the argmax of the CFG-mixed logits (t = 0 there).
    with torch.no_grad():
        cond = var.class_cond(torch.tensor([0, 5, var.num_classes, var.num_classes]))
        logits = var.step(0, var.first_token_map(cond), cond, var.new_cache(4))
    assert torch.equal(a.idx_list[0], mix_cfg(logits, cfg_weight(3.0, 0, 6)).argmax(-1))


def test_seeded_sampling_is_reproducible(tiny_pair):
    _, var = tiny_pair
    kw = dict(cfg=1.5, top_k=100, top_p=0.9, temperature="1.0:0.8")
    a, b, c = var.generate([1, 2], seed=7, **kw), var.generate([1, 2], seed=7, **kw), var.generate([1, 2], seed=8, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.idx_list, b.idx_list))
    assert any(not torch.equal(x, y) for x, y in zip(a.idx_list, c.idx_list))
    assert a.images.shape == (2, 3, 64, 64) and 0 <= a.images.min() and a.images.max() <= 1


def test_temperature_changes_the_samples(tiny_pair):
    _, var = tiny_pair
    hot = var.generate([1], seed=3, temperature=5.0, top_k=0, top_p=0, decode=False)
    cold = var.generate([1], seed=3, temperature=0.05, top_k=0, top_p=0, decode=False)
    assert any(not torch.equal(x, y) for x, y in zip(hot.idx_list, cold.idx_list))


def test_official_entry_point(tiny_pair):
    _, var = tiny_pair
    img = var.autoregressive_infer_cfg(2, 3, g_seed=0, cfg=4.0, top_k=1)
    greedy = var.generate([3, 3], cfg=4.0, top_k=1, top_p=0.0)
    assert torch.equal(img, greedy.images)


def test_step_refuses_out_of_order_scales(tiny_pair):
    _, var = tiny_pair
    cond = var.class_cond(torch.tensor([0]))
    with pytest.raises(ValueError, match="scale 1 expects 4 tokens at cache fill 1"):
        var.step(1, torch.zeros(1, 4, var.config.embed_dim), cond, var.new_cache(1))
