"""Live popularity counters: the kept ranking answers exactly what a full pass would."""

from __future__ import annotations

import heapq
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.state.store import LONG_TAU_S, SHORT_TAU_S, TRENDING_POOL, _Counter, decayed

EVENTS = st.lists(
    st.tuples(st.integers(0, 39), st.sampled_from([1.0, 3.0, 5.0]), st.floats(0.0, 7200.0)),
    min_size=1,
    max_size=300,
)


def full_pass(c: _Counter, n: int, trending: bool, now: float) -> list[float]:
    """What top() answers, computed over every counted item."""
    assert c.epoch is not None
    if not trending:
        scale = decayed(1.0, now, LONG_TAU_S, c.epoch)
        return [v * scale for _, v in heapq.nlargest(n, c.long.items(), key=lambda kv: kv[1])]
    pool = heapq.nlargest(TRENDING_POOL * n, c.short.items(), key=lambda kv: kv[1])
    s_now, l_now = decayed(1.0, now, SHORT_TAU_S, c.epoch), decayed(1.0, now, LONG_TAU_S, c.epoch)
    ratio = SHORT_TAU_S / LONG_TAU_S
    scores = [(v * s_now) / (ratio * c.long[k] * l_now + 1.0) for k, v in pool]
    return sorted(scores, reverse=True)[:n]


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, capacity=st.sampled_from([4, 8, 64]), n=st.integers(1, 12))
def test_kept_ranking_equals_a_full_pass(
    events: list[tuple[int, float, float]], capacity: int, n: int
) -> None:
    c = _Counter(capacity)  # keeps min(512, capacity) ranked; pruning past 2x capacity
    start = time.time() - 7200.0
    for item, weight, offset in sorted(events, key=lambda e: e[2]):
        c.add(f"i{item}", weight, start + offset)
    now = start + 7200.0
    for trending in (False, True):
        got = [v for _, v in c.top(n, trending, now)]
        assert got == full_pass(c, n, trending, now)
        assert all(k in c.long for k, _ in c.top(n, trending, now))


def test_reads_of_a_busy_segment_do_not_scan_it() -> None:
    c = _Counter(5_000)
    now = time.time()
    for i in range(20_000):
        c.add(f"i{(i * 7919) % 9_000}", 1.0 + (i % 3), now - 3_600 + i * 0.1)
    assert len(c.long) > 5_000 and len(c.long_top.members) == 512
    assert [v for _, v in c.top(60, False, now)] == full_pass(c, 60, False, now)
    assert [v for _, v in c.top(60, True, now)] == full_pass(c, 60, True, now)


FAR = 1_767_225_600.0 + 400 * 86_400.0  # 400 days after 2026-01-01, whatever today is


def test_counts_decay_at_any_date_and_across_epoch_moves() -> None:
    c = _Counter(100)
    for _ in range(10):
        c.add("old", 1.0, FAR - 5 * 3_600.0)  # ten views five hours ago
    for _ in range(3):
        c.add("new", 1.0, FAR)
    trending = dict(c.top(2, True, FAR))
    assert list(trending) == ["new", "old"]  # 10 e^-5 = 0.07 of a view now, against 3
    bestsellers = dict(c.top(2, False, FAR))
    assert bestsellers["old"] == pytest.approx(10 * math.exp(-5 * 3_600.0 / LONG_TAU_S))
    assert bestsellers["new"] == pytest.approx(3.0)
    # 30 hours later (the epoch moves past REBASE_S): same decayed counts.
    later = FAR + 30 * 3_600.0
    c.add("newest", 5.0, later)
    assert c.epoch == later
    got = dict(c.top(3, False, later))
    assert got["old"] == pytest.approx(10 * math.exp(-35 * 3_600.0 / LONG_TAU_S))
    assert got["new"] == pytest.approx(3 * math.exp(-30 * 3_600.0 / LONG_TAU_S))
    assert got["newest"] == pytest.approx(5.0)
    assert c.top(1, True, later)[0][0] == "newest"
    # Read a month after the last event: counts decay to ~0, nothing overflows.
    assert c.top(3, True, later + 30 * 86_400.0)[0][1] == pytest.approx(0.0, abs=1e-12)
