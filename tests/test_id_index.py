"""IdIndex: the hashed (large-catalog) path and the dict (small) path agree with a dict."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain import catalog
from server.domain.catalog import IdIndex, compact_ids

_ID = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(_ID, min_size=1, max_size=60, unique=True),
    probes=st.lists(_ID, max_size=30),
    small=st.sampled_from([0, 1_000]),
    compact=st.booleans(),
)
def test_lookup_matches_a_dict(
    ids: list[str], probes: list[str], small: int, compact: bool
) -> None:
    array = compact_ids(np.asarray(ids)) if compact else np.asarray(ids)
    if compact and all(i.isascii() for i in ids):
        assert array.dtype.kind == "S"
    index = IdIndex(array, small=small)
    truth = {v: i for i, v in enumerate(ids)}
    queries = ids[::-1] + probes + [ids[0] + "x", ids[-1][:-1] or "?"]
    assert index.lookup(queries).tolist() == [truth.get(q, -1) for q in queries]
    for q in queries[:10]:
        assert index.get(q) == truth.get(q)
    live = "live-item-0000000001"  # longer than any generated id
    index.add(live, len(ids))
    assert index.lookup([live, ids[0]]).tolist() == [len(ids), 0]
    assert len(index) == len(ids) + 1


def test_hash_collisions_and_full_buckets_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id with one hash: one bucket holds 8 of them, all with the same fingerprint,
    and the rest spill over. Lookups (batched and one by one) must still find each."""
    import builtins

    ids = np.asarray([f"id-{i}" for i in range(50)])
    monkeypatch.setattr(builtins, "hash", lambda _x: 7)
    for array in (ids, compact_ids(ids)):
        index = IdIndex(array, small=0)
        assert len(index._overflow) == 50 - catalog._BUCKET_SLOTS
        assert index.lookup([*ids.tolist(), "nope"]).tolist() == [*range(50), -1]
        assert [index.get(i) for i in ids.tolist()] == list(range(50))
        assert index.get("nope") is None


@pytest.mark.parametrize("one_hash", [False, True])
def test_ids_longer_than_the_stored_ones_do_not_match_a_prefix(
    one_hash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one hash for every id, only the comparison with the stored id tells a
    longer id from its stored prefix."""
    import builtins

    if one_hash:
        monkeypatch.setattr(builtins, "hash", lambda _x: 7)
    ids = np.asarray([f"sku-{i:04d}" for i in range(5)])  # one bucket, sku-0004 last
    for array in (ids, compact_ids(ids)):
        index = IdIndex(array, small=0)
        queries = ["sku-0001", "sku-00042", "sku-0004x", "sku-000", "ṡku-0001"]
        assert index.lookup(queries).tolist() == [1, -1, -1, -1, -1]
        index.add("ṡku-0001", 5)  # a live id need not be ASCII
        assert index.lookup(queries).tolist() == [1, -1, -1, -1, 5]


def test_recently_looked_up_ids_answer_from_memory_and_stay_right() -> None:
    ids = np.asarray([f"sku-{i}" for i in range(500)])
    index = IdIndex(compact_ids(ids), small=0)
    batch = ["sku-7", "sku-3", "new-1", "sku-499"]
    assert index.lookup(batch).tolist() == [7, 3, -1, 499]
    assert index._recent == {"sku-7": 7, "sku-3": 3, "sku-499": 499}  # unknowns not kept
    index.add("new-1", 500)
    assert index.lookup(batch).tolist() == [7, 3, 500, 499]
    assert index.lookup(["sku-7", "sku-3"]).tolist() == [7, 3]  # all from memory
    many = [f"sku-{i}" for i in range(catalog._RECENT_BATCH + 1)]  # too many to keep
    assert index.lookup(many).tolist() == list(range(catalog._RECENT_BATCH + 1))
    assert "sku-150" not in index._recent
