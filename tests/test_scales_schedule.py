import pytest
from ecm.runtime import ECMError, begin_ends, parse_temperature, phi_table, total_tokens
from ecm.runtime.scales import PATCH_NUMS_256
from hypothesis import given
from hypothesis import strategies as st


def test_official_scale_facts():
    assert total_tokens(PATCH_NUMS_256) == 680
    assert begin_ends(PATCH_NUMS_256)[-1] == (424, 680)


def test_phi_table_is_the_official_one():
    # Two entries (scales 2 and 7) are exact ties; the official float arithmetic picks the later phi.
    assert phi_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_table(6, 4) == (0, 0, 1, 2, 3, 3)


@pytest.mark.parametrize("spec, values", [
    ("1.0", (1.0,) * 4),
    ("1.0:0.8", (1.0, 1.0, 0.8, 0.8)),
    ("1.0:0.8@1", (1.0, 0.8, 0.8, 0.8)),
    ("linear:1.0:0.7", (1.0, 0.9, 0.8, 0.7)),
    (0.5, (0.5,) * 4),
])
def test_temperature_forms(spec, values):
    assert parse_temperature(spec).values(4) == pytest.approx(values)


@pytest.mark.parametrize("spec", ["", "hot", "1.0:", "0", "-1", "1:2:3", "1.0:0.8@x", "linear:1", "inf"])
def test_bad_temperature_is_a_clear_error(spec):
    with pytest.raises(ECMError, match="temperature"):
        parse_temperature(spec)


@given(st.floats(0.05, 5), st.floats(0.05, 5), st.integers(0, 10), st.sampled_from(["step", "linear", "c"]))
def test_schedule_text_round_trips(a, b, k, kind):
    spec = {"step": f"{a}:{b}@{k}", "linear": f"linear:{a}:{b}", "c": f"{a}"}[kind]
    sched = parse_temperature(spec)
    again = parse_temperature(str(sched))
    assert again.values(10) == pytest.approx(sched.values(10), rel=1e-5)
    assert all(t > 0 for t in sched.values(10))
