"""The built-in controls that need no network weights: canny, sketch (XDoG), lowres, grayscale."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from ecm.runtime.controls import BUILT_IN, LOWRES_FACTOR, PSNR_CAP, control_type
from ecm.runtime.images import prepare_condition, preprocess, read_image
from ecm.runtime.manifest import ControlSpec
from PIL import Image

from ecm.cli.eval import evaluate
from ecm.cli.prepare import main as prepare_cli
from ecm.cli.train import train
from ecm.data.cache import TokenCache
from ecm.data.datasets import HELD_OUT_SEED, ProceduralShapes
from tests.test_data_cache import write_images
from tests.test_reliability import invoke

PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Held-out procedural images at 64 px and the real photos at 256 px."""
    ds = ProceduralShapes(12, 64, HELD_OUT_SEED)
    return [ds[i][0] for i in range(12)] + [preprocess(read_image(p), 256) for p in PHOTOS]


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_each_control_is_met_by_its_own_image_and_not_by_another(images, name):
    kind = control_type(name)
    for img, other in zip(images, images[1:] + images[:1]):
        cond = kind.extract(img)
        assert cond.shape == img.shape and cond.dtype == np.uint8
        if kind.binary:
            assert set(np.unique(cond)) <= {0, 255}
        best = kind.score(img, cond)
        assert best == (1.0 if kind.binary else PSNR_CAP)
        if other.shape == img.shape:
            worse = kind.score(other, cond)
            assert worse < best * (0.8 if kind.binary else 0.3), (name, worse)


def test_sketch_lines_are_xdog_lines_along_the_edges(images):
    """As dense as Canny's edges (a few % of the pixels) and lying along them: within 2 px of a Canny edge."""
    for img in images:
        lines = control_type("sketch").extract(img)[..., 0] > 0
        edges = control_type("canny").extract(img)[..., 0]
        near = cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0
        assert 0.01 < lines.mean() < 0.2
        assert (lines & near).sum() >= 0.9 * lines.sum()


def test_lowres_is_the_block_average_and_a_small_map_is_taken_as_it_is(images):
    f = LOWRES_FACTOR
    for img in images:
        cond = control_type("lowres").extract(img)
        R = img.shape[0]
        small = img.reshape(R // f, f, R // f, f, 3).astype(np.float64).mean(axis=(1, 3))
        np.testing.assert_array_equal(cond[::f, ::f], np.round(small).astype(np.uint8))
        np.testing.assert_array_equal(cond, cond[::f, ::f].repeat(f, 0).repeat(f, 1))
        given = prepare_condition(Image.fromarray(cond[::f, ::f]), ControlSpec("lowres", R))
        np.testing.assert_array_equal(given, cond)  # a user's small image, enlarged the same way


def test_grayscale_is_the_bt601_luminance(images):
    for img in images:
        cond = control_type("grayscale").extract(img)
        assert (cond[..., 0] == cond[..., 1]).all() and (cond[..., 0] == cond[..., 2]).all()
        pil = np.asarray(Image.fromarray(img).convert("L")).astype(int)
        assert np.abs(cond[..., 0].astype(int) - pil).max() <= 1


@pytest.mark.parametrize("name, fmt", [("sketch", "bits"), ("lowres", "rgb"), ("grayscale", "grey")])
def test_built_in_controls_prepare_train_and_evaluate(tmp_path, name, fmt):
    src = write_images(tmp_path / "train", 8)
    code, text = invoke(prepare_cli, [src, "--out", tmp_path / "c", "--control", name])
    assert code == 0, text
    assert TokenCache(tmp_path / "c").info.map_format == fmt
    run = tmp_path / "run"
    code, text = invoke(train, ["--data", tmp_path / "c", "--control", name, "--steps", 1, "--batch", 4, "--workers",
                                0, "--out", run])
    assert code == 0, text
    code, text = invoke(evaluate, ["--ecm", run / "ecm.safetensors", "--num-images", 2, "--grid", tmp_path / "g.png"])
    metric = "F1" if fmt == "bits" else "PSNR dB"
    assert code == 0 and f"{name} {metric} on 2 held-out images" in text, text
