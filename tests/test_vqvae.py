"""The quantizer: residual coding that gets finer with every scale, and consistent views of it."""

import torch

from ecm.model import interpolate as resample


def test_tokens_per_scale_and_shapes(tiny_pair):
    vae, _ = tiny_pair
    img = torch.rand(3, 3, 64, 64) * 2 - 1
    idx_list = vae.img_to_idxBl(img)
    assert [t.shape for t in idx_list] == [(3, pn * pn) for pn in vae.patch_nums]
    assert all(t.dtype == torch.int64 and 0 <= t.min() and t.max() < vae.config.vocab_size for t in idx_list)
    assert vae.idxBl_to_img(idx_list).shape == img.shape
    assert vae.quantize.idxBl_to_var_input(idx_list).shape == (3, 130 - 1, vae.config.z_channels)


def test_each_scale_codes_the_nearest_entry_to_the_remaining_residual(tiny_pair):
    vae, _ = tiny_pair
    quant = vae.quantize
    f = vae.img_to_f(torch.rand(2, 3, 64, 64) * 2 - 1).detach()
    idx_list = quant.f_to_idxBl(f)
    f_rest = f.clone()
    for si, (idx_Bl, pn) in enumerate(zip(idx_list, quant.patch_nums)):
        z_BlC = resample.area(f_rest, pn).flatten(2).transpose(1, 2)
        nearest = torch.cdist(z_BlC, quant.embedding.weight.unsqueeze(0)).argmin(-1)
        assert (nearest == idx_Bl).float().mean() > 0.99, f"scale {si}"
        f_rest = f_rest - quant.upsampled_residual(si, quant.embed(idx_Bl, pn))
    assert torch.allclose(f - f_rest, quant.idxBl_to_fhat(idx_list), atol=1e-5)


def test_var_input_is_the_area_sampled_partial_fhat(tiny_pair):
    vae, _ = tiny_pair
    quant = vae.quantize
    idx_list = vae.img_to_idxBl(torch.rand(1, 3, 64, 64) * 2 - 1)
    x_BLCv = quant.idxBl_to_var_input(idx_list)
    # Scale 3's input is the area-sampled sum of scales 0..2.
    partial = quant.idxBl_to_fhat(idx_list[:3] + [torch.zeros_like(t) for t in idx_list[3:]])
    partial = partial - sum(quant.upsampled_residual(si, quant.embed(torch.zeros_like(idx_list[si]), pn))
                            for si, pn in list(enumerate(quant.patch_nums))[3:])
    b = sum(pn * pn for pn in quant.patch_nums[:3]) - 1
    pn = quant.patch_nums[3]
    want = resample.area(partial, pn).flatten(2).transpose(1, 2)
    assert torch.allclose(x_BLCv[:, b: b + pn * pn], want, atol=1e-5)


def test_reconstruction_is_in_range(tiny_pair):
    vae, _ = tiny_pair
    with torch.no_grad():
        rec = vae.img_to_reconstructed_img(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert rec.shape == (1, 3, 64, 64) and rec.min() >= -1 and rec.max() <= 1
