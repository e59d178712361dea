"""The bench tool end to end at tiny sizes, and the search plans it measures: recall of the
filter-aware IVF plan against exact search on the same filter, per-list attribute
counts kept current by live updates, live rows next to a read-only index."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import inproc
from benchmarks.catalog import CatalogSpec, build_catalog
from benchmarks.loadgen import check_loopback, cpu_seconds
from benchmarks.options import add_arguments
from benchmarks.promscrape import HANDLING, parse
from benchmarks.workload import Workload
from server.domain.catalog import ItemUpdate
from server.domain.engine import Engine
from server.domain.filters import Partitions, pack, sparse_ids, to_ids, unpacked_ids

ENV = {"ENDCAP_EXACT_SCAN_MAX_ITEMS": "100"}  # small catalog, but exercise the IVF plan


@pytest.fixture(scope="module", params=["ivf_sq8", "ivf_flat"])
def catalog_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default compressed IVF (rescored from the embeddings) and IVF-Flat."""
    root = tmp_path_factory.mktemp(f"bench-catalog-{request.param}")
    build_catalog(CatalogSpec(n_items=20_000, n_users=2_000, seed=3, index=request.param), root)
    return root


@pytest.fixture
def engine(catalog_root: Path) -> Iterator[Engine]:
    yield inproc.load(catalog_root, ENV)


def test_filtered_ivf_plan_recall_matches_exact_on_the_same_filter(engine: Engine) -> None:
    wl = Workload(engine, seed=5)
    sweep = wl.sweep(25, (1.0, 0.3, 0.1, 0.03))
    plans: dict[str, int] = {}
    for level, planned in sweep.items():
        assert planned, level
        recalls = []
        for p in planned:
            prep = inproc.prepare(engine, p)
            res = engine.retriever.search(prep.query, prep.flt, 20)
            plans[res.plan] = plans.get(res.plan, 0) + 1
            passing = prep.flt.passing_ids()
            # Hard filters hold, nothing repeats, best first, never short.
            assert prep.flt.passes(res.ids).all()
            assert np.unique(res.ids).size == res.ids.size
            assert (np.diff(res.scores) <= 1e-6).all()
            assert res.ids.size == min(20, passing.size)
            recalls.append(inproc.recall(res.ids, prep.truth))
        assert float(np.mean(recalls)) >= 0.95, (level, np.mean(recalls))
    assert plans.get("ann", 0) >= 25, plans


def test_category_filters_scan_more_passing_items(engine: Engine) -> None:
    """ENDCAP_ANN_CATEGORY_FACTOR raises the scan target of filters naming categories
    only: price and country filters probe the same lists with or without it."""
    wl = Workload(engine, seed=11)
    retriever = engine.retriever
    base = retriever.tuning
    seen = {"category": 0, "other": 0}
    try:
        for level, planned in wl.sweep(15, (0.3, 0.1, 0.03)).items():
            for p in planned:
                prep = inproc.prepare(engine, p)
                parts = retriever.partitions(prep.flt)
                pe = prep.flt.partition_estimates(parts) if parts is not None else None
                assert pe is not None, level
                est = pe.expected(prep.flt.estimate)
                scanned = {}
                for factor in (1.0, 2.0):
                    retriever.tuning = dataclasses.replace(base, ann_category_factor=factor)
                    chosen = retriever.probes(prep.query, prep.flt)
                    assert chosen is not None
                    scanned[factor] = float(est[chosen[0]].sum())
                spec = prep.flt.spec
                assert spec is not None
                if spec.include_categories is not None or spec.require_category is not None:
                    seen["category"] += 1
                    whole = float(est.sum())  # cannot scan more than every passing item
                    assert scanned[2.0] >= min(1.9 * scanned[1.0], 0.99 * whole), p.recipe
                else:
                    seen["other"] += 1
                    assert scanned[2.0] == scanned[1.0], p.recipe
    finally:
        retriever.tuning = base
    assert seen["category"] >= 5 and seen["other"] >= 5, seen


def test_partition_estimates_sum_to_the_filter_count(engine: Engine) -> None:
    wl = Workload(engine, seed=9)
    parts = None
    for p in wl.mixed(60, {"Recommend": 1.0}):
        prep = inproc.prepare(engine, p)
        parts = engine.retriever.partitions(prep.flt)
        assert parts is not None
        pe = prep.flt.partition_estimates(parts)
        assert pe is not None
        est = pe.expected(prep.flt.estimate)
        assert (est >= 0).all()
        if prep.flt.estimate:
            assert est.sum() == pytest.approx(prep.flt.estimate, rel=1e-6)
        # A list with no item of a required category is never worth probing.
        if prep.flt.spec is not None and prep.flt.spec.include_categories:
            cats = list(prep.flt.spec.include_categories)
            assert (est[parts.category[cats].sum(axis=0) == 0] == 0).all()
        # The lists kept as holding passing items are exactly those estimated to.
        holding = np.flatnonzero(est > 0)
        if pe.holding is None:
            assert holding.shape[0] == est.shape[0]
        else:
            assert pe.holding.tolist() == holding.tolist()


def test_partition_counts_follow_live_updates(engine: Engine) -> None:
    cat = engine.catalog
    wl = Workload(engine, seed=2)
    parts = engine.retriever.partitions(inproc.prepare(engine, wl.mixed(1)[0]).flt)
    assert parts is not None
    rng = np.random.default_rng(0)
    leaves = [c for c in cat.category_names if "/" in c]
    rows = rng.choice(cat.n_base, size=200, replace=False)
    updates = [
        (
            i,
            ItemUpdate(
                item_id=cat.item_ids(np.array([r]))[0],
                category=str(rng.choice(leaves)) if i % 2 else "",
                price=float(rng.lognormal(3, 1)) if i % 3 else None,
                countries=tuple(rng.choice(list(cat.country_codes), size=2, replace=False))
                if i % 4 == 0
                else (),
                in_stock=bool(rng.random() < 0.5) if i % 5 else None,
            ),
        )
        for i, r in enumerate(rows.tolist())
    ]
    created, updated, rejected = engine.upsert(updates)
    assert (created, updated, rejected) == (0, len(updates), [])
    fresh = Partitions(cat.filters, parts.assign, parts.n_parts)
    for name in ("size", "category", "country", "stock", "price_le"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(fresh, name), err_msg=name)


def test_live_rows_are_found_next_to_the_read_only_index(engine: Engine) -> None:
    cat = engine.catalog
    n_before = engine.vectors.n
    leaf = next(c for c in cat.category_names if "/" in c)
    items = [
        (i, ItemUpdate(item_id=f"live-{i}", category=leaf, price=10.0, countries=("US",)))
        for i in range(50)
    ]
    created, _, rejected = engine.upsert(items)
    assert created == 50 and not rejected
    assert engine.retriever.index.ntotal == n_before  # the index itself never grows
    from server.domain.filters import FilterSpec

    flt = cat.filters.compile(FilterSpec(country=cat.country_row("US")))
    for row in range(n_before, n_before + 5):
        q = engine.vectors.take(np.array([row]))[0] * 10
        ann = engine.retriever.search(q, flt, 20)
        exact = engine.retriever.exact(q, flt, 20)
        assert ann.plan == "ann"
        assert set(exact.ids[:5].tolist()) <= set(ann.ids.tolist())
        assert row in exact.ids


def test_brand_filters_follow_live_brand_changes(engine: Engine) -> None:
    """Brand bitmaps are cached; moving items between brands must show at once."""
    from server.domain.filters import FilterSpec

    cat = engine.catalog
    fi = cat.filters

    def passing(brands: tuple[int, ...]) -> set[int]:
        spec = FilterSpec(brands=brands, in_stock_only=False)
        return set(fi.compile(spec).passing_ids().tolist())

    def truth(brands: tuple[int, ...]) -> set[int]:
        rows = np.flatnonzero(np.isin(cat.brand[: cat.n], brands) & cat.alive[: cat.n].astype(bool))
        return set(rows.tolist())

    a, b = (int(x) for x in np.bincount(cat.brand[: cat.n]).argsort()[-2:])
    for brands in ((a,), (b,), (a, b)):
        assert passing(brands) == truth(brands)  # builds and caches the bitmaps
    rows_a = sorted(truth((a,)))[:3]
    name_b = cat.brand_names[b]
    moved = [
        (i, ItemUpdate(item_id=cat.item_ids(np.array([r]))[0], brand=name_b))
        for i, r in enumerate(rows_a)
    ]
    fresh = [
        (
            9,
            ItemUpdate(
                item_id="brand-new-item",
                category=cat.category_names[-1],
                price=3.0,
                brand="Brand New Co",
            ),
        )
    ]
    assert engine.upsert(moved + fresh)[2] == []
    new_brand = cat.brand_names.index("Brand New Co")
    for brands in ((a,), (b,), (a, b), (new_brand,)):
        assert passing(brands) == truth(brands), brands


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=700), st.integers(0, 3))
def test_to_ids_lists_set_bits_ascending(bits: list[bool], shift: int) -> None:
    mask: npt.NDArray[np.bool_] = np.array([False] * shift + bits, dtype=bool)
    for ids in (to_ids, unpacked_ids, sparse_ids):  # to_ids picks one by the bitmap's size
        np.testing.assert_array_equal(ids(pack(mask)), np.flatnonzero(mask), err_msg=ids.__name__)


def test_prometheus_histogram_diff_and_quantiles() -> None:
    def expo(counts: list[int]) -> str:
        les = ["0.0001", "0.0005", "0.001", "0.002", "+Inf"]
        lines = [
            f'endcap_grpc_handling_seconds_bucket{{le="{le}",method="Recommend"}} {c}'
            for le, c in zip(les, counts, strict=True)
        ]
        lines += [
            f'endcap_grpc_handling_seconds_count{{method="Recommend"}} {counts[-1]}',
            'endcap_grpc_handling_seconds_sum{method="Recommend"} 0.1',
            'endcap_grpc_requests_total{code="OK",method="Recommend"} 7.0',
        ]
        return "\n".join(lines)

    before = parse(expo([0, 0, 0, 0, 0]))
    after = parse(expo([10, 60, 99, 100, 100]))
    h = after.minus(before).hist(HANDLING, "Recommend")
    assert h.count == 100
    assert h.fraction_within(1e-3) == pytest.approx(0.99)
    assert 1e-4 < h.quantile(0.5) <= 5e-4
    assert 5e-4 < h.quantile(0.99) <= 1e-3
    assert after.codes("Recommend") == {"OK": 7.0}


def test_server_cpu_is_read_from_proc() -> None:
    before = cpu_seconds([os.getpid()])
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_seconds([os.getpid()]) - before >= 0.03
    assert cpu_seconds([2**22 + 7]) == 0.0  # no such process: nothing counted


def test_load_targets_must_be_loopback() -> None:
    for ok in ("127.0.0.1:5000", "localhost:1", "[::1]:80"):
        check_loopback(ok)
    for bad in ("10.0.0.1:50051", "example.com:443", "0.0.0.0:1"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(bad)


def test_catalog_layouts_hold_the_same_items_in_another_order() -> None:
    """--layout category keeps each leaf's rows contiguous (as training exports);
    --layout shuffled is the same catalog in random order."""
    from benchmarks.catalog import generate_arrays

    spec = CatalogSpec(n_items=3_000, n_users=300, seed=2)
    by_layout = {
        lay: generate_arrays(dataclasses.replace(spec, layout=lay))[0]
        for lay in ("category", "shuffled")
    }
    for name, arrays in by_layout.items():
        leaf = arrays["item_category"]
        runs = 1 + int(np.count_nonzero(np.diff(leaf)))
        contiguous = runs == np.unique(leaf).size
        assert contiguous == (name == "category"), name
    ids = {lay: a["item_ids"].tolist() for lay, a in by_layout.items()}
    assert ids["category"] != ids["shuffled"] and sorted(ids["category"]) == sorted(ids["shuffled"])
    row = {item: i for i, item in enumerate(ids["shuffled"])}
    order = np.array([row[item] for item in ids["category"]])
    for column in ("item_category", "item_brand", "item_price", "item_in_stock"):
        np.testing.assert_array_equal(
            by_layout["category"][column], by_layout["shuffled"][column][order], err_msg=column
        )
    with pytest.raises(ValueError, match="layout"):
        CatalogSpec(layout="sorted")


def test_bench_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tiny run of every section; no timing asserts, only that it measured."""
    from benchmarks.placements import PLACEMENTS
    from benchmarks.run import main

    monkeypatch.setenv("ENDCAP_BENCH_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out" / "bench.json"
    args = parser.parse_args(
        [
            "--items", "3000", "--users", "500", "--seconds", "0.3", "--json", str(out),
            "--per-level", "6", "--recall-samples", "3", "--levels", "1,0.05",
            "--load-fractions", "0.5", "--concurrency", "4", "--workers", "2",
            "--skip", "replicas", "--tune", "ENDCAP_EXACT_SCAN_MAX_ITEMS=100",
            "--live-events", "2500",
        ]
    )  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    names = [s["name"] for s in r["scenarios"]]
    assert "echo c=1 Recommend" in names and "endcap c=4 mix" in names
    for s in r["scenarios"]:
        assert s["e2e"]["ok"] > 0 and not s["e2e"]["errors"], s["name"]
    assert [row["label"] for row in r["selectivity"]] == ["100%", "5%"]
    for row in r["selectivity"]:
        assert 0.0 <= row["recall_at_20"] <= 1.0
        assert row["server_side"]["handler"]["Recommend"]["count"] > 0
    assert r["live_events"]["accepted"] == 2500 and r["live_events"]["rejected"] == 0
    assert r["floors"]["echo_c1_p50_us_mean"] > 0
    assert set(r["ratios"]) == {"e2e_c1_p50_vs_echo", "qps_c4_vs_echo", "cpu_per_call_c4_vs_echo"}
    by_name = {s["name"]: s for s in r["scenarios"]}
    for name in ("echo c=4 mix", "endcap c=4 mix"):
        assert by_name[name]["e2e"]["server_cpu_us_per_call"] > 0, name
    assert r["open_loop"]["server"] and r["open_loop"]["echo"]
    rt = r["realtime"]
    assert rt["reload_under_load"]["reload_outcomes"] == {"OK": 5}
    assert rt["reload_under_load"]["failed_requests"] == 0
    assert rt["upsert_10k_under_load"]["created"] == 10_000
    assert rt["freshness_one_process"]["reflected"] > 0
    assert r["workers"]["workers"] == 2 and r["workers"]["qps"] > 0
    assert all(n > 0 for n in r["workers"]["recommend_calls_per_worker_total"])
    assert r["memory"]["rss_mb"] > 0
    placed = r["placements"]["table"]
    assert [row["placement"] for row in placed] == list(PLACEMENTS)
    assert all(row["qps"] > 0 and not row["errors"] for row in placed)
    assert all(row["server_p50_us"] > 0 for row in placed)
    assert {Path(p).name for p in r["plots"]} == {
        "latency_vs_load.png",
        "latency_by_selectivity.png",
    }
    assert any(t["name"].startswith("recall@20") for t in r["targets"])


def test_a_filter_only_live_rows_pass_is_scanned_exactly(engine: Engine) -> None:
    """No indexed item passes (a brand only live rows have): the per-list estimate is
    all zeros, so the search must scan exactly, not ask FAISS to probe no lists (it
    refuses nprobe 0). 2,100 rows: enough that the cost model tries the IVF first."""
    from server.domain.filters import FilterSpec

    cat = engine.catalog
    leaf = next(c for c in cat.category_names if "/" in c)
    items = [
        (i, ItemUpdate(item_id=f"solo-{i}", category=leaf, brand="Solo Only", price=5.0))
        for i in range(2_100)
    ]
    created, _, rejected = engine.upsert(items)
    assert created == 2_100 and not rejected
    retriever = engine.retriever
    base = retriever.tuning
    brand = cat.brand_names.index("Solo Only")
    flt = cat.filters.compile(FilterSpec(brands=(brand,)))
    assert flt.estimate == 2_100
    query = engine.vectors.take(np.array([0]))[0]
    chosen = retriever.probes(query, flt)
    assert chosen is not None and chosen[0].shape[0] == 0
    try:
        retriever.tuning = dataclasses.replace(base, exact_scan_max_items=0)  # IVF first
        found = retriever.search(query, flt, 20)
    finally:
        retriever.tuning = base
    assert found.plan == "exact" and found.ids.size == 20
    assert set(cat.item_ids(found.ids)) <= {f"solo-{i}" for i in range(2_100)}
