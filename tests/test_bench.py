"""ecm-bench: the analytic floor against independent counts, and a quick run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from ecm.export.pipeline import ExportOptions, make_manifest
from ecm.export.tensorrt import missing_tensorrt
from ecm.runtime.scales import begin_ends
from PIL import Image

from ecm import ECM, var_config, vqvae_config
from ecm.bench.models import make_pair, randomize_
from ecm.bench.roofline import PRECISION_BYTES, Floor, counted_flops, generation_bytes, generation_flops
from ecm.bench.suite import kv_per_scale
from ecm.cli.bench import main
from ecm.model.adapters import ecm_config


@pytest.fixture(scope="module")
def small():
    """A depth-2 tiny-preset backbone (six scales, 64 px) with two random adapters."""
    vae, var = make_pair(vqvae_config("tiny"), var_config("tiny", depth=2), seed=4)
    ecm = randomize_(ECM(ecm_config(var.config, vae.config.downsample, "tiny")), seed=6)
    return var, ecm


@pytest.mark.parametrize("with_ecm", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_flops_match_torch_count_of_eager_generation(small, with_ecm, batch):
    """Every matrix product of VAR.generate (control encoder, adapters, CFG rows, f_hat updates), counted by torch."""
    var, ecm = small
    ecm = ecm if with_ecm else None
    R = var.vae.config.resolution
    ctrl = torch.zeros(batch, 3, R, R) if with_ecm else None
    counted = counted_flops(var.generate, list(range(batch)), ecm=ecm, control_B3HW=ctrl, decode=False)
    analytic = generation_flops(var.config, ecm.config if ecm is not None else None, batch)
    assert sum(analytic.values()) == counted
    assert (analytic["adapters"] > 0) == with_ecm and (analytic["control encoder"] > 0) == with_ecm


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_kv_traffic_matches_manifest_shapes(small, precision):
    """Every scale reads its prefix and writes its tokens, in the shapes and dtype the runtime's cache has."""
    var, ecm = small
    m = make_manifest(var, ecm, ExportOptions(precision=precision))
    item = 2 if m.kv_dtype == "float16" else 4

    def kv(tokens: int) -> int:
        return 2 * item * (math.prod(m.kv_shape(tokens, 1)) + math.prod(m.adapter_kv_shape(tokens, 1)))

    expected = sum(kv(e) + kv(e - b) for b, e in begin_ends(m.patch_nums))
    assert generation_bytes(var, ecm, precision)["kv cache"] == expected
    assert PRECISION_BYTES[precision].kv == item


def test_kv_per_scale_adds_up_to_the_cache(small, tmp_path):
    var, ecm = small
    folders = {}
    for precision in ("fp32", "fp16"):
        folders[precision] = tmp_path / precision
        folders[precision].mkdir()
        make_manifest(var, ecm, ExportOptions(precision=precision)).save(folders[precision])
    kv = kv_per_scale(folders)
    assert [r["tokens"] for r in kv["per_scale"]] == [pn * pn for pn in var.config.patch_nums]
    for precision in ("fp32", "fp16"):
        assert kv["per_scale"][-1][f"cache_{precision}"] == kv["total_bytes"][precision]
    assert kv["total_bytes"]["fp32"] == 2 * kv["total_bytes"]["fp16"]


def test_floor_is_the_slower_of_compute_and_memory():
    f = Floor({"blocks": 2e9}, {"step weights": 1e9})
    assert f.seconds(gflops=100, gbps=10) == pytest.approx(0.1) and f.bound(100, 10) == "memory"
    assert f.seconds(gflops=10, gbps=100) == pytest.approx(0.2) and f.bound(10, 100) == "compute"


@pytest.mark.slow  # four exports and a run of every backend: over a minute on two cores
def test_quick_run_reports_every_figure(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = CliRunner().invoke(main, ["--quick", "--json", str(out), "--png", str(png)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads(out.read_text())
    assert r["machine"]["matmul_gflops"] > 0 and r["machine"]["memory_gbps"] > 0
    reason = missing_tensorrt()
    model = r["models"]["default"]
    labels = [row["label"] for row in model["rows"]]
    assert labels[:4] == ["eager PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime fp16",
                          "ONNX Runtime int8 (CPU form)"]
    if reason is None:
        assert labels[4:] == ["TensorRT fp16", "TensorRT int8"] and model["tensorrt"] is None
    else:
        assert model["tensorrt"] == f"not available: {reason}" and model["tensorrt"] in result.output
    for row in model["rows"]:
        assert row["s_per_img"] > 0 and row["floor_s"] > 0 and row["x_floor"] == row["s_per_img"] / row["floor_s"]
        assert row["vs_eager"] == row["s_per_img"] / model["rows"][0]["s_per_img"]
        if row["backend"] != "tensorrt":
            assert row["peak_mb"] > 0
        if row["backend"] == "onnxruntime":
            assert 0 < row["decoder_share"] < 1 and row["peak_vs_held"] > 0
            assert row["vs_fp32"] == row["s_per_img"] / model["rows"][1]["s_per_img"]
    assert model["adapter_overhead"]["ratio"] > 0
    assert len(model["kv_cache"]["per_scale"]) == 6
    floor = model["floor"]
    assert floor["flops"]["decoder"] > 0 and floor["flops"]["adapters"] > 0
    assert set(floor["seconds"]) == set(floor["bytes_total"]) == {"fp32", "fp16", "int8"}
    assert floor["bytes_total"]["int8"] < floor["bytes_total"]["fp16"] < floor["bytes_total"]["fp32"]
    training = r["training"]
    assert training["early"]["tokens"] > 0 and training["full"]["sec"] > 0 and training["ratio"]["sec"] > 0
    for text in ("s/img", "x floor", "adapter overhead", "analytic floor", "KV cache per scale", "tokens/iter",
                 "GFLOP/s"):
        assert text in result.output
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 500


def test_an_export_is_timed_in_a_process_of_its_own(tmp_path):
    """ecm-bench's exports of the official stand-ins: ecm-export with its defaults in a child process, whose own
    wall time and peak RSS are reported (here on the embedded default's checkpoint files)."""
    from ecm.export.pipeline import Checkpoints
    from ecm.runtime.manifest import Manifest

    from ecm.bench.suite import timed_export
    from ecm.model.embedded import default_paths

    vae, var, ecm = default_paths()
    run = timed_export(Checkpoints(vae, var, (ecm,)), "fp16", tmp_path / "fp16", tmp_path / "cache")
    assert Manifest.load(tmp_path / "fp16").precision == "fp16"
    assert run["wall_s"] > 0 and 100 < run["peak_mb"] < 4096
    assert "device memory (fp16)" in (tmp_path / "fp16.log").read_text()
