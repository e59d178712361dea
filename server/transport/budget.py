"""Per-call time budget, and the cheap answer when it runs short.

A call may spend the sooner of the client's deadline and the server's own cap
(`request_budget_s`). When less than `fallback_below_s` of it is left, at the
start or after the state-store reads, Recommend and SimilarItems answer from
the segment's bestsellers under the same filters (provenance
SEGMENT_POPULARITY or GLOBAL_POPULARITY, a fraction of a millisecond) instead
of running search and ranking into a timeout. Popular skips its live counts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import grpc

from server.domain.engine import Answer, Engine
from server.domain.errors import UnknownItems
from server.domain.query import Context, Filters, PopularQuery


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    request_budget_s: float = 1.0  # 0 = only the client's deadline
    fallback_below_s: float = 0.005

    def start(self, context: grpc.aio.ServicerContext[Any, Any]) -> Budget:
        remaining = context.time_remaining()
        allowed = float("inf") if remaining is None else remaining
        if self.request_budget_s > 0:
            allowed = min(allowed, self.request_budget_s)
        return Budget(time.monotonic() + allowed, self.fallback_below_s)


@dataclass(frozen=True, slots=True)
class Budget:
    deadline: float  # time.monotonic()
    fallback_below_s: float

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def short(self) -> bool:
        """Too little left for the full path."""
        return self.remaining() < self.fallback_below_s


def popular_fallback(
    engine: Engine, ctx: Context, filters: Filters, k: int, exclude: tuple[str, ...] = ()
) -> Answer:
    """The segment's bestsellers within `filters`, never one of `exclude` (seeds)."""
    if exclude:
        filters = dataclasses.replace(
            filters, exclude_item_ids=tuple(dict.fromkeys(filters.exclude_item_ids + exclude))
        )
    return engine.popular(PopularQuery(context=ctx, filters=filters, k=k), ())


def similar_fallback(
    engine: Engine, ctx: Context, filters: Filters, k: int, seeds: tuple[str, ...]
) -> Answer:
    """SimilarItems' cheap answer; an unknown seed is still NOT_FOUND."""
    rows = engine.catalog.lookup(seeds)
    missing = tuple(s for s, row in zip(seeds, rows.tolist(), strict=True) if row < 0)
    if missing:
        raise UnknownItems("seed_item_ids", missing)
    return popular_fallback(engine, ctx, filters, k, seeds)
