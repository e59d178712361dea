"""Per-placement latency: one closed-loop Recommend scenario for each page of the shop.

Each placement runs its own strategy (retrievers, seeds, constraints), so each
gets its own load and its own server-side histogram. Requests are planned with
a separate Workload seed so the other sections' request streams do not change.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.workload import K, Planned, Workload
from endcap.v1 import recommender_pb2 as pb

if TYPE_CHECKING:
    from benchmarks.run import Bench
    from benchmarks.servers import ServerProcess
    from server.domain.engine import Engine

C = pb.RequestContext
# Name -> (placement, strategy, seed count range, filter recipes).
PLACEMENTS: dict[str, tuple[int, str, tuple[int, int], tuple[str, ...]]] = {
    "home": (C.HOME, "", (0, 0), ("country",)),
    "category": (C.CATEGORY, "", (0, 0), ("leaf", "root", "leaf_budget")),
    "product": (C.PRODUCT, "", (1, 1), ("country",)),
    "product.cheaper": (C.PRODUCT, "product.cheaper", (1, 1), ("country",)),
    "product.upsell": (C.PRODUCT, "product.upsell", (1, 1), ("country",)),
    "cart": (C.CART, "", (1, 3), ("country",)),
    "checkout": (C.CHECKOUT, "", (1, 3), ("country",)),
    "email": (C.EMAIL, "", (1, 2), ("country",)),
}


def plan(engine: Engine, seed: int, count: int = 500) -> dict[str, list[Planned]]:
    """`count` serialised Recommend requests per placement. Seeds (the product, the
    cart, the order) are half bestsellers, half anywhere in the catalog."""
    wl = Workload(engine, seed=seed + 7_919)
    rng = wl.rng
    out: dict[str, list[Planned]] = {}
    for name, (placement, strategy, (lo, hi), recipes) in PLACEMENTS.items():
        planned = []
        for _ in range(count):
            p = wl.persona(placement=placement)
            recipe = str(rng.choice(recipes))
            n_seeds = int(rng.integers(lo, hi + 1))
            pool = wl.popular if rng.random() < 0.5 else np.arange(wl.n)
            seeds = rng.choice(pool, size=n_seeds, replace=False) if n_seeds else pool[:0]
            request = pb.RecommendRequest(
                context=p.context(),
                filters=wl.filters(recipe, p),
                num_results=K,
                seed_item_ids=engine.catalog.item_ids(np.sort(seeds)),
                strategy=strategy,
            )
            planned.append(
                Planned("Recommend", request.SerializeToString(), name, recipe, math.nan)
            )
        out[name] = planned
    return out


def run(b: Bench, server: ServerProcess, engine: Engine, seed: int) -> dict[str, Any]:
    """Closed loop, concurrency 1, each placement alone: e2e and server p50/p99."""
    planned = plan(engine, seed)
    rows: list[dict[str, Any]] = []
    for name, requests in planned.items():
        outcome, diff = b.load(server, requests, concurrency=1)
        row = b.record(
            f"endcap c=1 Recommend {name}",
            outcome,
            diff,
            mode="closed",
            concurrency=1,
            method="Recommend",
            extra={"placement": name},
        )
        rows.append(row)
    return {"scenarios": rows, "table": table(rows)}


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per placement: qps, e2e and server-side p50/p99 (µs), errors."""
    out = []
    for row in rows:
        e2e = row["e2e"]
        handler = row["server_side"].get("handler", {}).get("Recommend", {})
        out.append(
            {
                "placement": row["placement"],
                "qps": e2e["achieved_qps"],
                "e2e_p50_us": e2e["latency_us"]["p50"],
                "e2e_p99_us": e2e["latency_us"]["p99"],
                "server_p50_us": handler.get("p50_us", math.nan),
                "server_p99_us": handler.get("p99_us", math.nan),
                "errors": e2e["errors"],
            }
        )
    return out


def markdown(lines: list[dict[str, Any]]) -> str:
    """The table as Markdown (for the README)."""
    head = "| placement | qps (c=1) | server p50 | server p99 | e2e p50 | e2e p99 |"
    rule = "|---|--:|--:|--:|--:|--:|"
    body = [
        f"| {r['placement']} | {r['qps']:,.0f} | {_ms(r['server_p50_us'])} | "
        f"{_ms(r['server_p99_us'])} | {_ms(r['e2e_p50_us'])} | {_ms(r['e2e_p99_us'])} |"
        for r in lines
    ]
    return "\n".join([head, rule, *body])


def _ms(us: float) -> str:
    return "-" if math.isnan(us) else f"{us / 1000:.2f} ms"
