"""Offline quality per placement: replay held-out shopping through the served Engine.

Each placement gets a task its data can answer (PLACEMENT_TASKS). Cases come from
the events a model did not train on, in time order per shopper; the shopper's
real-time profile at that moment is rebuilt from their earlier held-out events,
as the state store would hold it. Every case runs the placement's real strategy
through server.domain.engine.Engine loaded from an exported artifact (numpy +
FAISS, no torch), and again with every strategy reduced to segment bestsellers
under the same constraints: the popularity baseline.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from training.data import ADD_TO_CART, PURCHASE, VIEW, Dataset

if TYPE_CHECKING:
    from rich.console import Console

    from server.domain.engine import Engine
    from server.domain.strategy import Strategies
    from training.train import TrainedModel

# Placement -> (RequestContext.Placement value, strategy name, task description).
PLACEMENT_TASKS: Mapping[str, tuple[int, str, str]] = {
    "home": (1, "", "first new item a shopper interacts with after the cut"),
    "category": (2, "", "same, on the page of that item's leaf category"),
    "product": (3, "", "next item viewed after a product (same session)"),
    "product.cheaper": (3, "product.cheaper", "next viewed, same category, < 0.95x the price"),
    "product.upsell": (3, "product.upsell", "next viewed, same category, 1.1-2x the price"),
    "cart": (4, "", "next item carted or bought from another category than the cart"),
    "checkout": (5, "", "same, priced at most 0.3x the cart's mean"),
    "email": (6, "", "next purchase from another category after a purchase"),
}
SESSION_GAP_S = 30 * 60
MIN_CASES = 20  # fewer than this: the data does not support the task


@dataclass(frozen=True, slots=True)
class Case:
    placement: str
    user: int
    target: int  # item row
    ts_s: float
    device: int
    country: int
    seeds: tuple[int, ...]
    recent: tuple[tuple[int, float], ...]  # newest first
    cart: tuple[int, ...]
    purchased: tuple[int, ...]
    orders: int
    monetary: float
    last_purchase_s: float


class _Reservoir:
    """A uniform sample of at most `size` cases per placement (Algorithm R)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.seen: dict[str, int] = {}
        self.kept: dict[str, list[Case]] = {}

    def offer(self, placement: str, state: _Shopper, at: int, seeds: tuple[int, ...]) -> None:
        n = self.seen.get(placement, 0)
        self.seen[placement] = n + 1
        kept = self.kept.setdefault(placement, [])
        if n < self.size:
            kept.append(state.case(placement, at, seeds))
        else:
            j = int(self.rng.integers(0, n + 1))
            if j < self.size:
                kept[j] = state.case(placement, at, seeds)


class _Shopper:
    """One shopper's real-time profile while their held-out events replay."""

    def __init__(self, user: int, events: _Events) -> None:
        self.user, self.events = user, events
        self.recent: OrderedDict[int, float] = OrderedDict()
        self.cart: OrderedDict[int, None] = OrderedDict()
        self.purchased: OrderedDict[int, None] = OrderedDict()
        self.orders, self.monetary, self.last_buy = 0, 0.0, 0.0

    def case(self, placement: str, at: int, seeds: tuple[int, ...]) -> Case:
        ev = self.events
        return Case(
            placement=placement,
            user=self.user,
            target=ev.items[at],
            ts_s=float(ev.stamps[at]),
            device=ev.devices[at],
            country=ev.countries[at],
            seeds=seeds,
            recent=tuple(reversed(self.recent.items()))[:50],
            cart=tuple(reversed(self.cart)),
            purchased=tuple(reversed(self.purchased)),
            orders=self.orders,
            monetary=self.monetary,
            last_purchase_s=self.last_buy,
        )

    def apply(self, item: int, kind: int, ts: float, price: float) -> None:
        """As the state store applies an event."""
        self.recent.pop(item, None)
        self.recent[item] = ts
        while len(self.recent) > 50:
            self.recent.popitem(last=False)
        if kind == ADD_TO_CART:
            self.cart[item] = None
        elif kind == PURCHASE:
            self.cart.pop(item, None)
            self.purchased.pop(item, None)
            self.purchased[item] = None
            self.orders += 1
            self.monetary += price
            self.last_buy = max(self.last_buy, ts)


@dataclass(frozen=True, slots=True)
class _Events:
    """Held-out events as Python lists, grouped by shopper, in time order."""

    users: list[int]
    items: list[int]
    stamps: list[int]
    kinds: list[int]
    devices: list[int]
    countries: list[int]
    known: list[bool]  # the shopper interacted with this item in training


def cases(
    dataset: Dataset, held_out: npt.NDArray[np.bool_], *, max_cases: int = 1_000, seed: int = 0
) -> tuple[dict[str, list[Case]], dict[str, int]]:
    """Sampled cases per placement from the held-out events, and how many were available."""
    n_items = dataset.n_items
    trained = np.unique(
        dataset.ev_user[~held_out].astype(np.int64) * n_items + dataset.ev_item[~held_out]
    )
    idx = np.flatnonzero(held_out)
    idx = idx[np.lexsort((idx, dataset.ev_user[idx]))]  # per user, in time order
    codes = dataset.ev_user[idx].astype(np.int64) * n_items + dataset.ev_item[idx]
    pos = np.minimum(np.searchsorted(trained, codes), max(trained.size - 1, 0))
    ev = _Events(
        users=dataset.ev_user[idx].tolist(),
        items=dataset.ev_item[idx].tolist(),
        stamps=dataset.ev_ts[idx].tolist(),
        kinds=dataset.ev_type[idx].tolist(),
        devices=dataset.ev_device[idx].tolist(),
        countries=dataset.ev_country[idx].tolist(),
        known=(trained[pos] == codes).tolist() if trained.size else [False] * idx.size,
    )
    price, category = dataset.item_price, dataset.item_category
    out = _Reservoir(max_cases, np.random.default_rng(seed))
    shopper = _Shopper(-1, ev)
    first_done = False
    prev: tuple[int, int, float] | None = None  # previous event: item, kind, ts
    for i in range(idx.size):
        u, item, ts, kind = ev.users[i], ev.items[i], float(ev.stamps[i]), ev.kinds[i]
        if u != shopper.user:
            shopper, prev, first_done = _Shopper(u, ev), None, False
        if not first_done and not ev.known[i] and item not in shopper.recent:
            first_done = True
            out.offer("home", shopper, i, ())
            out.offer("category", shopper, i, ())
        if (
            kind == VIEW
            and prev is not None
            and prev[1] == VIEW
            and prev[0] != item
            and ts - prev[2] <= SESSION_GAP_S
        ):
            seed_item = prev[0]
            out.offer("product", shopper, i, (seed_item,))
            if category[item] == category[seed_item]:
                ratio = price[item] / price[seed_item]
                if ratio < 0.95:
                    out.offer("product.cheaper", shopper, i, (seed_item,))
                elif 1.1 <= ratio <= 2.0:
                    out.offer("product.upsell", shopper, i, (seed_item,))
        cart = shopper.cart
        if (
            kind in (ADD_TO_CART, PURCHASE)
            and cart
            and item not in cart
            and int(category[item]) not in {int(category[c]) for c in cart}
        ):
            out.offer("cart", shopper, i, ())
            if price[item] <= 0.3 * float(np.mean(price[list(cart)])):
                out.offer("checkout", shopper, i, ())
        bought = shopper.purchased
        if kind == PURCHASE and bought and item not in bought:
            seeds = tuple(reversed(bought))[:5]
            if int(category[item]) not in {int(category[s]) for s in seeds}:
                out.offer("email", shopper, i, ())
        shopper.apply(item, kind, ts, float(price[item]))
        prev = (item, kind, ts)
    return out.kept, out.seen


def _bestsellers_only(strategies: Strategies) -> Strategies:
    """Every strategy with its constraints kept but only segment bestsellers retrieved."""
    return dataclasses.replace(
        strategies,
        strategies={
            name: dataclasses.replace(
                s,
                retrievers={"segment_bestsellers": 1.0},
                device_weights={},
                segment_weights={},
                source_weights={},
            )
            for name, s in strategies.strategies.items()
        },
    )


def _run(engine: Engine, dataset: Dataset, case: Case, k: int) -> int:
    """1-based rank of the case's target in the Engine's answer, 0 if not in the top k."""
    from server.domain.query import Context, Filters, Profile, RecommendQuery

    code, strategy, _ = PLACEMENT_TASKS[case.placement]
    ids = dataset.item_ids
    filters = Filters()
    if case.placement == "category":
        filters = Filters(
            include_categories=(dataset.category_names[dataset.item_category[case.target]],)
        )
    query = RecommendQuery(
        context=Context(
            user_id=str(dataset.user_ids[case.user]),
            device=case.device,
            country=dataset.country_codes[case.country],
            placement=code,
        ),
        filters=filters,
        k=k,
        seeds=tuple(str(ids[s]) for s in case.seeds),
        strategy=strategy,
    )
    profile = Profile(
        recent=tuple((str(ids[r]), ts) for r, ts in case.recent),
        cart=tuple(str(ids[r]) for r in case.cart),
        purchased=tuple(str(ids[r]) for r in case.purchased),
        orders=case.orders,
        monetary=case.monetary,
        last_purchase_s=case.last_purchase_s,
    )
    plan = engine.plan(query, profile, case.ts_s)
    answer = engine.recommend(query, plan, profile, {}, case.ts_s)
    hits = np.flatnonzero(answer.results.ids == case.target)
    return int(hits[0]) + 1 if hits.size else 0


def _metrics(ranks: Sequence[int], k: int) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    return {
        f"hit@{k}": float((r > 0).mean()) if r.size else 0.0,
        f"mrr@{k}": float(np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0).mean()) if r.size else 0.0,
    }


def evaluate_engine(
    engine: Engine,
    dataset: Dataset,
    held_out: npt.NDArray[np.bool_],
    *,
    k: int = 10,
    max_cases: int = 1_000,
    seed: int = 0,
) -> dict[str, Any]:
    """hit@k and MRR@k per placement: the strategy vs bestsellers under its constraints.

    `dataset` must be the one the engine's artifact was exported from (same item
    rows); `held_out` flags the events the model did not train on.
    """
    t0 = time.perf_counter()
    sampled, available = cases(dataset, held_out, max_cases=max_cases, seed=seed)
    strategies = engine.strategies
    baseline = _bestsellers_only(strategies)
    rows: dict[str, Any] = {}
    try:
        for placement, (_, strategy, task) in PLACEMENT_TASKS.items():
            picked = sampled.get(placement, [])
            row: dict[str, Any] = {
                "task": task,
                "strategy": strategy or strategies.placements.get(_PLACEMENT_NAMES[placement], ""),
                "cases": len(picked),
                "available": available.get(placement, 0),
            }
            if len(picked) < MIN_CASES:
                row["note"] = f"fewer than {MIN_CASES} cases: not measured"
                rows[placement] = row
                continue
            engine.strategies = strategies
            started = time.perf_counter()
            row["endcap"] = _metrics([_run(engine, dataset, c, k) for c in picked], k)
            row["ms_per_request"] = round(1000 * (time.perf_counter() - started) / len(picked), 3)
            engine.strategies = baseline
            row["popularity"] = _metrics([_run(engine, dataset, c, k) for c in picked], k)
            rows[placement] = row
    finally:
        engine.strategies = strategies
    return {
        "k": k,
        "max_cases": max_cases,
        "baseline": "segment bestsellers under the placement's constraints",
        "placements": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


_PLACEMENT_NAMES = {
    "home": "HOME",
    "category": "CATEGORY",
    "product": "PRODUCT",
    "product.cheaper": "PRODUCT",
    "product.upsell": "PRODUCT",
    "cart": "CART",
    "checkout": "CHECKOUT",
    "email": "EMAIL",
}


def evaluate_placements(
    dataset: Dataset,
    train_events: npt.NDArray[np.bool_],
    model: TrainedModel,
    *,
    artifacts: Path | None = None,
    k: int = 10,
    max_cases: int = 1_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Export `model` (trained on the `train_events` of `dataset`), load it into the
    server's Engine and measure every placement on the other events."""
    from server.artifact import load_artifact
    from server.domain.engine import Engine
    from training.evaluate import restrict_events
    from training.export import export_artifact

    train_set = restrict_events(dataset, train_events)
    with tempfile.TemporaryDirectory(prefix="endcap-placements-") as tmp:
        root = artifacts or Path(tmp)
        path = export_artifact(train_set, model, root, make_latest=artifacts is not None)
        engine = Engine(load_artifact(path))
        report = evaluate_engine(
            engine, dataset, ~train_events, k=k, max_cases=max_cases, seed=seed
        )
    report["artifact"] = str(path) if artifacts is not None else f"(temporary) {path.name}"
    return report


def print_placements(report: Mapping[str, Any], console: Console) -> None:
    from rich.table import Table

    k = report["k"]
    table = Table(
        title=f"Placements: the served strategy vs {report['baseline']} (hit@{k}, MRR@{k})",
        caption=f"up to {report['max_cases']:,} sampled cases each; {report['seconds']}s",
    )
    for col in ("placement", "task", "cases", f"hit@{k}", f"pop hit@{k}", f"MRR@{k}",
                f"pop MRR@{k}", "lift"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("placement", "task") else "right")
    for name, row in report["placements"].items():
        if "endcap" not in row:
            table.add_row(name, row["task"], str(row["cases"]), "-", "-", "-", "-", row["note"])
            continue
        e, p = row["endcap"], row["popularity"]
        pop = p[f"hit@{k}"]
        lift = f"{e[f'hit@{k}'] / pop:.1f}x" if pop else "-"
        table.add_row(
            name, row["task"], f"{row['cases']:,}",
            f"{e[f'hit@{k}']:.3f}", f"{pop:.3f}", f"{e[f'mrr@{k}']:.3f}", f"{p[f'mrr@{k}']:.3f}",
            lift,
        )  # fmt: skip
    console.print(table)
