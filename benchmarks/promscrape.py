"""Server-side timing from the server's own Prometheus histograms, scraped before and after."""

from __future__ import annotations

import math
import re
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

HANDLING = "endcap_grpc_handling_seconds"
RETRIEVAL = "endcap_retrieval_seconds"
REQUESTS = "endcap_grpc_requests_total"


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound (seconds), plus count and sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    total: float = 0.0

    def minus(self, before: Histogram | None) -> Histogram:
        if before is None:
            return Histogram(dict(self.buckets), self.count, self.total)
        return Histogram(
            {le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
            self.count - before.count,
            self.total - before.total,
        )

    def plus(self, other: Histogram) -> Histogram:
        les = set(self.buckets) | set(other.buckets)
        return Histogram(
            {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les},
            self.count + other.count,
            self.total + other.total,
        )

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding quantile q (seconds); NaN if empty.
        Past the last finite bucket the answer is that bucket's bound (a lower limit)."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le in sorted(self.buckets):
            c = self.buckets[le]
            if c >= rank:
                if math.isinf(le):
                    return prev_le
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le

    def fraction_within(self, bound_s: float) -> float:
        """Fraction of observations <= bound_s (exact when bound_s is a bucket edge)."""
        if self.count <= 0:
            return math.nan
        edges = [le for le in sorted(self.buckets) if le <= bound_s + 1e-12]
        return self.buckets[edges[-1]] / self.count if edges else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean_us": self.total / self.count * 1e6 if self.count else math.nan,
            "p50_us": self.quantile(0.5) * 1e6,
            "p90_us": self.quantile(0.9) * 1e6,
            "p99_us": self.quantile(0.99) * 1e6,
            "p999_us": self.quantile(0.999) * 1e6,
            "within_1ms": self.fraction_within(1e-3),
            "within_2ms": self.fraction_within(2e-3),
        }


@dataclass
class Scrape:
    """Histograms keyed by (metric, label value) and counters keyed by label tuple."""

    histograms: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def hist(self, metric: str, label: str) -> Histogram:
        return self.histograms.get((metric, label), Histogram())

    def minus(self, before: Scrape) -> Scrape:
        return Scrape(
            {k: h.minus(before.histograms.get(k)) for k, h in self.histograms.items()},
            {k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
        )

    def plus(self, other: Scrape) -> Scrape:
        hists = dict(self.histograms)
        for k, h in other.histograms.items():
            hists[k] = hists[k].plus(h) if k in hists else h
        counters = dict(self.counters)
        for k2, v in other.counters.items():
            counters[k2] = counters.get(k2, 0.0) + v
        return Scrape(hists, counters)

    def labels(self, metric: str) -> list[str]:
        return sorted(lbl for m, lbl in self.histograms if m == metric)

    def codes(self, method: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (metric, labels), v in self.counters.items():
            d = dict(labels)
            if metric == REQUESTS and d.get("method") == method and v:
                out[d.get("code", "")] = out.get(d.get("code", ""), 0.0) + v
        return out


def parse(text: str) -> Scrape:
    """The histograms and request counters of one /metrics exposition."""
    hists: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, raw_labels, raw_value = m.group(1), m.group(2) or "", m.group(3)
        labels = dict(_LABEL.findall(raw_labels))
        value = float(raw_value)
        for metric, key in ((HANDLING, "method"), (RETRIEVAL, "plan")):
            if name == metric + "_bucket":
                le = labels.get("le", "+Inf")
                hists[(metric, labels.get(key, ""))].buckets[float(le)] = value
            elif name == metric + "_count":
                hists[(metric, labels.get(key, ""))].count = value
            elif name == metric + "_sum":
                hists[(metric, labels.get(key, ""))].total = value
        if name == REQUESTS:
            counters[(REQUESTS, tuple(sorted(labels.items())))] = value
    return Scrape(dict(hists), counters)


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> Scrape:
    """One scrape of every worker's endpoint, summed."""
    total = Scrape()
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            total = total.plus(parse(resp.read().decode()))
    return total
