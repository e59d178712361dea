"""Offline evaluation per placement: cases are what each placement's job says, the
profile is only the past, and the served Engine (no torch) beats bestsellers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from test_evaluate import synthetic_report  # noqa: F401  (module fixture: one evaluate run)

from conftest import TrainedStore
from training.data import ADD_TO_CART, PURCHASE, VIEW, Dataset
from training.placement_eval import PLACEMENT_TASKS, Case, cases


def held_out(ds: Dataset) -> npt.NDArray[np.bool_]:
    """The last fifth of the store's time."""
    cut = np.quantile(ds.ev_ts, 0.8)
    return np.asarray(ds.ev_ts > cut)


def test_cases_follow_each_placements_job(trained: TrainedStore) -> None:
    ds = trained.dataset
    mask = held_out(ds)
    sampled, available = cases(ds, mask, max_cases=200, seed=1)
    assert {"home", "product", "cart", "email"} <= set(sampled)
    cat, price = ds.item_category, ds.item_price
    for name, picked in sampled.items():
        assert len(picked) == min(200, available[name])
        for c in picked:
            assert isinstance(c, Case) and c.placement == name
            # The profile is the shopper's past only.
            assert all(ts <= c.ts_s for _, ts in c.recent)
    for c in sampled["product"]:
        assert c.seeds[0] != c.target and c.recent[0][0] == c.seeds[0]
    for c in sampled.get("product.cheaper", []):
        assert cat[c.target] == cat[c.seeds[0]] and price[c.target] < 0.95 * price[c.seeds[0]]
    for c in sampled["cart"]:
        assert c.cart and c.target not in c.cart
        assert cat[c.target] not in {cat[r] for r in c.cart}
    for c in sampled["email"]:
        assert c.purchased and c.target not in c.purchased
        assert cat[c.target] not in {cat[r] for r in c.purchased[:5]}
    # Targets are real held-out events of that shopper at that time.
    events = set(
        zip(
            ds.ev_user[mask].tolist(),
            ds.ev_item[mask].tolist(),
            ds.ev_ts[mask].tolist(),
            ds.ev_type[mask].tolist(),
            strict=True,
        )
    )
    for c in sampled["cart"][:50]:
        assert any((c.user, c.target, int(c.ts_s), t) in events for t in (ADD_TO_CART, PURCHASE))
    for c in sampled["product"][:50]:
        assert (c.user, c.target, int(c.ts_s), VIEW) in events


def test_engine_path_loads_no_torch(trained: TrainedStore, tmp_path: Path) -> None:
    """The per-placement replay runs on the artifact alone, as the server does."""
    script = f"""
import json, sys
from pathlib import Path
import numpy as np
from server.artifact import load_artifact
from server.domain.engine import Engine
from training.placement_eval import evaluate_engine
from training.synthetic import StoreConfig, generate_store
ds = generate_store(StoreConfig(n_items=3_000, n_users=600, n_events=30_000, seed=7))
mask = ds.ev_ts > np.quantile(ds.ev_ts, 0.8)
report = evaluate_engine(Engine(load_artifact(Path({str(trained.artifacts)!r}))), ds, mask,
                         max_cases=150, seed=2)
assert "torch" not in sys.modules, "the Engine path imported torch"
print(json.dumps(report))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = report["placements"]
    assert set(rows) == set(PLACEMENT_TASKS)
    for row in rows.values():
        if "endcap" in row:
            for side in ("endcap", "popularity"):
                assert 0.0 <= row[side]["mrr@10"] <= row[side]["hit@10"] <= 1.0
    # The store has item-to-item structure: similar items beat bestsellers on product pages.
    assert rows["product"]["endcap"]["hit@10"] > 2 * rows["product"]["popularity"]["hit@10"]


def test_evaluate_reports_placements(synthetic_report: dict[str, Any]) -> None:  # noqa: F811
    report = synthetic_report["placements"]
    assert report["k"] == 10 and set(report["placements"]) == set(PLACEMENT_TASKS)
    home = report["placements"]["home"]
    assert home["strategy"] == "home" and home["cases"] > 0
    measured = [r for r in report["placements"].values() if "endcap" in r]
    assert len(measured) >= 4
    for row in measured:
        assert set(row["endcap"]) == {"hit@10", "mrr@10"}


@pytest.mark.parametrize("flag", ["--no-placements"])
def test_cli_can_skip_placements(flag: str, tmp_path: Path) -> None:
    from test_evaluate import FLAGS

    from endcap.cli import main

    out = tmp_path / "r.json"
    code = main(
        ["evaluate", "--dataset", "synthetic", *FLAGS, "--epochs", "1", "--baselines", "MostPop",
         "--no-context-ablation", "--no-cold-start", "--no-fidelity", flag, "--json", str(out)]
    )  # fmt: skip
    assert code == 0 and "placements" not in json.loads(out.read_text())
