"""top_k: the k best by score, ties to the smaller id, whatever the ids' order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain.ranking import top_k


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(-3, 3)), max_size=300, unique_by=lambda t: t[0]
    ),
    st.integers(0, 320),
)
def test_top_k_equals_a_full_sort(pairs: list[tuple[int, int]], k: int) -> None:
    ids = np.array([i for i, _ in pairs], dtype=np.int64)
    scores = np.array([s / 2 for _, s in pairs], dtype=np.float32)  # few values: many ties
    order = np.lexsort((ids, -scores))[:k]
    got_ids, got_scores = top_k(ids, scores, k)
    assert got_ids.tolist() == ids[order].tolist()
    assert got_scores.tolist() == scores[order].tolist()
