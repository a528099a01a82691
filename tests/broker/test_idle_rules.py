"""The idle-culling rules (broker/idle.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jupyter_gpu_share.broker.idle import gpus_in_use, idle_state, warning_text

S = 1_000_000


def test_a_gpu_in_use_is_activity_only_for_the_sessions_gpus():
    samples = [{"index": 0, "utilization_pct": 90}, {"index": 1, "utilization_pct": 0}]
    assert gpus_in_use(samples, [0])
    assert not gpus_in_use(samples, [1])
    assert not gpus_in_use(samples, [])  # a CPU session
    assert not gpus_in_use([{"index": 0, "utilization_pct": None}], [0])
    assert not gpus_in_use([{"index": 0, "utilization_pct": 5}], [0])  # at the threshold


def test_idle_states():
    assert idle_state(10 * S, 0, 60, 20) == ("active", 60 * S)
    assert idle_state(45 * S, 0, 60, 20) == ("warn", 60 * S)
    assert idle_state(60 * S, 0, 60, 20) == ("stop", 60 * S)
    assert idle_state(10**12, 0, 0, 20)[0] == "active"  # 0: never


@given(st.integers(0, 10**13), st.integers(0, 10**13), st.floats(1, 10**6), st.floats(0, 10**5))
def test_a_stop_is_never_before_the_limit(now, active, limit, warning):
    state, stop = idle_state(now, active, limit, warning)
    assert stop == active + int(limit * S)
    if state == "stop":
        assert now >= stop
    if now < stop:
        assert state != "stop"


def test_the_warning_says_when_and_why():
    text = warning_text(1800, 300)
    assert "stops in 5 min" in text and "30 min" in text and "run a cell" in text
