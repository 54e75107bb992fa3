"""Several controls at once and zero-shot inpainting: eager, exported (ONNX Runtime) and through ecm-run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from ecm.export.pipeline import ExportOptions, Models, export_model
from ecm.export.tensorrt_ops import graph_problems
from ecm.runtime.controls import control_type
from ecm.runtime.engine import open_engine
from ecm.runtime.errors import ConfigError, ECMError
from ecm.runtime.inpaint import keep_masks, outpaint_canvas, parse_margins
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest, ManifestError
from PIL import Image

from ecm.bench.composable import held_out
from ecm.bench.models import randomize_
from ecm.cli.run import main as run_cli
from ecm.model.adapters import ECM, ControlMix, ecm_config
from ecm.model.inpaint import Known
from ecm.model.pixels import to_model_range, to_uint8
from tests.test_reliability import assert_error, invoke

QUIET = dict(progress=lambda _: None)
WEIGHTS = {"canny": 1.0, "lowres": 0.6}


@pytest.fixture(scope="module")
def lowres_ecm(tiny_pair):
    """A second random adapter set (gates non-zero), following lowres."""
    _, var = tiny_pair
    return randomize_(ECM(ecm_config(var.config, var.vae.config.downsample, "tiny", control="lowres")), seed=9)


@pytest.fixture(scope="module")
def mix(tiny_ecm, lowres_ecm):
    return ControlMix([tiny_ecm, lowres_ecm], list(WEIGHTS.values()))


@pytest.fixture(scope="module")
def mix_export(tiny_pair, mix, tmp_path_factory):
    """Both adapter sets merged into one fp32 step graph."""
    return export_model(Models(tiny_pair[1], mix), tmp_path_factory.mktemp("mix"), ExportOptions(precision="fp32"),
                        **QUIET)


@pytest.fixture(scope="module")
def held(tiny_pair):
    """Two held-out images, their labels and their canny and lowres conditions."""
    images, labels = held_out(2, 64)
    conds = {name: np.stack([control_type(name).extract(im) for im in images]) for name in WEIGHTS}
    return images, labels % tiny_pair[1].num_classes, conds


def eager(var, m, labels, **kw):
    s = Sampling.defaults(m)
    return var.generate(torch.from_numpy(labels), cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature,
                        seed=0, candidates=m.candidates, **kw)


def same_tokens(gen, traj) -> bool:
    return all(np.array_equal(a.numpy(), b) for a, b in zip(gen.idx_list, traj.tokens))


@torch.no_grad()
def test_a_mix_of_one_is_the_ecm_and_weight_zero_is_the_backbone(tiny_pair, tiny_ecm, held):
    _, var = tiny_pair
    _, labels, conds = held
    ctrl = to_model_range(conds["canny"])
    alone = var.generate(labels, seed=3, ecm=tiny_ecm, control_B3HW=ctrl)
    one = var.generate(labels, seed=3, ecm=ControlMix([tiny_ecm]), control_B3HW=[ctrl])
    off = var.generate(labels, seed=3, ecm=ControlMix([tiny_ecm], [0.0]), control_B3HW=[ctrl], temperature="1.0:0.8")
    plain = var.generate(labels, seed=3, temperature="1.0:0.8")
    assert torch.equal(alone.f_hat, one.f_hat) and torch.equal(off.f_hat, plain.f_hat)
    assert not torch.equal(alone.f_hat, plain.f_hat)  # the adapters act


def test_mixes_refuse_duplicate_controls_and_unequal_widths(tiny_pair, tiny_ecm):
    _, var = tiny_pair
    with pytest.raises(ConfigError, match="same control"):
        ControlMix([tiny_ecm, tiny_ecm])
    wide = ECM(ecm_config(var.config, var.vae.config.downsample, "tiny", control="sketch", adapter_dim=32))
    with pytest.raises(ConfigError, match="--preset"):
        ControlMix([tiny_ecm, wide])


def test_the_merged_step_graph_gives_the_eager_tokens(tiny_pair, mix, mix_export, held):
    _, var = tiny_pair
    _, labels, conds = held
    m = mix_export.manifest
    assert m.control_names == ["canny", "lowres"] and set(m.graphs) >= {"control", "control1", "encoder"}
    assert all(graph_problems(mix_export.folder / name) == [] for name in m.graphs.values())
    ctrls = [to_model_range(conds[n]) for n in WEIGHTS]
    with open_engine(mix_export.folder)[1] as backend:
        loop = ScaleLoop(m, backend, 2)
        both = loop.run(labels, conds, Sampling.defaults(m), weights=WEIGHTS, record=True)
        assert same_tokens(eager(var, m, labels, ecm=mix, control_B3HW=ctrls), both)
        # weights are graph inputs: another weight changes the image without a re-export
        other = loop.run(labels, conds, Sampling.defaults(m), weights={"canny": 1.0, "lowres": 0.0}, record=True)
        assert same_tokens(eager(var, m, labels, ecm=mix, control_B3HW=[ctrls[0], None]), other)
        assert not np.array_equal(both.f_hat, other.f_hat)
        with pytest.raises(ECMError, match="no 'depth' control"):
            loop.run(labels, {"depth": conds["canny"]}, Sampling.defaults(m))


@torch.no_grad()
def test_inpainting_keeps_the_known_tokens_exactly_as_eager(tiny_pair, mix, mix_export, held):
    _, var = tiny_pair
    images, labels, conds = held
    m = mix_export.manifest
    generate = np.zeros((2, 64, 64), np.float32)
    generate[:, 16:48, 24:56] = 1
    known = Known.encode(var.vae, to_model_range(images), generate)
    with open_engine(mix_export.folder)[1] as backend:
        loop = ScaleLoop(m, backend, 2)
        plain = loop.run(labels, conds["canny"], Sampling.defaults(m), record=True)
        edited = loop.run(labels, conds["canny"], Sampling.defaults(m), inpaint=(images, generate), record=True)
        again = loop.run(labels, conds["canny"], Sampling.defaults(m), record=True)
    want = eager(var, m, labels, ecm=mix, control_B3HW=to_model_range(conds["canny"]), known=known)
    assert same_tokens(want, edited)
    assert np.abs(want.f_hat.numpy() - edited.f_hat).max() < 1e-4
    assert np.abs(to_uint8(want.images).astype(int) - edited.images).max() <= 1
    kept = generate == 0  # the kept pixels show the input's reconstruction
    recon = to_uint8(var.vae.img_to_reconstructed_img(to_model_range(images)) * 0.5 + 0.5)
    assert np.abs(edited.images[kept].astype(int) - recon[kept]).max() <= 1
    for si, keep in enumerate(known.keep_list):  # kept tokens are the image's own, at every scale
        assert np.array_equal(edited.tokens[si][keep.numpy()], known.idx_list[si][keep].numpy())
    assert any(not np.array_equal(a, b) for a, b in zip(plain.tokens, edited.tokens))
    assert all(np.array_equal(a, b) for a, b in zip(plain.tokens, again.tokens))  # nothing kept once done


def test_fp16_merged_export_passes_the_tensorrt_operator_check(tiny_pair, mix, held, tmp_path):
    result = export_model(Models(tiny_pair[1], mix), tmp_path, ExportOptions(precision="fp16"), **QUIET)
    assert all(graph_problems(tmp_path / name) == [] for name in result.manifest.graphs.values())
    assert result.report.min_teacher_agreement > 0.95
    images, labels, conds = held
    with open_engine(tmp_path)[1] as backend:
        out = ScaleLoop(result.manifest, backend, 2).run(labels, conds, Sampling.defaults(result.manifest),
                                                         inpaint=(images, np.ones((2, 64, 64), np.float32)))
    assert out.images.shape == (2, 64, 64, 3)


def test_keep_masks_keep_every_token_that_reaches_the_kept_region():
    gen = np.zeros((1, 64, 64))
    gen[0, :, 32:] = 1  # right half
    keeps = keep_masks(gen, (1, 2, 3, 4))
    assert keeps[0].all()  # the one token covers both halves
    assert keeps[1].reshape(2, 2).tolist() == [[True, False], [True, False]]
    assert keeps[2].reshape(3, 3)[:, 1].all() and not keeps[2].reshape(3, 3)[:, 2].any()  # the middle column reaches
    assert not any(k.any() for k in keep_masks(np.ones((1, 64, 64)), (1, 2, 3)))
    assert all(k.all() for k in keep_masks(np.zeros((1, 64, 64)), (1, 2, 3)))


def test_outpainting_canvas_puts_the_image_in_the_box():
    img = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    c = outpaint_canvas(img, parse_margins("left=16,top=8"), 64)
    assert c.image.shape == (64, 64, 3) and (c.image == 200).all()  # margins repeat the border
    assert c.generate[8:, 16:].sum() == 0 and c.generate[:8].all() and c.generate[:, :16].all()
    with pytest.raises(ECMError, match="side=pixels"):
        parse_margins("middle=3")
    with pytest.raises(ECMError, match="no room"):
        outpaint_canvas(img, parse_margins("left=40,right=30"), 64)


def test_manifest_refuses_a_control_listed_twice(mix_export):
    d = mix_export.manifest.to_dict()
    d["controls"][1]["type"] = "canny"
    with pytest.raises(ManifestError, match="each control once"):
        Manifest.from_dict(d)


@pytest.fixture(scope="module")
def files(tmp_path_factory, held):
    images, _, conds = held
    d = tmp_path_factory.mktemp("edit")
    Image.fromarray(conds["canny"][0]).save(d / "edge.png")
    Image.fromarray(conds["lowres"][0][::4, ::4]).save(d / "small.png")
    Image.fromarray(images[0]).save(d / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:32, :32]).save(d / "small_mask.png")
    return d


def test_ecm_run_combines_controls_and_inpaints_without_torch(mix_export, files, tmp_path):
    code = ("import sys; from ecm.cli.run import main; "
            f"main(['--engine', {str(mix_export.folder)!r}, '--cond', 'canny={files / 'edge.png'}', "
            f"'--cond', 'lowres={files / 'small.png'}', '--control-weight', 'canny=1,lowres=0.6', "
            f"'--init', {str(files / 'photo.png')!r}, '--mask', {str(files / 'mask.png')!r}, '-n', '2', "
            f"'--out', {str(tmp_path / 'o.png')!r}], standalone_mode=False); "
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch imported: False" in out
    grid = np.asarray(Image.open(tmp_path / "o.png"))
    assert grid.shape[1] > 5 * 128  # two conditions, the canvas and two samples, each zoomed to 128 px
    code, out = invoke(run_cli, ["--engine", mix_export.folder, "--init", files / "photo.png", "--outpaint", "left=16",
                        "--out", tmp_path / "out.png"])
    assert code == 0, out


@pytest.mark.parametrize("args, message", [
    (["--init", "photo.png", "--mask", "small_mask.png"], "--mask is 32x32 but --init is 64x64"),
    (["--cond", "depth=edge.png"], "no 'depth' control"),
    (["--cond", "canny=edge.png", "--control-weight", "depth=1"], "no 'depth' control"),
    (["--cond", "canny=edge.png", "--control-weight", "lowres=1"], "no --cond follows"),
    (["--cond", "edge.png", "--mask", "mask.png"], "add --init"),
    (["--init", "photo.png"], "either --mask"),
    (["--cond", "canny=edge.png", "--cond", "edge.png"], "do not mix"),
    (["--cond", "canny=edge.png", "--control-weight", "canny=strong"], "name=number"),
    (["--cond", "canny=edge.png", "--control-weight", "canny=nan"], "name=number"),
    (["--cond", "canny=edge.png", "--control", "lowres"], "no --cond follows lowres"),
])
def test_bad_editing_and_mixing_input_gets_one_line(mix_export, files, tmp_path, args, message):
    args = [str(files / a) if (files / a).is_file() else a.replace("edge.png", str(files / "edge.png"))
            for a in args]
    assert_error(*invoke(run_cli, ["--engine", mix_export.folder, *args, "--out", tmp_path / "x.png"]), message)
