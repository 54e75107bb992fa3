"""INT8: calibration data, the Q/DQ and CPU forms, the export and its report, bad calibration input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ecm.calibration import CalibOptions, export_int8
from ecm.calibration.pipeline import DYNAMIC, W8A8, choose
from ecm.calibration.quantize import (
    Prepared,
    gemms_to_matmuls,
    head_matmul,
    pack_nbits,
    prepare,
    quantize_cpu,
    quantize_dynamic,
    quantize_qdq,
    smoothing_scales,
    store_half,
)
from ecm.calibration.record import (
    META_NAME,
    calibrate,
    calibration_set,
    model_fingerprint,
    teacher_agreement,
    teacher_forced,
)
from ecm.calibration.report import PICTURE_NAME, REPORT_NAME
from ecm.export.onnx_files import Graph, load_onnx, save_onnx
from ecm.export.pipeline import ExportOptions, Models
from ecm.export.tensorrt_ops import graph_problems
from ecm.runtime.errors import ECMError
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import Manifest
from ecm.runtime.ort_backend import OrtBackend, Taps
from onnx import helper, numpy_helper
from PIL import Image

QUIET = dict(progress=lambda _: None)
OPSET = [helper.make_opsetid("", 20)]  # what ecm-export writes


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
    kernel = {"dynamic": "DynamicQuantizeMatMul", "blockwise": "MatMulNBits"}[m.quantization["cpu"]]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and kernel in cpu_ops
    cpu, qdq = (onnx.load(str(folder / n), load_external_data=False) for n in ("var_ecm.cpu.onnx", "var_ecm.onnx"))
    widened = {n.output[0] for n in cpu.graph.node if n.op_type == "Cast" and n.name.endswith("_widen")}
    head = [n for n in cpu.graph.node if n.op_type == "MatMul" and n.input[1] in widened]
    assert len(head) == 1  # the vocabulary head: fp32 arithmetic on weights stored as fp16
    qdq_weights = {t.name for t in qdq.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert sum(n.op_type == kernel for n in cpu.graph.node) == sum(
        n.op_type == "DequantizeLinear" and n.input[0] in qdq_weights for n in qdq.graph.node)  # same layers
    report = json.loads((folder / REPORT_NAME).read_text())
    assert len(report["teacher_top1_qdq"]) == len(report["teacher_top1_cpu"]) == m.num_scales
    assert report["fidelity_fp32"] is not None and report["fidelity_int8"] is not None and report["metric"] == "F1"
    png = Image.open(folder / PICTURE_NAME)
    assert png.size[0] == 3 * (3 * m.image_size + 2 * 2)  # condition | fp32 | INT8, zoomed 3x
    # random tiny weights are harsh on INT8; the graphs must still follow fp32 closely at the first scales
    assert int8_export.report.scales[0].teacher_top1_agreement >= 0.75
    # the decoder: fp16 for TensorRT, INT8 on a CPU within 40 dB of fp32 on the report's held-out latents
    decoder = onnx.load(str(folder / "var_ecm.decoder.onnx"), load_external_data=False)
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in decoder.graph.initializer}
    assert m.runtime_graphs(cpu=True)["decoder"] == "var_ecm.decoder.cpu.onnx"
    assert report["decoder"]["quantized"] >= 1 and report["decoder_psnr"] >= 40


@pytest.mark.parametrize("export", ["int8_export", "weight_only_export"])
def test_qdq_graphs_use_only_what_tensorrt_accepts(export, request):
    result = request.getfixturevalue(export)
    folder, w8a8 = result.folder, export == "int8_export"
    q = result.manifest.quantization
    assert (q["scope"], q["activations"]) == ("linear", "int8" if w8a8 else "fp16")
    assert q["cpu"] in ("dynamic", "blockwise") and q["decoder_cpu"] == ("int8" if w8a8 else "fp32")
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


def test_both_qdq_kinds_follow_fp32_closely(weight_only_export, int8_export):
    """Teacher-forced top-1 agreement with fp32 at every scale on held-out images, random tiny weights (a test
    of the rewrites, not of TensorRT): W8A16 has no activation ranges to lose by, W8A8 per-tensor ones."""
    w8a16 = json.loads((weight_only_export.folder / REPORT_NAME).read_text())
    w8a8 = json.loads((int8_export.folder / REPORT_NAME).read_text())
    assert w8a16["activations"] == "fp16" and w8a8["activations"] == "int8"
    assert min(w8a16["teacher_top1_qdq"]) >= 0.9 and min(w8a8["teacher_top1_qdq"]) >= 0.85


def test_teacher_agreement_and_the_auto_choice(tiny_pair, tiny_ecm, int8_export, weight_only_export, calib_cache,
                                               fp32_export):
    var, m = tiny_pair[1], int8_export.manifest
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    fp32, ref = fp32_export.folder, Manifest.load(fp32_export.folder)
    found = calibrate(cset, fp32, ref, {"step": ["transpose"]})
    assert len(found.top1) == 4 and len(found.top1[0]) == m.num_scales  # one per generation
    assert teacher_agreement(cset, fp32, ref, fp32 / "var_ecm.onnx", found.top1) == [1.0] * m.num_scales
    w8a16 = teacher_agreement(cset, fp32, ref, weight_only_export.folder / "var_ecm.onnx", found.top1)
    assert len(w8a16) == m.num_scales and min(w8a16) >= 0.9
    lines = []
    assert choose([0.99, 0.96], 0.95, W8A8, lines.append) == "int8" and "INT8 activations" in lines[-1]
    assert choose([0.99, 0.90], 0.95, W8A8, lines.append) == "fp16" and "W8A16" in lines[-1]
    assert choose([0.99, 0.90], 0.95, DYNAMIC, lines.append) == "blockwise" and "blockwise" in lines[-1]


def test_calibration_peaks_are_reduced_in_the_graph(tiny_pair, tiny_ecm, int8_export, calib_cache, fp32_export):
    """The per-channel peaks the calibration pass reduces inside the graph (a vector per run, not the activation)
    equal those of the whole activations read out of the same teacher-forced runs."""
    var, m = tiny_pair[1], int8_export.manifest
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    fp32, ref = fp32_export.folder, Manifest.load(fp32_export.folder)
    name = "transpose"
    found = calibrate(cset, fp32, ref, {"step": [name]})
    model = onnx.load(str(fp32 / "var_ecm.onnx"), load_external_data=False)
    model.graph.output.append(helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(fp32 / "whole.var_ecm.onnx"))
    peaks = []
    taps = [Taps("step", fp32 / "whole.var_ecm.onnx", [name],
                 lambda _, v: peaks.append(np.abs(v).reshape(-1, v.shape[-1]).max(axis=0)))]
    try:
        with OrtBackend(fp32, ref, taps=taps) as backend:
            for _ in teacher_forced(cset, backend, ref):
                pass
    finally:
        (fp32 / "whole.var_ecm.onnx").unlink()
    assert len(peaks) == 4 * m.num_scales  # one run per scale of each of the 4 generations
    np.testing.assert_array_equal(found.absmax["step"][name], np.max(peaks, axis=0))


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


def test_teacher_forcing_rebuilds_the_real_kv_cache(tiny_pair, tiny_ecm, int8_export, calib_cache, fp32_export):
    """Along a recorded trajectory the fp32 graphs sample the eager generation's tokens at every scale, each
    scale's tokens turning its recorded input into the next one: the caches are the ones eager generation built."""
    import torch

    var, m = tiny_pair[1], int8_export.manifest
    cset = calibration_set(var, tiny_ecm, m, None, calib_cache, samples=4, batch=2, **QUIET)
    fp32 = fp32_export.folder
    with OrtBackend(fp32, Manifest.load(fp32)) as backend:
        runs = list(teacher_forced(cset, backend, m))
    assert len(runs) == 4  # one generation at a time, though recorded in batches of two
    rows = [{k: v[j:j + 1] for k, v in batch.items()} for batch in cset.batches() for j in range(2)]
    quant = var.vae.quantize
    with torch.no_grad():
        for traj, row in zip(runs, rows):
            for si in range(m.num_scales - 1):
                tokens = quant.embed(torch.from_numpy(traj.tokens[si]), m.patch_nums[si])
                _, x_next = quant.next_input(si, torch.from_numpy(row[f"f{si}"]), tokens)
                np.testing.assert_allclose(x_next.numpy(), row[f"x{si + 1}"], atol=1e-4)


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
    palette = Image.new("P", (30, 30))
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])  # a real palette: Pillow < 13 cannot
    palette.save(folder / "c.bmp")  # read back the BMP of an empty one
    cset = calibration_set(var, tiny_ecm, m, folder, tmp_path / "cache", samples=3, batch=2, **QUIET)
    assert cset.meta.samples == 3 and len(cset.batch_files) == 2


def two_layers(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """A Gemm (transB), a ReLU and a head MatMul, saved with external weights; a feed with one outlier channel."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 8])
    y = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [3, 5])
    w1, b1 = rng.normal(size=(160, 8)).astype(np.float32), rng.normal(size=160).astype(np.float32)
    w2 = rng.normal(size=(160, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    src = tmp_path / "m.onnx"
    save_onnx(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=OPSET), src)
    feed = {"x": (rng.normal(size=(3, 8)) * np.array([1, 50, 1, 1, 1, 1, 1, 1])).astype(np.float32)}
    return src, feed, ort.InferenceSession(str(src)).run(None, feed)[0]


def test_graph_rewrites_are_exact_and_stream(tmp_path):
    """Gemm -> MatMul + Add and fp16 storage leave the function unchanged, written from the file a weight at a time."""
    src, feed, want = two_layers(tmp_path, np.random.default_rng(0))
    g = Graph.open(src)
    external = {t.name for t in g.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"w1", "w2"}  # left on disk (b1 is small enough to live inside the graph)
    assert gemms_to_matmuls(g) == 1 and head_matmul(g) == "head"
    scale = np.abs(want).max()
    for half, tol in ((False, 1e-5), (True, 2e-3)):  # fp16 storage rounds the weights, nothing else does
        h = g.copy()
        if half:
            assert store_half(h, min_elements=200) == 2  # w1 (1280 values) and w2 (800); b1 (160) stays fp32
        out = tmp_path / f"rewritten{half}.onnx"
        h.save(out)
        np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, feed)[0], want, atol=tol * scale)
    assert prepare(src).nodes == ["fc"]  # the head stays out of the default scope


def test_smoothquant_lowers_the_error_of_an_outlier_channel(tmp_path):
    """W8A8 of a layer whose input has one channel 50x the others: close to fp32, closer with SmoothQuant."""
    src, feed, want = two_layers(tmp_path, np.random.default_rng(0))
    prep = prepare(src)
    absmax = {"x": np.abs(feed["x"]).max(axis=0)}
    s = smoothing_scales(prep, absmax, 0.5)["x"]
    assert s.shape == (8,) and np.argmax(s) == 1  # the outlier channel is divided the most
    errors = []
    for alpha in (0.0, 0.5):
        out = tmp_path / f"w8a8_{alpha}.onnx"
        quantize_qdq(prep, out, absmax, alpha)
        assert graph_problems(out) == []
        errors.append(np.abs(ort.InferenceSession(str(out)).run(None, feed)[0] - want).max())
    assert errors[1] < errors[0] < 0.1 * np.abs(want).max()


def test_cpu_form_packs_weights_as_onnx_runtime_does(tmp_path):
    """Our MatMulNBits packing equals ONNX Runtime's own 8-bit quantizer byte for byte, and runs like fp32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(3)
    K, N = 300, 70  # K not a multiple of the block: padded
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, K])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, N])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x],
                                                [y], [numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 20)])
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=128, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    codes, scales = pack_nbits(w)
    assert np.array_equal(codes, theirs["w_Q8"]) and np.array_equal(scales, theirs["w_scales"])
    src = tmp_path / "mm.onnx"
    save_onnx(model, src)
    quantize_cpu(Prepared(Graph.open(src), ["mm"]), tmp_path / "mm.cpu.onnx")
    feed = {"x": rng.normal(size=(2, K)).astype(np.float32)}
    got = ort.InferenceSession(str(tmp_path / "mm.cpu.onnx")).run(None, feed)[0]
    np.testing.assert_allclose(got, feed["x"] @ w, atol=0.05 * np.abs(feed["x"] @ w).max())


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
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    save_onnx(helper.make_model(graph, opset_imports=OPSET), src)
    feed = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(src)).run(None, feed)[0]
    prep = prepare(src, "all")
    assert prep.nodes == ["linear", "scores"] and prep.activations == ["h", "x", "xt"]
    xs = {"x": feed["x"], "xt": feed["x"].T, "h": feed["x"] @ w}  # maxima per channel (last axis), as calibrated
    absmax = {name: np.abs(v).max(axis=0) for name, v in xs.items()}
    assert list(smoothing_scales(prep, absmax, 0.5)) == ["x"]  # h and xt feed no weight
    out = tmp_path / "b.onnx"
    quantize_qdq(prep, out, absmax, 0.5)
    model = onnx.load(str(out), load_external_data=False)
    assert sum(n.op_type == "Mul" for n in model.graph.node) == 1
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 3
    got = ort.InferenceSession(str(out)).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_dynamic_cpu_form_runs_like_fp32(tmp_path):
    """DynamicQuantizeMatMul per layer (the CPU's fastest INT8 kernels), with and without SmoothQuant's s."""
    src, feed, want = two_layers(tmp_path, np.random.default_rng(2))
    prep = prepare(src)
    smoothing = smoothing_scales(prep, {"x": np.abs(feed["x"]).max(axis=0)}, 0.5)
    for name, s in (("plain", {}), ("smoothed", smoothing)):
        out = tmp_path / f"{name}.onnx"
        quantize_dynamic(prep, out, s)
        ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
        assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("Mul") == (name == "smoothed")
        got = ort.InferenceSession(str(out)).run(None, feed)[0]
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_int8_decoder_keeps_40_db_on_the_trained_default(tmp_path):
    """The embedded default's trained decoder keeps every convolution in INT8 above 40 dB on held-out latents."""
    import torch
    from ecm.calibration.decoder import conv_costs, decoder_psnr, quantize_decoder
    from ecm.export.graphs import DecoderGraph
    from ecm.export.onnx_export import export_graph
    from ecm.runtime.controls import control_type

    from ecm.data.datasets import HELD_OUT_SEED, ProceduralShapes
    from ecm.model.embedded import load_default
    from ecm.model.pixels import to_model_range

    _, var, ecm = load_default()
    m = Manifest(precision="fp32", patch_nums=var.patch_nums, vocab_size=512, num_classes=8, image_size=64,
                 latent_channels=16, embed_dim=256, num_heads=4, cache_layers=4, num_phi=4, batch=1, candidates=512,
                 cfg=1.5, top_k=512, top_p=0.96, temperature="1.0", controls=[], graphs={})
    export_graph(DecoderGraph(var.vae), m.io("decoder", batch=2), tmp_path / "decoder.onnx", 20)
    latents = []
    for seed, n in ((2000, 32), (HELD_OUT_SEED, 16)):  # calibration latents as an export records them, held-out ones
        shapes = ProceduralShapes(n, 64, seed)
        cond = np.stack([control_type("canny").extract(shapes[i][0]) for i in range(n)])
        with torch.no_grad():
            g = var.generate([shapes[i][1] for i in range(n)], ecm=ecm, control_B3HW=to_model_range(cond),
                             decode=False, seed=seed)
        latents.append(list(g.f_hat.numpy()))
    src, cpu, calib, check = tmp_path / "decoder.onnx", tmp_path / "decoder.cpu.onnx", latents[0][:28], latents[0][28:]
    choice = quantize_decoder(src, cpu, calib, check)
    assert choice.quantized == choice.convolutions == len(conv_costs(src))
    assert decoder_psnr(src, cpu, latents[1]) >= 40
    # ONNX Runtime fuses every Q/DQ convolution into QLinearConv, its INT8 kernel
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(cpu), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert ops.count("QLinearConv") == choice.quantized and "Conv" not in ops
    # a bound all of them miss: the convolutions that buy the most time per unit of error, as many as keep it
    strict = choice.psnr + 2
    fewer = quantize_decoder(src, tmp_path / "strict.onnx", calib, check, min_psnr=strict)
    assert fewer.quantized < choice.quantized and fewer.flops_share < 1
    if fewer.quantized:
        assert fewer.psnr >= strict and decoder_psnr(src, tmp_path / "strict.onnx", check) >= strict
