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
