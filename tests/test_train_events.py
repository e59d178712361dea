"""`endcap train --events DIR`: the next retrain learns from the server's event log, and
the artifact carries co-purchase lists and shopper purchase stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from endcap.v1 import recommender_pb2 as pb
from server.artifact import load_artifact
from server.state.eventlog import EventLog
from training.events import merge_event_log
from training.export import copurchase, purchase_stats
from training.synthetic import StoreConfig, generate_store

SMALL = StoreConfig(n_items=800, n_users=200, n_events=6_000, seed=3)


def log_events(directory: Path, events: list[pb.Event]) -> None:
    log = EventLog(directory)
    asyncio.run(log.append_events(events, 1_800_000_000_000))
    log.close()


def test_merge_counts_everything(tmp_path: Path) -> None:
    ds = generate_store(SMALL)
    item = str(ds.item_ids[5])
    ctx = pb.RequestContext(
        session_id="new-shopper", country=ds.country_codes[0], device=pb.RequestContext.MOBILE
    )
    log_events(
        tmp_path,
        [
            pb.Event(type=pb.Event.VIEW, item_id=item, context=ctx),
            pb.Event(type=pb.Event.PURCHASE, item_id=item, price=3, context=ctx),
            pb.Event(type=pb.Event.SEARCH, query="shoes", context=ctx),
            pb.Event(type=pb.Event.VIEW, item_id="not-in-catalog", context=ctx),
        ],
    )
    merged, counts = merge_event_log(ds, tmp_path)
    assert (
        counts["used"] == 2 and counts["skipped_type"] == 1 and counts["skipped_unknown_item"] == 1
    )
    assert counts["new_shoppers"] == 1
    assert merged.n_events == ds.n_events + 2 and merged.n_users == ds.n_users + 1
    assert np.all(np.diff(merged.ev_ts) >= 0)
    assert merged.ev_item[-1] == 5 and merged.ev_user[-1] == ds.n_users


def test_copurchase_and_purchase_stats_have_known_answers() -> None:
    ds = generate_store(SMALL)
    cp = copurchase(ds)
    indptr, items, scores = cp["copurchase_indptr"], cp["copurchase_items"], cp["copurchase_scores"]
    assert indptr.shape == (ds.n_items + 1,) and indptr[-1] == items.shape[0]
    for i in range(0, ds.n_items, 97):
        lo, hi = indptr[i], indptr[i + 1]
        assert np.all(np.diff(scores[lo:hi]) <= 0) and i not in items[lo:hi]
    stats = purchase_stats(ds)
    bought = ds.ev_type == 2
    assert stats["user_orders"].sum() == bought.sum()
    assert np.isclose(stats["user_monetary"].sum(), ds.item_price[ds.ev_item[bought]].sum())


def test_train_with_event_log_via_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    ds = generate_store(SMALL)
    ctx = pb.RequestContext(
        user_id="loyal", country=ds.country_codes[0], device=pb.RequestContext.TABLET
    )
    log_events(
        tmp_path / "events",
        [pb.Event(type=pb.Event.VIEW, item_id=str(ds.item_ids[i]), context=ctx) for i in range(5)],
    )
    out = subprocess.run(
        [sys.executable, "-m", "endcap.cli", "train", "--out", str(tmp_path / "art"), "--items", "800",
         "--users", "200", "--interactions", "6000", "--seed", "3", "--epochs", "1", "--dim", "16",
         "--events", str(tmp_path / "events")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "used 5" in out.stdout
    artifact = load_artifact(tmp_path / "art")
    assert "loyal" in set(artifact["user_ids"].tolist())
    assert "copurchase_indptr" in artifact.arrays and "user_orders" in artifact.arrays
