"""`endcap evaluate`: the protocol on any Dataset, endcap against baselines, fidelity, cold start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from endcap.cli import main
from training import protocol
from training.evaluate import (
    Ranked,
    evaluate_fast,
    per_user_metrics,
    protocol_data,
    restrict_events,
    top_k,
)
from training.synthetic import StoreConfig, generate_store

TINY = StoreConfig(n_items=1_500, n_users=400, n_events=16_000, seed=5)
FLAGS = ["--items", "1500", "--users", "400", "--interactions", "16000", "--seed", "5"]


def random_split(seed: int, n_items: int = 60) -> protocol.Split:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(40), rng.integers(1, 20, size=40))
    items = rng.integers(0, n_items, size=users.size)
    # One row per (user, item), as the protocol has.
    _, first = np.unique(users * n_items + items, return_index=True)
    users, items = users[first], items[first]
    stamps = rng.integers(0, 50, size=users.size)
    return protocol.temporal_split(users, items, stamps, np.arange(n_items))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_evaluation_matches_the_protocol_evaluator(seed: int) -> None:
    split = random_split(seed)
    rng = np.random.default_rng(seed + 10)
    # Integer scores: plenty of ties, broken by the smaller item index in both.
    table = rng.integers(0, 4, size=(split.n_users, split.n_items)).astype(np.float32)

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return table[users]

    phases: tuple[protocol.Phase, ...] = ("valid", "test")
    for phase in phases:
        expected = protocol.evaluate(score, split, phase)
        got = evaluate_fast(score, split, phase)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_top_k_matches_the_protocol_ranking_with_padding() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(5, 12)).astype(np.float32)
    exclude = rng.random((5, 12)) < 0.5
    exclude[0] = True  # nothing left: all -1
    exclude[1, :11] = True  # one candidate
    indptr = np.concatenate([[0], np.cumsum(exclude.sum(axis=1))]).astype(np.int64)
    items = np.nonzero(exclude)[1]
    for k in (1, 4, 12, 15):
        want = protocol.top_k(scores, exclude, k)
        got = top_k(scores, indptr, items, k)
        if k > 12:
            want = np.concatenate([want, np.full((5, k - 12), -1)], axis=1)
        np.testing.assert_array_equal(got, want)


def test_per_user_metrics_by_hand() -> None:
    truth = protocol.Part(
        indptr=np.array([0, 2, 3], dtype=np.int64),
        items=np.array([4, 7, 1], dtype=np.int32),
        timestamps=np.zeros(3, dtype=np.int64),
    )
    ranked = Ranked(np.array([0, 1]), np.array([[7, 2, 4], [3, -1, -1]]))
    m = per_user_metrics(ranked, truth, (2, 3))
    assert list(m["recall@2"]) == [0.5, 0.0]
    assert list(m["hit@3"]) == [1.0, 0.0]
    ideal = 1 + 1 / np.log2(3)
    assert m["ndcg@3"][0] == pytest.approx((1 + 1 / np.log2(4)) / ideal)


def test_protocol_data_cuts_each_shopper_in_time() -> None:
    ds = generate_store(TINY)
    data = protocol_data(ds, (1.0, 2.0, 4.0))
    split = data.split
    assert (
        len(split.train) + len(split.valid) + len(split.test)
        == np.unique(ds.ev_user.astype(np.int64) * ds.n_items + ds.ev_item).size
    )
    # Training events never include a valid or test item of their shopper, nor anything
    # after the shopper's first valid interaction.
    train = restrict_events(ds, data.train_events)
    uidx = np.searchsorted(data.users, train.ev_user)
    ok = np.ones(train.n_events, dtype=bool)
    for phase_part in (split.valid, split.test):
        held = set(
            zip(data.users[phase_part.users()].tolist(), phase_part.items.tolist(), strict=True)
        )
        pairs = zip(train.ev_user.tolist(), train.ev_item.tolist(), strict=True)
        ok &= np.array([p not in held for p in pairs])
    assert ok.all()
    first_valid = np.full(split.n_users, np.iinfo(np.int64).max)
    has = split.valid.lengths() > 0
    first_valid[has] = split.valid.timestamps[split.valid.indptr[:-1][has]]
    assert np.all(train.ev_ts <= first_valid[uidx])
    # Test histories read the valid period too.
    assert data.history_events["test"].sum() > data.train_events.sum()
    assert not (data.train_events & ~data.history_events["test"]).any()
    # Context of the first ground-truth interaction lines up with the split.
    assert set(np.unique(data.device["valid"][np.flatnonzero(has)])) <= {1, 2, 3}


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("eval") / "report.json"
    code = main(["evaluate", "--dataset", "synthetic", *FLAGS, "--epochs", "3", "--json", str(out)])
    assert code == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_synthetic_evaluation_compares_endcap_with_baselines(
    synthetic_report: dict[str, Any],
) -> None:
    models = {m["name"]: m for m in synthetic_report["models"]}
    assert set(models) >= {
        "endcap two-tower",
        "endcap served (artifact + FAISS)",
        "endcap, no context",
        "MostPop",
        "SegmentPop",
        "ALS",
        "EASE",
    }
    endcap = models["endcap two-tower"]
    assert endcap["train_s"] > 0
    for metric in ("recall@10", "ndcg@10", "hit@10", "recall@50", "coverage@10", "pop_pct@10"):
        assert 0.0 <= endcap["test"][metric] <= 1.0
    assert endcap["test"]["ndcg@10"] > 2 * models["MostPop"]["test"]["ndcg@10"]
    # Personalised lists reach more of the catalog and less of the head than bestsellers.
    assert endcap["test"]["coverage@10"] > 5 * models["MostPop"]["test"]["coverage@10"]
    assert endcap["test"]["pop_pct@10"] < models["MostPop"]["test"]["pop_pct@10"]
    assert set(synthetic_report["context"]["ndcg@10"]) == {
        "with_context",
        "without_context",
        "lift",
    }


def test_synthetic_evaluation_reports_segments_fidelity_and_cold_start(
    synthetic_report: dict[str, Any],
) -> None:
    segments = synthetic_report["segments"]
    assert set(segments["device"]["endcap two-tower"]) == {"mobile", "tablet", "desktop"}
    assert "DE" in segments["country"]["endcap two-tower"]
    users = sum(s["users"] for s in segments["device"]["endcap two-tower"].values())
    assert users == synthetic_report["fidelity"]["users"]
    best = synthetic_report["segment_bestsellers"]
    assert best["countries"]["mean"] < 0.9 and best["devices"]["mean"] < 0.9
    fidelity = synthetic_report["fidelity"]
    assert fidelity["query_max_abs_diff_vs_trained"] == 0.0
    # A small catalog gets an exact (flat) index: ANN equals exact.
    assert fidelity["ann_vs_exact"]["recall@10"] == 1.0
    assert fidelity["served_ndcg@10"] == pytest.approx(fidelity["exact_ndcg@10"])
    cold = synthetic_report["cold_start"]
    items = cold["items"]
    assert items["users"] > 0
    # A tiny catalog holds out few items (50 of ~70 is most of them): compare at 10.
    assert items["endcap"]["recall@10"] > 1.5 * items["random"]["recall@10"]
    assert items["endcap"]["recall@10"] > items["category popularity"]["recall@10"]
    for given in ("1_items", "2_items", "3_items"):
        row = cold["users"][given]
        assert row["endcap"]["ndcg@10"] > row["MostPop"]["ndcg@10"]


def test_ivf_fidelity_reports_ann_recall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from training import export
    from training.evaluate import EvalConfig, evaluate_dataset
    from training.train import TrainConfig

    monkeypatch.setattr(export, "FLAT_INDEX_MAX_ITEMS", 500)
    config = EvalConfig(
        train=TrainConfig(dim=16, epochs=1, seed=1),
        baselines=("MostPop",),
        context_ablation=False,
        cold_start=False,
    )
    report = evaluate_dataset(generate_store(TINY), config, artifacts=tmp_path)
    fidelity = report["fidelity"]
    assert fidelity["index"] == "IndexIVFScalarQuantizer" and fidelity["nprobe"] > 0
    assert 0.5 < fidelity["ann_vs_exact"]["recall@10"] <= 1.0
    assert (tmp_path / "LATEST").is_file()


def test_evaluate_reads_a_shops_files(tmp_path: Path) -> None:
    ds = generate_store(StoreConfig(n_items=800, n_users=200, n_events=8_000, seed=2))
    rows = ["user_id,item_id,timestamp,event_type,device,country"]
    kinds = ("view", "add_to_cart", "purchase")
    devices = ("", "mobile", "tablet", "desktop")
    for u, i, t, k, d, c in zip(
        ds.ev_user, ds.ev_item, ds.ev_ts, ds.ev_type, ds.ev_device, ds.ev_country, strict=True
    ):
        rows.append(
            f"{ds.user_ids[u]},{ds.item_ids[i]},{t},{kinds[k]},{devices[d]},{ds.country_codes[c]}"
        )
    rows.append("u-bad,sku-0000001,not-a-time,view,mobile,DE")
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "report.json"
    flags = ["evaluate", "--interactions", str(tmp_path / "events.csv"), "--json", str(out)]
    light = ["--baselines", "MostPop", "--no-context-ablation", "--no-cold-start", "--epochs", "2"]
    assert main([*flags, *light]) == 2  # the malformed last row stops the run
    assert main([*flags, *light, "--skip-invalid"]) == 0
    report = json.loads(out.read_text())
    load = report["load"][0]
    assert load["skipped"] == {"timestamp: not a unix time or ISO date": 1}
    assert load["examples"]["timestamp: not a unix time or ISO date"].startswith(
        f"events.csv line {len(rows)}, column timestamp"
    )
    assert report["dataset"]["events"] == ds.n_events
    names = [m["name"] for m in report["models"]]
    assert names == ["endcap two-tower", "endcap served (artifact + FAISS)", "MostPop"]


def test_evaluate_ml100k_runs_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.ml100k import WHEEL_NAME, default_cache_dir

    if not (default_cache_dir() / WHEEL_NAME).is_file():
        pytest.skip("the recbole wheel is not cached")
    monkeypatch.delenv("ENDCAP_DATA_CACHE", raising=False)
    out = tmp_path / "ml.json"
    flags = ["--dataset", "ml100k", "--models", "MostPop", "--seeds", "0", "--json", str(out)]
    assert main(["evaluate", *flags]) == 0
    report = json.loads(out.read_text())
    assert report["fingerprints_match_protocol"]
    assert report["models"][0]["test"]["ndcg@10"]["mean"] == pytest.approx(0.0716, abs=5e-4)
