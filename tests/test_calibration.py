"""INT8: calibration data, the Q/DQ and CPU forms, the export and its report, bad calibration input."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ecm.calibration import CalibOptions, export_int8
from ecm.calibration.pipeline import choose_activations
from ecm.calibration.quantize import (
    channel_absmax,
    gemms_to_matmuls,
    head_matmul,
    prepare,
    smooth,
    store_half,
    teacher_agreement,
)
from ecm.calibration.record import META_NAME, calibration_set, model_fingerprint, step_feeds
from ecm.calibration.report import PICTURE_NAME, REPORT_NAME
from ecm.export.onnx_files import load_onnx, save_onnx
from ecm.export.pipeline import ExportOptions, Models
from ecm.export.tensorrt_ops import graph_problems
from ecm.runtime.errors import ECMError
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend
from onnx import helper, numpy_helper
from PIL import Image

QUIET = dict(progress=lambda _: None)


@pytest.fixture(scope="session")
def calib_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calib-cache")


@pytest.fixture(scope="session")
def int8_export(tiny_pair, tiny_ecm, calib_cache, tmp_path_factory):
    """W8A8 Q/DQ graphs (INT8 activations, calibrated) beside the CPU forms."""
    out = tmp_path_factory.mktemp("int8")
    return export_int8(Models(tiny_pair[1], tiny_ecm), out, ExportOptions(),
                       CalibOptions(samples=4, batch=2, cache=calib_cache, activations="int8", report_images=4),
                       **QUIET)


@pytest.fixture(scope="session")
def weight_only_export(tiny_pair, tiny_ecm, tmp_path_factory):
    """W8A16 Q/DQ graphs: weight-only, so no calibration (its cache must stay empty)."""
    out, cache = tmp_path_factory.mktemp("int8-w8a16"), tmp_path_factory.mktemp("unused-cache")
    result = export_int8(Models(tiny_pair[1], tiny_ecm), out, ExportOptions(),
                         CalibOptions(cache=cache, activations="fp16", report_images=4), **QUIET)
    assert not any(cache.iterdir())
    return result


def test_int8_export_holds_both_forms_and_verifies(int8_export):
    m = int8_export.manifest
    assert m.precision == "int8" and m.kv_dtype == "float32"
    assert m.graphs["step_cpu"] == "var_ecm.cpu.onnx" and m.graphs["control_cpu"] == "var_ecm.control.cpu.onnx"
    assert m.runtime_graphs(cpu=True)["step"] == "var_ecm.cpu.onnx"
    assert m.runtime_graphs()["step"] == "var_ecm.onnx"
    folder = int8_export.folder
    assert not (folder / "fp32").exists()
    ops = {n.op_type for n in onnx.load(str(folder / "var_ecm.onnx"), load_external_data=False).graph.node}
    cpu_ops = {n.op_type for n in onnx.load(str(folder / "var_ecm.cpu.onnx"), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulNBits" in cpu_ops
    cpu, qdq = (onnx.load(str(folder / n), load_external_data=False) for n in ("var_ecm.cpu.onnx", "var_ecm.onnx"))
    widened = {n.output[0] for n in cpu.graph.node if n.op_type == "Cast" and n.name.endswith("_widen")}
    head = [n for n in cpu.graph.node if n.op_type == "MatMul" and n.input[1] in widened]
    assert len(head) == 1  # the vocabulary head: fp32 arithmetic on weights stored as fp16
    qdq_weights = {t.name for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert sum(n.op_type == "MatMulNBits" for n in cpu.graph.node) == sum(
        n.op_type == "DequantizeLinear" and n.input[0] in qdq_weights for n in qdq.graph.node)  # same layers
    report = json.loads((folder / REPORT_NAME).read_text())
    assert len(report["teacher_top1_qdq"]) == len(report["teacher_top1_cpu"]) == m.num_scales
    assert report["fidelity_fp32"] is not None and report["fidelity_int8"] is not None and report["metric"] == "F1"
    png = Image.open(folder / PICTURE_NAME)
    assert png.size[0] == 3 * (3 * m.image_size + 2 * 2)  # condition | fp32 | INT8, zoomed 3x
    # random tiny weights are harsh on INT8; the graphs must still follow fp32 closely at the first scales
    assert int8_export.report.scales[0].teacher_top1_agreement >= 0.75


@pytest.mark.parametrize("export", ["int8_export", "weight_only_export"])
def test_qdq_graphs_use_only_what_tensorrt_accepts(export, request):
    result = request.getfixturevalue(export)
    folder, w8a8 = result.folder, export == "int8_export"
    assert result.manifest.quantization == {"scope": "linear", "activations": "int8" if w8a8 else "fp16"}
    for name in ("var_ecm.onnx", "var_ecm.control.onnx"):
        assert graph_problems(folder / name) == []
        model = load_onnx(folder / name)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert len(qdq) > 10
        for n in qdq:
            assert inits[n.input[2]].dtype == np.int8 and not np.any(inits[n.input[2]])  # symmetric: zero point 0
            assert np.all(inits[n.input[1]] > 0)
        weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        assert weights and all(inits[n.input[0]].dtype == np.int8 for n in weights)
        assert all(inits[n.input[1]].ndim == 1 for n in weights)  # weights: one scale per output channel
        # W8A8 quantizes activations too; W8A16 only dequantizes weights, to fp16 (its scales' type)
        assert any(n.op_type == "QuantizeLinear" for n in qdq) == w8a8
        assert {inits[n.input[1]].dtype for n in weights} == {np.dtype(np.float32 if w8a8 else np.float16)}


def test_weight_only_graphs_follow_fp32_closely(weight_only_export, int8_export):
    """W8A16 loses less than W8A8: no activation ranges (a test of the rewrite, not of TensorRT)."""
    w8a16 = json.loads((weight_only_export.folder / REPORT_NAME).read_text())
    w8a8 = json.loads((int8_export.folder / REPORT_NAME).read_text())
    assert w8a16["activations"] == "fp16" and w8a8["activations"] == "int8"
    assert min(w8a16["teacher_top1_qdq"]) >= 0.9
    assert np.mean(w8a16["teacher_top1_qdq"]) >= np.mean(w8a8["teacher_top1_qdq"])


def test_teacher_agreement_and_the_auto_choice(tiny_pair, tiny_ecm, int8_export, weight_only_export, calib_cache,
                                               fp32_export):
    var, m = tiny_pair[1], int8_export.manifest
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    fp32 = fp32_export.folder
    step = fp32 / "var_ecm.onnx"
    feeds = list(step_feeds(cset, fp32, Manifest.load(fp32)))
    assert teacher_agreement(step, step, feeds, m.patch_nums) == [1.0] * m.num_scales
    w8a16 = teacher_agreement(step, weight_only_export.folder / "var_ecm.onnx", feeds, m.patch_nums)
    assert len(w8a16) == m.num_scales and min(w8a16) >= 0.9
    lines = []
    assert choose_activations([0.99, 0.96], 0.95, lines.append) == "int8" and "INT8 activations" in lines[-1]
    assert choose_activations([0.99, 0.90], 0.95, lines.append) == "fp16" and "W8A16" in lines[-1]


def test_the_tensorrt_check_refuses_bad_qdq(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "zp"),
             numpy_helper.from_array(np.array(0, np.int32), "zp32"),
             numpy_helper.from_array(np.ones(4, np.int32), "w32")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("Relu", ["q"], ["r"]),
             helper.make_node("DequantizeLinear", ["r", "s", "zp"], ["d"]),
             helper.make_node("DequantizeLinear", ["w32", "s", "zp32"], ["w"]),
             helper.make_node("Add", ["d", "w"], ["y"])]
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits)), str(path))
    problems = " | ".join(graph_problems(path))
    assert "zero point must be a constant 0" in problems
    assert "feeds something other than a DequantizeLinear" in problems
    assert "reads neither a QuantizeLinear nor an INT8 weight" in problems
    assert "not INT8" in problems


def test_the_cpu_runtime_runs_the_cpu_form_and_is_reproducible(int8_export):
    folder, m = int8_export.folder, int8_export.manifest
    backend = OrtBackend(folder, m)
    assert backend.sessions["step"]._model_path.endswith("var_ecm.cpu.onnx")
    loop = ScaleLoop(m, backend, 2)
    cond = np.zeros((2, m.image_size, m.image_size, 3), np.uint8)
    cond[:, 20:40, 20:40] = 255
    a = loop.run(np.array([1, 2]), cond, Sampling.defaults(m), seed=5).images
    b = loop.run(np.array([1, 2]), cond, Sampling.defaults(m), seed=5).images
    assert a.shape == (2, m.image_size, m.image_size, 3) and np.array_equal(a, b)


def test_calibration_data_is_recorded_once_and_reused(tiny_pair, tiny_ecm, int8_export, calib_cache):
    var, m = tiny_pair[1], int8_export.manifest
    lines = []
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, progress=lines.append)
    assert "reused" in lines[-1] and len(cset.batch_files) == 2
    again = calibration_set(var, tiny_ecm, m, cset.folder, calib_cache, progress=lines.append)
    assert again.meta == cset.meta and "recorded earlier" in lines[-1]
    with np.load(cset.batch_files[0]) as z:
        assert z["cond"].shape == (2, m.image_size, m.image_size, 3) and z["x0"].shape[-1] == 1
        assert z[f"u{m.num_scales - 1}"].shape == (2, m.patch_nums[-1] ** 2)


def test_step_feeds_rebuild_the_real_kv_cache(tiny_pair, tiny_ecm, int8_export, calib_cache, fp32_export):
    """Teacher forcing along a recorded trajectory gives the caches the eager generation built."""
    var, m = tiny_pair[1], int8_export.manifest
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    fp32 = fp32_export.folder
    feeds = list(step_feeds(cset, fp32, Manifest.load(fp32)))
    assert len(feeds) == 2 * m.num_scales
    last = feeds[m.num_scales - 1]
    b = sum(pn * pn for pn in m.patch_nums[:-1])
    assert last["past_k"].shape[0] == b and np.abs(last["past_k"]).max() > 0  # every earlier token's keys
    sess = ort.InferenceSession(str(fp32 / "var_ecm.onnx"))
    with np.load(cset.batch_files[0]) as z:
        for si in range(m.num_scales - 1):  # each scale's graph turns its recorded input into the next one
            x_next = sess.run(["x_next"], feeds[si])[0]
            np.testing.assert_allclose(x_next, z[f"x{si + 1}"], atol=1e-4)


def test_bad_calibration_input(tiny_pair, tiny_ecm, int8_export, calib_cache, tmp_path):
    var, m = tiny_pair[1], int8_export.manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ECMError, match="holds no images"):
        calibration_set(var, tiny_ecm, m, empty, calib_cache, **QUIET)
    with pytest.raises(ECMError, match="does not exist or is not a folder"):
        calibration_set(var, tiny_ecm, m, tmp_path / "missing", calib_cache, **QUIET)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    Image.new("L", (40, 30), 255).save(broken / "b.png")
    with pytest.raises(ECMError, match=r"1 calibration image\(s\) .* cannot be read \(a.png\)"):
        calibration_set(var, tiny_ecm, m, broken, calib_cache, **QUIET)
    recorded = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    other = tiny_ecm.__class__(tiny_ecm.config)  # same shapes, other weights
    with pytest.raises(ECMError, match="recorded with another model"):
        calibration_set(var, other, m, recorded.folder, calib_cache, **QUIET)
    meta = json.loads((recorded.folder / META_NAME).read_text())
    assert meta["model"] == model_fingerprint(var, tiny_ecm)


def test_condition_images_of_any_size_and_mode_calibrate(tiny_pair, tiny_ecm, int8_export, tmp_path):
    var, m = tiny_pair[1], int8_export.manifest
    folder = tmp_path / "maps"
    folder.mkdir()
    Image.new("L", (100, 80), 0).save(folder / "a.png")
    Image.new("RGBA", (64, 64), (255, 255, 255, 255)).save(folder / "b.png")
    Image.new("P", (30, 30)).save(folder / "c.bmp")
    cset = calibration_set(var, tiny_ecm, m, folder, tmp_path / "cache", samples=3, batch=2, **QUIET)
    assert cset.meta.samples == 3 and len(cset.batch_files) == 2


def test_smoothing_and_rewrites_are_exact(tmp_path):
    """Gemm -> MatMul + Add, SmoothQuant's x/s, sW and fp16 storage leave the function unchanged."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 8])
    y = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [3, 5])
    w1, b1 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w2 = rng.normal(size=(16, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))
    src = tmp_path / "m.onnx"
    save_onnx(model, src)
    feed = {"x": (rng.normal(size=(3, 8)) * np.array([1, 50, 1, 1, 1, 1, 1, 1])).astype(np.float32)}
    want = ort.InferenceSession(str(src)).run(None, feed)[0]

    m2 = load_onnx(src)
    assert gemms_to_matmuls(m2) == 1 and head_matmul(m2) == "head"
    absmax = channel_absmax(src, ["x"], [feed])
    np.testing.assert_allclose(absmax["x"], np.abs(feed["x"]).max(axis=0))
    assert smooth(m2, ["fc"], absmax) == 1
    scale = np.abs(want).max()
    for half, tol in ((False, 1e-5), (True, 2e-3)):  # fp16 storage rounds the weights, nothing else does
        if half:
            assert store_half(m2, min_elements=64) == 2  # w1 (128 values) and w2 (80); b1 stays fp32
        out = tmp_path / f"smoothed{half}.onnx"
        save_onnx(m2, out)
        got = ort.InferenceSession(str(out)).run(None, feed)[0]
        np.testing.assert_allclose(got, want, atol=tol * scale)
        m2 = load_onnx(out)
    with tempfile.TemporaryDirectory() as work:
        assert prepare(src, Path(work)).nodes == ["fc"]  # the head stays out of the default scope


def test_int8_checks_its_options(tiny_pair, tiny_ecm, tmp_path):
    with pytest.raises(ECMError, match="unknown quantization scope"):
        export_int8(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(), CalibOptions(scope="most"),
                    **QUIET)
    with pytest.raises(ECMError, match="static-scales"):
        export_int8(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(static_scales=True), **QUIET)
    with pytest.raises(ECMError, match="unknown INT8 activation precision"):
        export_int8(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(), CalibOptions(activations="int4"),
                    **QUIET)
    with pytest.raises(ECMError, match="--calib has no use with --int8-activations fp16"):
        export_int8(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(),
                    CalibOptions(source=tmp_path, activations="fp16"), **QUIET)
    with pytest.raises(ECMError, match="needs opset 19"):
        export_int8(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(opset=17),
                    CalibOptions(activations="fp16"),
                    **QUIET)
    assert not any(tmp_path.iterdir())


def test_smoothing_leaves_products_of_two_activations_alone(tmp_path):
    """Scope 'all' quantizes attention products too; only products with a weight can take SmoothQuant's s."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])
    w = rng.normal(size=(8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"),
             helper.make_node("Transpose", ["x"], ["xt"], name="t"),
             helper.make_node("MatMul", ["h", "xt"], ["y"], name="scores")]
    src = tmp_path / "a.onnx"
    save_onnx(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])), src)
    feed = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(src)).run(None, feed)[0]
    model = load_onnx(src)
    assert smooth(model, ["linear", "scores"], channel_absmax(src, ["x", "h"], [feed])) == 1
    out = tmp_path / "b.onnx"
    save_onnx(model, out)
    np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, feed)[0], want, rtol=1e-4, atol=1e-4)
