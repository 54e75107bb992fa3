"""ecm-export: ONNX graphs that ONNX Runtime runs like the eager model, and TensorRT can parse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from ecm.export.fold import fold_ecm_norms
from ecm.export.onnx_export import onnx_io
from ecm.export.pipeline import VERIFY_NAME, ExportOptions, Models, export_model
from ecm.export.tensorrt import missing_tensorrt, profile_shapes
from ecm.export.tensorrt_ops import TENSORRT_OPS, graph_problems
from ecm.runtime.errors import ECMError
from ecm.runtime.loop import Sampling, ScaleLoop
from ecm.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError
from ecm.runtime.ort_backend import OrtBackend
from onnx import shape_inference


def quiet(_: str) -> None:
    pass


def test_fp32_graphs_match_the_eager_model(fp32_export):
    report = json.loads((fp32_export.folder / VERIFY_NAME).read_text())
    assert report["batch"] >= 4 and len(report["scales"]) == 6
    assert report["worst_logits_rel_diff"] <= 1e-4
    assert report["min_token_agreement"] == 1.0
    assert report["image_max_abs_diff"] <= 1


def test_fp16_keeps_the_tokens_and_its_sensitive_ops_in_fp32(fp16_export):
    report = fp16_export.report
    # random weights give near-tied logits; the trained default model keeps 100% (see the README)
    assert report.min_teacher_agreement >= 0.95
    assert report.scales[0].logits_rel_diff < 1e-2  # later scales sample from their own (rounded) past
    model = onnx.load(str(fp16_export.folder / "var_ecm.onnx"))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in inits.values()  # matmul weights are half
    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update(inits)
    fp32_only = {"LayerNormalization", "Softmax", "ReduceL2", "TopK", "CumSum"}
    checked = [n for n in model.graph.node if n.op_type in fp32_only]
    assert {n.op_type for n in checked} == fp32_only
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in checked)
    producer = {o: n for n in model.graph.node for o in n.output}
    bias_add = next(n for n in model.graph.node if "var.head.bias" in n.input)
    head = producer[next(i for i in bias_add.input if i != "var.head.bias")]  # the vocabulary projection
    assert head.op_type in ("MatMul", "Gemm")
    assert [inits[i] for i in head.input if i in inits] == [onnx.TensorProto.FLOAT]
    assert Manifest.load(fp16_export.folder).kv_dtype == "float16"


def test_every_graph_is_parseable_by_tensorrt(fp32_export, fp16_export):
    for export in (fp32_export, fp16_export):
        for name in export.manifest.graphs.values():
            assert graph_problems(export.folder / name) == []
            assert onnx.load(str(export.folder / name)).opset_import[0].version <= 21


def test_the_tensorrt_check_catches_what_tensorrt_refuses(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 2])
    node = onnx.helper.make_node("Multinomial", ["x"], ["y"], sample_size=2)
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y])), tmp_path / "m.onnx")
    assert any("Multinomial" in p for p in graph_problems(tmp_path / "m.onnx"))
    assert "Multinomial" not in TENSORRT_OPS and "Attention" not in TENSORRT_OPS


def test_each_scale_profile_pins_every_dynamic_axis(fp32_export):
    m, folder = fp32_export.manifest, fp32_export.folder
    inputs, _ = onnx_io(folder / m.graphs["step"])
    assert any(isinstance(d, str) for dims in inputs.values() for d in dims)  # one graph, symbolic axes
    backend = OrtBackend(folder, m)
    for si, shapes in enumerate(profile_shapes(m, "step")):
        bound: dict[str, int] = {}
        for name, dims in inputs.items():
            shape = shapes[name][0]
            assert len(shape) == len(dims) and all(isinstance(v, int) and v >= 0 for v in shape)
            for d, v in zip(dims, shape):
                if isinstance(d, str):
                    assert bound.setdefault(d, v) == v, f"scale {si}: axis {d} bound twice"
                else:
                    assert d == v
        feeds = {k: np.zeros(t.shape, dtype=t.dtype) for k, t in shapes.items()}
        feeds["top_k"][:] = 1
        out = {k: np.full(t.shape, -1, dtype=t.dtype) for k, t in m.io("step", si).outputs.items()}
        backend.run("step", feeds, out)  # ONNX Runtime refuses outputs whose shapes differ from these
        assert (out["tokens"] >= 0).all() and (out["tokens"] < m.vocab_size).all()


def test_static_scale_graphs_are_fully_static_and_agree(fp32_export):
    m, folder = fp32_export.manifest, fp32_export.folder
    loop = ScaleLoop(m, OrtBackend(folder, m))
    labels, sampling = np.array([3]), Sampling.defaults(m)
    cond = np.zeros((1, 64, 64, 3), np.uint8)
    cond[:, 20:44, 30] = 255
    traj = loop.run(labels, cond, sampling, record=True)
    import onnxruntime as ort

    for si in range(m.num_scales):
        model = onnx.load(str(folder / m.graphs[f"step_s{si}"]))
        del model.graph.value_info[:]
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
        pn = m.patch_nums[si]
        feeds = loop.step_feeds(si, labels, traj.x_in[si], traj.f_hat_in[si], traj.uniforms[si].reshape(1, pn, pn),
                                sampling)
        sess = ort.InferenceSession(str(folder / m.graphs[f"step_s{si}"]), providers=["CPUExecutionProvider"])
        tokens = sess.run(["tokens"], feeds)[0]
        assert np.array_equal(tokens, traj.tokens[si])


def test_golden_outputs_replay_with_polygraphy(fp32_export):
    folder = fp32_export.folder
    golden = sorted((folder / "golden").glob("*.inputs.json"))
    assert {p.name.split(".")[0] for p in golden} >= {"control", "decoder", "step_s0", "step_s1"}
    assert "--trt" in (folder / "golden" / "README.md").read_text()
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    res = subprocess.run([polygraphy, "run", "var_ecm.onnx", "--onnxrt", "--load-inputs",
                          "golden/step_s1.inputs.json", "--load-outputs", "golden/step_s1.outputs.json"],
                         cwd=folder, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASSED" in res.stdout + res.stderr


def test_golden_data_is_saved_without_a_word(fp32_export, tmp_path, capfd):
    """polygraphy reports every run and save: an export prints its own progress lines and nothing else."""
    from ecm.export.golden import save_golden

    shutil.copytree(fp32_export.folder, tmp_path / "copy")
    capfd.readouterr()
    written = save_golden(tmp_path / "copy", fp32_export.manifest)
    assert len(written) > 4 and capfd.readouterr() == ("", "")


def test_folding_norms_and_gates_is_exact(tiny_pair, tiny_ecm):
    import copy

    _, var = tiny_pair
    ctrl = torch.rand(2, 3, 64, 64) * 2 - 1
    x = torch.randn(2, 5, var.config.embed_dim)
    c = torch.randn(2, 5, tiny_ecm.config.width)
    folded = fold_ecm_norms(copy.deepcopy(tiny_ecm))
    with torch.no_grad():
        assert torch.allclose(folded.control_tokens(ctrl), tiny_ecm.control_tokens(ctrl), atol=1e-5)
        a = tiny_ecm.adapt(0, x, c)
        b = folded.adapt(0, x, c)
    assert torch.allclose(a, b, atol=1e-5)
    assert folded.adapters[0].ln1.weight is None and folded.gates is None  # gates went into the up-projections


def test_manifest_refuses_other_versions_and_edits(fp32_export, tmp_path):
    d = json.loads((fp32_export.folder / MANIFEST_NAME).read_text())
    for change, message in [({"schema_version": 99}, "schema version 99"),
                            ({"patch_nums": [1, 2, 3]}, "recorded shapes"),
                            ({"precision": "fp8"}, "precision"),
                            ({"patch_nums": 5}, "malformed"),
                            ({"controls": [{"typo": 1}]}, "malformed"),
                            ({"controls": "canny"}, "malformed")]:
        (tmp_path / MANIFEST_NAME).write_text(json.dumps({**d, **change}))
        with pytest.raises(ManifestError, match=message):
            Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"schema_version": 1, "prec')
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path / "elsewhere")


def test_a_failed_export_leaves_the_previous_one_intact(fp32_export, tiny_pair, tiny_ecm, tmp_path, monkeypatch):
    import shutil

    from ecm.export import pipeline

    shutil.copytree(fp32_export.folder, tmp_path, dirs_exist_ok=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    real_export = pipeline.export_graph

    def fail_on_second_graph(*args, **kwargs):
        if list(tmp_path.glob(".ecm-export-*/*.onnx")):
            raise ECMError("disk full (simulated)")
        real_export(*args, **kwargs)

    monkeypatch.setattr(pipeline, "export_graph", fail_on_second_graph)
    with pytest.raises(ECMError, match="simulated"):
        export_model(Models(tiny_pair[1], tiny_ecm), tmp_path, ExportOptions(precision="fp16"), quiet)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".ecm-export-*"))


@pytest.mark.parametrize("opts, message", [
    (ExportOptions(opset=23), "opset 23"),
    (ExportOptions(precision="fp8"), "unknown precision"),
    (ExportOptions(candidates=100_000), "candidates"),
    (ExportOptions(precision="int8"), "needs calibration"),
])
def test_bad_export_options(tiny_pair, tiny_ecm, tmp_path, opts, message):
    with pytest.raises(ECMError, match=message):
        export_model(Models(tiny_pair[1], tiny_ecm), tmp_path, opts, quiet)
    assert not (tmp_path / MANIFEST_NAME).exists()


@pytest.mark.gpu
def test_tensorrt_plans_match_the_golden_outputs(fp16_export):
    reason = missing_tensorrt()
    if reason is not None:
        pytest.skip(f"TensorRT plans need a GPU and TensorRT: {reason}")
    from ecm.export.tensorrt import build_plans
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    m = build_plans(fp16_export.folder, progress=quiet)
    assert m.tensorrt["plans"]["step"] == "var_ecm.plan"
    folder = fp16_export.folder
    for si in (0, 1):
        feeds = load_json(str(folder / "golden" / f"step_s{si}.inputs.json"))[0]
        want = RunResults.load(str(folder / "golden" / f"step_s{si}.outputs.json"))[0][1][0]
        engine = EngineFromBytes(BytesFromPath(str(folder / "var_ecm.plan")))
        with TrtRunner(engine, optimization_profile=si) as runner:
            got = runner.infer(feeds)
        ref = want["logits"]
        assert np.abs(got["logits"] - ref).max() <= 1e-2 * np.abs(ref).max()


def test_the_manifest_holds_the_memory_plan(fp16_export, tiny_pair, tiny_ecm):
    """Weights as written, KV cache per batch as the manifest's shapes give it, the Jetson modules it fits; the
    count on models without data (what the README's table of official sizes uses) agrees with the files."""
    import torch
    from ecm.export.memory_plan import BATCHES, GB, JETSONS, memory_plan, model_weight_bytes, usable_gb
    from ecm.runtime.memory import graph_bytes

    from ecm.model.adapters import ECM
    from ecm.model.var import VAR
    from ecm.model.vqvae import VQVAE

    folder, m = fp16_export.folder, fp16_export.manifest
    plan = m.memory
    assert plan["weights"] == graph_bytes(folder, m, cpu=False)
    for B in BATCHES:
        assert plan["kv_cache"][str(B)] == m.kv_cache_bytes(B) > 0
        assert plan["total"][str(B)] == sum(plan["weights"].values()) + plan["kv_cache"][str(B)] + \
            plan["activations"][str(B)]
        assert plan["fits"][str(B)] == list(JETSONS)  # a tiny model fits everywhere
    with torch.device("meta"):
        var = VAR(tiny_pair[1].config, VQVAE(tiny_pair[0].config))
        ecm = ECM(tiny_ecm.config)
    counted = sum(model_weight_bytes(var, ecm, "fp16").values())
    assert abs(counted - sum(plan["weights"].values())) < 0.15 * counted
    # a plan fits a module while it leaves the OS its reserve
    room = int(usable_gb(8) * GB) - m.kv_cache_bytes(1)
    activations = memory_plan(m, {"step": 0}, 1, (1,)).activations[1]
    assert memory_plan(m, {"step": room - activations}, 1, (1,)).fits(1)[0] == "Orin Nano 8GB"
    assert memory_plan(m, {"step": room - activations + 1}, 1, (1,)).fits(1)[0] == "Orin NX 16GB"
