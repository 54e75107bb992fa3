"""Multi-process training through torchrun (DistributedDataParallel over gloo on the CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_pretrain_under_torchrun_with_two_processes(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_dir / "ecm-pretrain"),
           "--out", str(tmp_path / "bb"), "--vae-steps", "2", "--var-steps", "2", "--vae-batch", "2",
           "--var-batch", "2", "--num-images", "8", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "bb" / "var" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["tokens"] == 2 * 2 * 130  # two processes, two images each, L = 130
    assert (tmp_path / "bb" / "var.safetensors").is_file()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_prepare_and_train_on_two_processes_agree_with_one(tmp_path):
    """Two processes prepare disjoint shards of one cache (equal byte for byte to a cache made by one process)
    and train on disjoint halves of every batch (the same losses as one process on the whole batch)."""
    import numpy as np

    from tests.test_data_cache import files_of, log_of, write_images

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = write_images(tmp_path / "imgs", 16)

    def run(world: int, command: str, *args) -> None:
        launch = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2"] if world == 2 else []
        out = subprocess.run([*launch, str(bin_dir / command), *map(str, args)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]

    for world in (1, 2):
        run(world, "ecm-prepare", src, "--out", tmp_path / f"c{world}", "--shard-size", 4)
        run(world, "ecm-train", "--data", tmp_path / f"c{world}", "--steps", 3, "--batch", 8 // world,
            "--workers", 0, "--device", "cpu", "--out", tmp_path / f"r{world}")
    assert files_of(tmp_path / "c1") == files_of(tmp_path / "c2")
    one, two = log_of(tmp_path / "r1"), log_of(tmp_path / "r2")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
