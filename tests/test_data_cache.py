"""Training caches (ecm-prepare) and streaming training and evaluation over them."""

import json
from pathlib import Path

import numpy as np
import pytest
from ecm.runtime.errors import ECMError
from ecm.runtime.images import preprocess, read_image
from ecm.runtime.scales import prefix_ends
from PIL import Image

from ecm.cli.eval import evaluate
from ecm.cli.prepare import main as prepare_cli
from ecm.cli.train import train
from ecm.data.cache import TokenCache, map_bytes
from ecm.data.controls import Control
from ecm.data.datasets import SHAPES, ProceduralShapes
from ecm.model.embedded import load_backbone
from ecm.train.loop import Dist
from ecm.train.prepare import summarize
from ecm.train.pretrain import tokenize
from ecm.train.stream import CacheReader, StepBatches
from tests.test_reliability import assert_error, invoke, killed_on_rename

IMAGES = 24
SHARD = 8


def write_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` procedural 64-px PNGs in ImageNet layout (a folder per class)."""
    ds = ProceduralShapes(n, 64, seed=seed)
    for i in range(n):
        img, label = ds[i]
        (root / SHAPES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / SHAPES[label] / f"img{i:04d}.png")
    return root


def prepare_args(folder: Path, out: Path, *extra) -> list:
    return [folder, "--out", out, "--shard-size", SHARD, *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "train", IMAGES)


@pytest.fixture(scope="module")
def cache(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "train-canny"
    code, text = invoke(prepare_cli, prepare_args(folder, out))
    assert code == 0, text
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ ecm-prepare
def test_cache_holds_the_tokens_labels_and_maps_of_every_image(folder, cache):
    vae, _ = load_backbone()
    paths = sorted(folder.rglob("*.png"))
    images = np.stack([preprocess(read_image(p), 64) for p in paths])
    c = TokenCache(cache)
    got = c.read(np.arange(len(c)))
    assert len(c) == IMAGES and c.info.num_shards == IMAGES // SHARD and c.info.map_format == "bits"
    assert c.info.classes == sorted({p.parent.name for p in paths})
    np.testing.assert_array_equal(got.tokens_BL, tokenize(vae, images, show=False).numpy())
    np.testing.assert_array_equal(got.labels_B, [c.info.classes.index(p.parent.name) for p in paths])
    canny = Control("canny", resolution=64)
    np.testing.assert_array_equal(got.maps_BHW3, np.stack([canny(im) for im in images]))
    assert got.tokens_BL.dtype == np.int16
    shuffled = np.array([17, 3, 9, 3])  # any order, repeats, across shards
    np.testing.assert_array_equal(c.read(shuffled).tokens_BL, got.tokens_BL[shuffled])
    s = summarize(cache)
    assert s.map_bytes == map_bytes("bits", 64) == 64 * 64 // 8
    assert s.bytes_per_image < s.token_bytes + s.map_bytes + 400  # npy headers spread over 8 images


def test_prepare_killed_mid_shard_then_run_again_equals_one_go(folder, cache, tmp_path):
    out = tmp_path / "cache"
    killed_on_rename(out / "shard-00001", "ecm.cli.prepare", "main", *prepare_args(folder, out))
    assert (out / "shard-00000").is_dir() and not (out / "shard-00001").exists()
    assert [p.name for p in out.glob(".shard-00001.tmp-*")]  # the write the kill interrupted, by its own name
    with pytest.raises(ECMError, match=r"unfinished \(1 of 3 shards\); run the same ecm-prepare command again"):
        TokenCache(out)
    code, text = invoke(prepare_cli, prepare_args(folder, out))
    assert code == 0, text
    assert files_of(out) == files_of(cache)  # byte for byte, leftovers gone


def test_prepare_killed_before_its_cache_file_then_run_again_equals_one_go(folder, cache, tmp_path):
    out = tmp_path / "cache"
    killed_on_rename(out / "cache.json", "ecm.cli.prepare", "main", *prepare_args(folder, out))
    assert (out / "files.txt").is_file() and not (out / "cache.json").exists()
    code, text = invoke(prepare_cli, prepare_args(folder, out))
    assert code == 0, text
    assert files_of(out) == files_of(cache)


def test_worker_processes_make_the_same_cache(folder, cache, tmp_path):
    code, text = invoke(prepare_cli, prepare_args(folder, tmp_path / "cache", "--workers", 2))
    assert code == 0, text
    assert files_of(tmp_path / "cache") == files_of(cache)


def test_a_reader_keeps_a_bounded_number_of_shards_mapped(folder, tmp_path):
    code, text = invoke(prepare_cli, [folder, "--out", tmp_path / "c", "--shard-size", 1])
    assert code == 0, text
    c = TokenCache(tmp_path / "c")
    c.max_open = 5
    whole = TokenCache(tmp_path / "c").read(np.arange(IMAGES))
    for i in np.random.default_rng(0).permutation(IMAGES):
        np.testing.assert_array_equal(c.read(np.array([i])).tokens_BL[0], whole.tokens_BL[i])
        assert len(c._open) <= 5


def test_unreadable_images_are_skipped_and_named_up_to_max_bad(tmp_path):
    src = write_images(tmp_path / "imgs", 10)
    first = sorted(src.iterdir())[0]
    (first / "broken.png").write_bytes(b"not a png")
    code, text = invoke(prepare_cli, prepare_args(src, tmp_path / "c", "--max-bad", 0.1))
    assert code == 0 and "1 unreadable images skipped" in text, text
    assert (tmp_path / "c" / "bad.txt").read_text().startswith(f"{first.name}/broken.png\tcannot read image")
    assert len(TokenCache(tmp_path / "c")) == 10
    code, text = invoke(prepare_cli, prepare_args(src, tmp_path / "d", "--max-bad", 0))
    assert_error(code, text, "1 of 11 images could not be read (more than --max-bad 0.0%), e.g. cannot read image")


def test_map_formats_that_cannot_hold_the_maps_are_refused(tmp_path):
    src = write_images(tmp_path / "train", 4)
    maps = tmp_path / "maps"
    for k, p in enumerate(sorted(src.rglob("*.png"))):  # the first map grey, a later one in colour
        (maps / p.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("L" if k == 0 else "RGB").save(maps / p.parent.name / p.name)
    args = ["--control", "folder:seg", "--control-dir", maps]
    code, text = invoke(prepare_cli, [src, "--out", tmp_path / "a", *args, "--map-format", "bits"])
    assert_error(code, text, "--map-format bits keeps one bit per pixel, but folder:seg maps are not two-valued")
    code, text = invoke(prepare_cli, [src, "--out", tmp_path / "b", *args])
    assert_error(code, text, "is in colour, but the first map was grey")
    code, text = invoke(prepare_cli, [src, "--out", tmp_path / "c", *args, "--map-format", "rgb"])
    assert code == 0 and TokenCache(tmp_path / "c").info.map_format == "rgb", text


def test_caches_of_another_setting_are_refused(folder, cache, tmp_path):
    code, text = invoke(train, ["--data", cache, "--canny-low", 50, "--out", tmp_path / "run"])
    assert_error(code, text, "was made for another setting (canny 100,200 -> 50,200)")
    code, text = invoke(prepare_cli, prepare_args(folder, cache, "--canny-low", 50))
    assert_error(code, text, "holds a cache made for another setting")
    from ecm.model.checkpoint import save_model
    from ecm.model.vqvae import VQVAE

    vae, _ = load_backbone()
    other = VQVAE(vae.config)
    save_model(other, tmp_path / "vae.safetensors", "vqvae", vae.config)
    code, text = invoke(evaluate, ["--data", cache, "--vae", tmp_path / "vae.safetensors", "--num-images", 1,
                                   "--grid", tmp_path / "g.png"])
    assert_error(code, text, "was made for another setting (vqvae ")


# ------------------------------------------------------------------------------------ streaming training
def test_epochs_split_over_processes_like_one_process_reads_them():
    """Each epoch visits an image at most once; two processes read disjoint halves whose union is the batch one
    process reads alone, with the same early-centric cut; a cut batch reads only its token prefix."""
    pn = (1, 2, 3, 4, 6, 8)
    one = list(StepBatches(30, 4, Dist(), 7, pn, 0.8, steps=14))
    two = [list(StepBatches(30, 2, Dist(r, 2), 7, pn, 0.8, steps=14)) for r in range(2)]
    assert [s for s, _, _ in one] == list(range(14))
    for epoch in (one[:7], one[7:]):
        seen = np.concatenate([idx for _, idx, _ in epoch])
        assert len(set(seen)) == len(seen) == 28
    for (_, idx, K), (_, a, Ka), (_, b, Kb) in zip(one, *two):
        assert K == Ka == Kb and not set(a) & set(b) and set(a) | set(b) == set(idx)
    assert {K for *_, K in one} > {6}  # some batches are cut
    resumed = list(StepBatches(30, 4, Dist(), 7, pn, 0.8, start=9, steps=14))
    assert all(np.array_equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(resumed, one[9:]))


def test_cut_batches_read_only_their_token_prefix(cache):
    reader = CacheReader(TokenCache(cache))
    ends = prefix_ends((1, 2, 3, 4, 6, 8))
    for K in (2, 4, 6):
        got = reader[(0, np.array([5, 1, 20]), K)]
        assert got["tokens"].shape == (3, ends[K - 1])


def test_streaming_training_killed_mid_epoch_resumes_with_the_same_losses(cache, tmp_path):
    args = ["--data", cache, "--steps", 9, "--batch", 4, "--save-every", 3, "--workers", 1]
    code, text = invoke(train, [*args, "--out", tmp_path / "whole"])
    assert code == 0, text
    assert "6 steps per epoch" in text
    run = tmp_path / "killed"
    killed_on_rename(run / "train_state.pt", "ecm.cli.train", "train", *args, "--out", run, nth=2)
    assert [r["step"] for r in log_of(run)] == list(range(1, 7))  # the state of step 6 was never committed
    code, text = invoke(train, [*args, "--out", run, "--resume"])
    assert code == 0, text
    whole, resumed = log_of(tmp_path / "whole"), log_of(run)
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]  # step 4 (mid-epoch) on: exactly the same


def test_resume_under_another_number_of_processes_is_refused(tmp_path):
    """Every step's global batch depends on the number of processes: resuming under another would not continue
    the same run."""
    import torch
    from ecm.runtime.errors import CheckpointError

    from ecm.train.loop import TrainSpec, load_train_state, save_train_state

    task = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(task.parameters())
    save_train_state(tmp_path, task, opt, 3, TrainSpec(), world=2)
    assert load_train_state(tmp_path, task, opt, TrainSpec(), 3, world=2) == 3
    with pytest.raises(CheckpointError, match=r"processes 2 -> 1"):
        load_train_state(tmp_path, task, opt, TrainSpec(), 3, world=1)


def test_epochs_need_data(tmp_path):
    code, text = invoke(train, ["--epochs", 1, "--out", tmp_path / "run"])
    assert_error(code, text, "--epochs counts passes over --data")


def test_an_image_folder_is_prepared_into_the_run_then_streamed(folder, tmp_path):
    code, text = invoke(train, ["--data", folder, "--epochs", 1, "--batch", 8, "--workers", 0, "--out",
                                tmp_path / "run"])
    assert code == 0, text
    assert len(TokenCache(tmp_path / "run" / "cache")) == IMAGES and len(log_of(tmp_path / "run")) == 3


# ------------------------------------------------------------------------------------ evaluation
def test_eval_streams_a_cache_and_says_when_its_images_are_gone(folder, cache, tmp_path):
    args = ["--data", cache, "--num-images", 2, "--grid", tmp_path / "g.png", "--json", tmp_path / "e.json"]
    code, text = invoke(evaluate, args)
    assert code == 0 and "canny F1 on 2 held-out images" in text, text
    assert json.loads((tmp_path / "e.json").read_text())["ground_truth"] == 1.0
    moved = folder.rename(folder.with_name("elsewhere"))
    try:
        code, text = invoke(evaluate, args)
    finally:
        moved.rename(folder)
    assert code == 0 and "ground-truth images (ceiling)" in text and "n/a" in text, text
    assert json.loads((tmp_path / "e.json").read_text())["ground_truth"] is None


def test_maps_from_a_folder_pair_by_relative_path_and_are_scored_only_with_an_extractor(tmp_path, monkeypatch):
    from ecm.runtime import controls

    src = write_images(tmp_path / "train", 8)
    for p in src.rglob("*.png"):  # grey 'depth' maps mirroring the image folder, of another size
        rel = p.relative_to(src)
        (tmp_path / "depth" / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("L").resize((50, 50)).save(tmp_path / "depth" / rel)
    args = ["--control", "folder:depth", "--control-dir", tmp_path / "depth"]
    code, text = invoke(prepare_cli, [src, "--out", tmp_path / "c", *args])
    assert code == 0, text
    c = TokenCache(tmp_path / "c")
    assert c.info.map_format == "grey" and summarize(tmp_path / "c").map_bytes == 64 * 64
    first = sorted(src.rglob("*.png"))[0]
    want = preprocess(read_image(tmp_path / "depth" / first.relative_to(src)), 64)
    np.testing.assert_array_equal(c.read(np.array([0])).maps_BHW3[0], want)

    run = tmp_path / "run"
    code, text = invoke(train, ["--data", tmp_path / "c", "--control", "folder:depth", "--steps", 1, "--batch", 4,
                                "--workers", 0, "--out", run])
    assert code == 0, text
    ev = ["--ecm", run / "ecm.safetensors", "--data", tmp_path / "c", "--num-images", 2, "--grid", tmp_path / "g.png"]
    code, text = invoke(evaluate, ev)
    assert_error(code, text, "no fidelity metric exists for folder:depth")
    grey = controls.ControlType("depth", lambda img: np.asarray(Image.fromarray(img).convert("L")))
    monkeypatch.setitem(controls._REGISTRY, "depth", grey)
    code, text = invoke(evaluate, ev)
    assert code == 0 and "folder:depth map RMSE on 2 held-out images" in text, text
