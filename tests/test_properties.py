"""Property tests: resampling matrices, the temperature-schedule parser and the manifest reader.

Each property holds for every input hypothesis draws; the parsers must answer bad input with their
one-line error type, never with another exception.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ecm.runtime.errors import ConfigError
from ecm.runtime.loop import Sampling, scale_constants
from ecm.runtime.manifest import ControlSpec, Manifest, ManifestError
from ecm.runtime.resample import area_matrix, bicubic_matrix
from ecm.runtime.schedule import MAX_TEMPERATURE, MIN_TEMPERATURE, TemperatureSchedule, parse_temperature
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ecm.model import interpolate as resample

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.integers(1, 40)


# ------------------------------------------------------------------------------------ resampling
@FAST
@given(sizes)
def test_resampling_to_the_same_size_is_the_identity(n):
    """A scale that is already at the target size passes through both kernels unchanged."""
    assert np.array_equal(area_matrix(n, n), np.eye(n))
    assert np.allclose(bicubic_matrix(n, n), np.eye(n), atol=1e-15)


@FAST
@given(sizes, sizes)
def test_area_rows_are_contiguous_averages(src, dst):
    """Each output sample is the plain mean of a contiguous run of inputs, and every input is used."""
    P = area_matrix(src, dst)
    assert P.shape == (dst, src) and P.dtype == np.float64
    for row in P:
        idx = np.flatnonzero(row)
        assert idx.size and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
        assert np.allclose(row[idx], 1 / idx.size)
    assert (P.sum(0) > 0).all()


@FAST
@given(st.integers(1, 12), st.integers(1, 6))
def test_area_down_sampling_by_an_integer_factor_keeps_the_mean(dst, factor):
    """With src = factor * dst, area pooling is block averaging: the image mean is preserved."""
    P = area_matrix(dst * factor, dst)
    assert np.allclose(P.sum(0), 1 / factor)
    x = np.random.default_rng(dst * 7 + factor).standard_normal((dst * factor, dst * factor))
    assert math.isclose((P @ x @ P.T).mean(), x.mean(), abs_tol=1e-12)


@FAST
@given(sizes, sizes, st.floats(-1e3, 1e3))
def test_bicubic_reproduces_constants(src, dst, c):
    """Keys' kernel with clamped taps is a partition of unity: a flat latent stays flat."""
    x = np.full((src, src), c)
    assert np.allclose(bicubic_matrix(src, dst) @ x @ bicubic_matrix(src, dst).T, c, atol=1e-9 * max(1, abs(c)))


@FAST
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20), st.sampled_from(["area", "bicubic"]))
def test_torch_resampling_of_non_square_latents(h, w, size, kind):
    """The torch wrappers use a matrix per axis: non-square inputs match F.interpolate and the NumPy form."""
    x = torch.from_numpy(np.random.default_rng(h * 400 + w * 20 + size).standard_normal((1, 2, h, w)))
    got = getattr(resample, kind)(x, size)
    mode = {"area": dict(mode="area"), "bicubic": dict(mode="bicubic", align_corners=False)}[kind]
    assert got.shape == (1, 2, size, size)
    assert (got - F.interpolate(x, size=(size, size), **mode)).abs().max() < 1e-12
    m = area_matrix if kind == "area" else bicubic_matrix
    assert np.allclose(got.numpy(), m(h, size) @ x.numpy() @ m(w, size).T, atol=1e-12)


# ------------------------------------------------------------------------------------ temperature
def _one_line_config_error(spec) -> None:
    with pytest.raises(ConfigError) as e:
        parse_temperature(spec)
    assert "\n" not in str(e.value) and str(e.value)


@FAST
@given(st.text(max_size=30))
def test_any_text_parses_or_is_a_one_line_config_error(text):
    """Whatever a user types: a schedule, or ConfigError in one line; never another exception."""
    try:
        sched = parse_temperature(text)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    try:
        values = sched.values(10)
    except ConfigError:
        assert sched.switch > 10
        return
    assert len(values) == 10 and all(MIN_TEMPERATURE <= t <= MAX_TEMPERATURE for t in values)


schedule_parts = st.text(st.characters(categories=["Nd", "No", "Nl", "Zs"]) | st.sampled_from(".:@-+e_"), max_size=8)


@FAST
@given(schedule_parts, schedule_parts, schedule_parts, st.sampled_from(["{}:{}@{}", "linear:{}:{}{}", "{}{}:{}"]))
def test_schedule_shaped_text_parses_or_is_a_config_error(a, b, k, form):
    """Numbers and switch indices in any Unicode digits (superscripts, other scripts): never a ValueError."""
    try:
        parse_temperature(form.format(a, b, k))
    except ConfigError as e:
        assert "\n" not in str(e)


@FAST
@given(st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3))
def test_a_switch_in_any_unicode_digits_parses_or_is_a_config_error(k):
    """'@k' in other scripts' digits is a scale index; superscripts and the like are refused in one line."""
    try:
        assert parse_temperature(f"1.0:0.8@{k}").switch == int(k)
    except ConfigError as e:
        assert "switch after '@'" in str(e)


temps = st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE)
number_text = st.sampled_from(["{:g}", "{!r}", "{:.3f}", "{:e}"])


@FAST
@given(temps, temps, st.integers(2, 16), st.data())
def test_valid_schedules_give_one_temperature_per_scale(a, b, K, data):
    """A:B, A:B@k and linear:A:B give K values between A and B; steps switch once, ramps are monotone."""
    fmt = data.draw(number_text)
    ta, tb = fmt.format(a), fmt.format(b)
    assume(MIN_TEMPERATURE <= float(ta) <= MAX_TEMPERATURE and MIN_TEMPERATURE <= float(tb) <= MAX_TEMPERATURE)
    a, b = float(ta), float(tb)
    k = data.draw(st.integers(0, K))
    lo, hi = min(a, b), max(a, b)
    step = parse_temperature(f"{ta}:{tb}@{k}").values(K)
    assert step == (a,) * k + (b,) * (K - k)
    assert parse_temperature(f" {ta}:{tb} ").values(K) == (a,) * (K // 2) + (b,) * (K - K // 2)
    ramp = parse_temperature(f"LINEAR:{ta}:{tb}").values(K)
    assert len(ramp) == K and ramp[0] == a and math.isclose(ramp[-1], b, rel_tol=1e-9, abs_tol=1e-12 * hi)
    assert all(lo - 1e-12 * hi <= t <= hi * (1 + 1e-12) for t in ramp)  # rounding: relative to the larger
    diffs = np.diff(ramp)
    assert (diffs <= 1e-12 * hi).all() if a >= b else (diffs >= -1e-12 * hi).all()
    assert parse_temperature(a) == TemperatureSchedule("constant", a, a)


@FAST
@given(temps, temps, st.integers(1, 12), st.integers(1, 30))
def test_a_switch_beyond_the_scales_is_a_config_error(a, b, K, extra):
    """A:B@k with k past the last scale is refused when the scale count is known, not an IndexError."""
    sched = parse_temperature(f"{a!r}:{b!r}@{K + extra}")
    with pytest.raises(ConfigError, match="switch scale"):
        sched.values(K)


@FAST
@given(st.one_of(st.floats(max_value=MIN_TEMPERATURE / 2), st.floats(min_value=MAX_TEMPERATURE * 2),
                 st.just(math.nan), st.integers(max_value=0)))
def test_out_of_range_temperatures_are_refused(value):
    """Zero, negative, NaN, infinite and values the float32 graphs would overflow on: ConfigError."""
    _one_line_config_error(value)
    _one_line_config_error(repr(value))
    _one_line_config_error(f"1.0:{value!r}")
    _one_line_config_error(f"linear:{value!r}:1")


# ------------------------------------------------------------------------------------ manifest
def tiny_manifest(control: bool = True) -> Manifest:
    """The facts of the embedded default model's export (no torch needed to write them down)."""
    return Manifest(
        precision="fp32", patch_nums=(1, 2, 3, 4, 6, 8), vocab_size=512, num_classes=8, image_size=64,
        latent_channels=16, embed_dim=256, num_heads=4, cache_layers=4, num_phi=4, batch=1, candidates=512,
        cfg=1.5, top_k=512, top_p=0.96, temperature="1.0:0.8",
        controls=[ControlSpec("canny", 64)] if control else [],
        graphs={"step": "var_ecm.onnx", "encoder": "var_ecm.encoder.onnx", "decoder": "var_ecm.decoder.onnx",
                **({"control": "var_ecm.control.onnx"} if control else {})},
        sources={"var": "0" * 64}, adapter_layers=2 if control else 0, adapter_dim=64 if control else 0,
        adapter_heads=1 if control else 0, opset=20, ecm_version="0.1.0")


json_leaf = (st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([10**12, -(10**12)])
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=3), max_leaves=6)


def check_usable(m: Manifest) -> None:
    """A manifest that loads must drive the runtime's arithmetic without any exception but ECMError."""
    for si in range(m.num_scales):
        assert all(d >= 0 for t in m.io("step", si).tensors.values() for d in t.shape)
    assert m.kv_cache_bytes() >= 0
    assert set(m.runtime_graphs()) <= set(m.runtime_roles) and isinstance(m.precision_label(True), str)
    try:
        sampling = Sampling.defaults(m)
    except ConfigError:
        return
    if m.latent_size <= 64:
        for si in range(m.num_scales):
            consts = scale_constants(m, si, sampling)
            assert consts["up"].shape == m.io("step", si).inputs["up"].shape
            assert consts["down"].shape == m.io("step", si).inputs["down"].shape


def load_or_refuse(d) -> Manifest | None:
    try:
        m = Manifest.from_dict(d)
    except ManifestError as e:
        assert "\n" not in str(e)
        return None
    check_usable(m)
    return m


@pytest.mark.parametrize("control", [True, False])
def test_manifest_round_trips(control):
    """What ecm-export writes, the runtime reads back unchanged (with and without adapters)."""
    m = tiny_manifest(control)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    check_usable(m)


@FAST
@given(st.data(), st.booleans(), st.booleans())
def test_mutated_manifests_load_or_raise_manifest_error(data, control, keep_scales):
    """Any field removed or replaced by any JSON value (nested ones too): ManifestError or a usable manifest."""
    d = json.loads(json.dumps(tiny_manifest(control).to_dict()))
    if not keep_scales:
        del d["scales"]  # without the recorded shapes the field checks alone must hold the line
    for _ in range(data.draw(st.integers(1, 3))):
        target = d
        if data.draw(st.booleans()):
            nested = [k for k, v in d.items() if isinstance(v, dict) and v]
            if nested:
                target = d[data.draw(st.sampled_from(sorted(nested)))]
        key = data.draw(st.sampled_from(sorted(target)))
        if data.draw(st.integers(0, 3)) == 0:
            del target[key]
        else:
            target[key] = data.draw(json_value)
    load_or_refuse(d)


@FAST
@given(st.dictionaries(st.text(max_size=12), json_value, max_size=6))
def test_arbitrary_objects_are_refused_with_manifest_error(d):
    """Objects that only look like manifests (any keys, any values) are refused in one line."""
    assert load_or_refuse(d) is None


@FAST
@given(st.one_of(st.binary(max_size=64), json_value.map(lambda v: json.dumps(v).encode())))
def test_any_file_content_loads_or_raises_manifest_error(tmp_path_factory, content):
    """Empty, binary, non-UTF-8 or non-object files at var_ecm.json: ManifestError, never a crash."""
    folder = tmp_path_factory.mktemp("m")
    (folder / "var_ecm.json").write_bytes(content)
    with pytest.raises(ManifestError) as e:
        Manifest.load(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


@FAST
@given(st.integers(0, 10**6))
def test_truncated_manifests_are_refused(tmp_path_factory, cut):
    """A manifest cut short anywhere (an interrupted copy) never loads as a valid one."""
    text = json.dumps(tiny_manifest().to_dict(), indent=2).encode()
    folder = tmp_path_factory.mktemp("cut")
    (folder / "var_ecm.json").write_bytes(text[:cut % len(text)])
    with pytest.raises(ManifestError):
        Manifest.load(folder)
