"""Offline reports over the durable event log: experiment results, log statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from endcap.v1 import recommender_pb2 as pb
from server.domain.experiments import Rate, attribution, two_proportion_p
from server.state.eventlog import ReadStats, read_events

_KINDS = {
    pb.Event.RECOMMENDATION_IMPRESSION: "impressions",
    pb.Event.RECOMMENDATION_CLICK: "clicks",
    pb.Event.PURCHASE: "purchases",
}


@dataclass(frozen=True, slots=True)
class VariantResult:
    experiment: str
    variant: str
    impressions: int
    clicks: int
    purchases: int

    @property
    def ctr(self) -> Rate:
        return Rate(min(self.clicks, self.impressions), self.impressions)

    @property
    def conversion(self) -> Rate:
        return Rate(min(self.purchases, self.impressions), self.impressions)


def experiment_results(events_dir: Path) -> tuple[list[VariantResult], ReadStats]:
    """Per-variant impressions, clicks and purchases attributed by recommendation_id."""
    records, stats = read_events(events_dir)
    counts: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        ev = record.event
        kind = _KINDS.get(ev.type)
        pair = attribution(ev.recommendation_id) if kind and ev.recommendation_id else None
        if pair is not None and kind is not None:
            counts[(*pair, kind)] += 1
    pairs = sorted({(e, v) for e, v, _ in counts})
    results = [
        VariantResult(
            e,
            v,
            counts[(e, v, "impressions")],
            counts[(e, v, "clicks")],
            counts[(e, v, "purchases")],
        )
        for e, v in pairs
    ]
    return results, stats


def _fmt(rate: Rate) -> str:
    lo, hi = rate.interval
    return f"{rate.value:.2%} [{lo:.2%}, {hi:.2%}]"


def results_table(results: list[VariantResult]) -> tuple[Table, list[dict[str, Any]]]:
    """A rich table and JSON rows; p-values compare each variant with its experiment's first."""
    table = Table(title="Experiments (95% Wilson intervals; p vs the first variant)")
    for col in (
        "experiment",
        "variant",
        "impressions",
        "clicks",
        "CTR",
        "p (CTR)",
        "purchases",
        "conversion",
        "p (conv)",
    ):
        table.add_column(col, justify="left" if col in {"experiment", "variant"} else "right")
    rows: list[dict[str, Any]] = []
    baseline: dict[str, VariantResult] = {}
    for r in results:
        base = baseline.setdefault(r.experiment, r)
        p_ctr = two_proportion_p(r.ctr, base.ctr) if r is not base else None
        p_conv = two_proportion_p(r.conversion, base.conversion) if r is not base else None
        table.add_row(
            r.experiment, r.variant, f"{r.impressions:,}", f"{r.clicks:,}", _fmt(r.ctr),
            "—" if p_ctr is None else f"{p_ctr:.3g}", f"{r.purchases:,}", _fmt(r.conversion),
            "—" if p_conv is None else f"{p_conv:.3g}",
        )  # fmt: skip
        rows.append(
            {
                "experiment": r.experiment,
                "variant": r.variant,
                "impressions": r.impressions,
                "clicks": r.clicks,
                "purchases": r.purchases,
                "ctr": r.ctr.value,
                "ctr_ci95": list(r.ctr.interval),
                "ctr_p_vs_first": p_ctr,
                "conversion": r.conversion.value,
                "conversion_ci95": list(r.conversion.interval),
                "conversion_p_vs_first": p_conv,
            }
        )
    return table, rows


def log_stats_table(stats: ReadStats, events_dir: Path) -> Table:
    table = Table(title=f"Event log {events_dir}")
    table.add_column("records", justify="right")
    table.add_column("events", justify="right")
    table.add_column("tombstones", justify="right")
    table.add_column("forgotten events (awaiting compaction)", justify="right")
    table.add_column("torn bytes", justify="right")
    table.add_row(
        f"{stats.records:,}", f"{stats.events:,}", f"{stats.tombstones:,}",
        f"{stats.dead_events:,}", f"{stats.torn_bytes:,}",
    )  # fmt: skip
    return table
