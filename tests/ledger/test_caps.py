"""The spending-cap rules (ledger/caps.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jupyter_gpu_share.ledger.caps import DAY_US, cap_stop_us, day_start_us, warn_due


def test_a_session_cap_stops_when_its_cost_reaches_the_cap():
    # 1000 micro/s from t=0: a 5000 micro cap is reached at 5 s
    assert cap_stop_us(5000, 0, [(0, 1000)]) == 5_000_000
    assert cap_stop_us(5000, 2000, [(0, 1000)]) == 3_000_000  # 2000 spent earlier today
    assert cap_stop_us(None, 0, [(0, 1000)]) is None
    assert cap_stop_us(5000, 0, []) is None
    assert cap_stop_us(5000, 9000, [(10, 1000)]) <= 10  # already over: at once


@given(
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.lists(st.tuples(st.integers(0, 10**15), st.integers(1, 10**6)), min_size=1, max_size=5),
)
def test_the_stop_is_never_after_the_cap_is_crossed(cap, spent, running):
    stop = cap_stop_us(cap, spent, running)
    cost = sum((stop - ready) * price for ready, price in running)  # in micro * us
    assert cost <= (cap - spent) * 1_000_000


def test_warnings_and_days():
    assert warn_due(80, 100) and warn_due(99, 100)
    assert not warn_due(79, 100) and not warn_due(100, 100) and not warn_due(5, None)
    assert day_start_us(DAY_US * 3 + 5) == DAY_US * 3
