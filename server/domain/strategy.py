"""Placement strategies as data: which retrievers, how they blend, which constraints apply.

The defaults live in strategies.toml next to this module; a shop's file
overrides them key by key. Nothing here runs a search: the engine reads a
Strategy and executes it.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

RETRIEVERS = ("personal", "content_similar", "also_bought", "segment_bestsellers", "trending")
SEED_SOURCES = ("request", "cart", "purchased", "recent")
SHOPPER_SEGMENTS = ("new_visitor", "returning_visitor", "customer", "vip")
DEVICE_NAMES = ("unspecified", "mobile", "tablet", "desktop")
# RequestContext.Placement names, by enum value.
PLACEMENTS = (
    "PLACEMENT_UNSPECIFIED", "HOME", "CATEGORY", "PRODUCT", "CART", "CHECKOUT", "EMAIL",
    "SEARCH", "POST_PURCHASE",
)  # fmt: skip
BOOST_ATTRIBUTES = ("brand", "category", "tag")
# A traffic source as strategies name it and requests are matched: lower case
# letters, digits, "_" and "-" (requests are lower-cased and trimmed first).
_SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SEGMENT_KEYS = ("vip_min_orders", "vip_min_monetary", "vip_max_recency_days")
# Learned VIP rule: the top fifth of customers by orders or by money spent, among
# the more recent half by last purchase; learned only from this many customers up.
_VIP_QUANTILE = 0.8
_RECENT_QUANTILE = 0.5
_MIN_CUSTOMERS_TO_LEARN = 50


class StrategyConfigError(ValueError):
    """The strategies file is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class Boost:
    attribute: str  # brand | category
    value: str
    factor: float  # >1 boost, <1 bury, 0 hide


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    retrievers: Mapping[str, float]
    device_weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    segment_weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source_weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    seeds: str = "request"
    same_category: bool = False
    price_ratio: tuple[float, float] | None = None
    complementary: bool = False
    exclude_cart: bool = False
    exclude_purchased: bool = False
    max_per_category: int = 0
    max_per_brand: int = 0
    diversity: float = 0.0
    exposure_cap: int = 0  # demote items shown this many times without engagement; 0 = off

    def weights(self, device: int, segment: str, source: str = "") -> dict[str, float]:
        """Retriever weights for this device, shopper segment and traffic source."""
        out = dict(self.retrievers)
        for mult in (
            self.device_weights.get(DEVICE_NAMES[device], {}),
            self.segment_weights.get(segment, {}),
            self.source_weights.get(source, {}),
        ):
            for name, factor in mult.items():
                if name in out:
                    out[name] *= factor
        return {k: v for k, v in out.items() if v > 0}


def traffic_source(raw: str) -> str:
    """A request's traffic source as strategies key it: trimmed, lower case."""
    return raw.strip().lower()


@dataclass(frozen=True, slots=True)
class SegmentRules:
    """The VIP rule: (orders >= vip_min_orders or money spent >= vip_min_monetary)
    and last purchase within vip_max_recency_days. `origin` says where each value
    came from: "default", "learned" (from the artifact's shoppers) or "configured"."""

    vip_min_orders: int = 3
    vip_min_monetary: float = 300.0
    vip_max_recency_days: float = 120.0
    origin: Mapping[str, str] = field(
        default_factory=lambda: dict.fromkeys(SEGMENT_KEYS, "default")
    )

    def classify(
        self, *, known: bool, has_history: bool, orders: int, monetary: float, recency_days: float
    ) -> str:
        """new_visitor, returning_visitor, customer or vip (RFM thresholds)."""
        if orders > 0:
            frequent_or_big = orders >= self.vip_min_orders or monetary >= self.vip_min_monetary
            if frequent_or_big and recency_days <= self.vip_max_recency_days:
                return "vip"
            return "customer"
        return "returning_visitor" if known or has_history else "new_visitor"


def learn_segment_rules(
    orders: npt.NDArray[Any], monetary: npt.NDArray[Any], last_purchase_s: npt.NDArray[Any]
) -> SegmentRules | None:
    """VIP thresholds from trained shoppers' purchases (RFM): the top fifth of customers
    by orders or by money, among the more recent half (recency counted from the last
    purchase in the data). None with fewer than 50 customers to learn from."""
    bought = np.asarray(orders) > 0
    if int(bought.sum()) < _MIN_CUSTOMERS_TO_LEARN:
        return None
    n = np.asarray(orders)[bought]
    spent = np.asarray(monetary, dtype=np.float64)[bought]
    last = np.asarray(last_purchase_s, dtype=np.float64)[bought]
    recency_days = (last.max() - last) / 86_400.0
    return SegmentRules(
        vip_min_orders=max(2, math.ceil(float(np.quantile(n, _VIP_QUANTILE)))),
        vip_min_monetary=round(float(np.quantile(spent, _VIP_QUANTILE)), 2),
        vip_max_recency_days=max(1.0, round(float(np.quantile(recency_days, _RECENT_QUANTILE)), 1)),
        origin=dict.fromkeys(SEGMENT_KEYS, "learned"),
    )


@dataclass(frozen=True, slots=True)
class Strategies:
    strategies: Mapping[str, Strategy]
    placements: Mapping[str, str]
    segments: Mapping[str, float] = field(default_factory=dict)  # configured SEGMENT_KEYS
    boosts: tuple[Boost, ...] = ()
    blocked_item_ids: tuple[str, ...] = ()
    # Traffic sources some strategy weighs (derived).
    named_sources: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = frozenset(src for s in self.strategies.values() for src in s.source_weights)
        object.__setattr__(self, "named_sources", named)

    def source_label(self, source: str) -> str:
        """A traffic source as a metric label: sources a strategy names, else "other"
        ("none" when unset), so shops' free-form sources cannot grow the label set."""
        if not source:
            return "none"
        return source if source in self.named_sources else "other"

    def segment_rules(self, learned: SegmentRules | None = None) -> SegmentRules:
        """The VIP rule: each threshold as configured, else learned, else the default."""
        base = learned or SegmentRules()
        values: dict[str, Any] = {k: getattr(base, k) for k in SEGMENT_KEYS}
        origin = dict(base.origin)
        for key, value in self.segments.items():
            values[key] = value
            origin[key] = "configured"
        return SegmentRules(
            vip_min_orders=int(values["vip_min_orders"]),
            vip_min_monetary=float(values["vip_min_monetary"]),
            vip_max_recency_days=float(values["vip_max_recency_days"]),
            origin=origin,
        )

    def for_request(self, placement: int, name: str) -> Strategy:
        """The named strategy, else the placement's default. Raises KeyError naming it."""
        if name:
            if name not in self.strategies:
                raise KeyError(name)
            return self.strategies[name]
        return self.strategies[self.placements.get(PLACEMENTS[placement], "default")]


def _weights(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise StrategyConfigError(f"{where}: must be a table of retriever = weight")
    out = {}
    for name, weight in raw.items():
        if name not in RETRIEVERS:
            raise StrategyConfigError(
                f"{where}: unknown retriever {name!r} (known: {', '.join(RETRIEVERS)})"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise StrategyConfigError(
                f"{where}.{name}: weight must be a number >= 0, got {weight!r}"
            )
        out[name] = float(weight)
    return out


def _nested(
    raw: Any, where: str, keys: tuple[str, ...] | re.Pattern[str]
) -> dict[str, dict[str, float]]:
    """{key: retriever weights} where keys are a known set, or names matching a pattern."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise StrategyConfigError(f"{where}: must be a table")
    out = {}
    for key, value in raw.items():
        if isinstance(keys, re.Pattern):
            if not keys.fullmatch(key):
                raise StrategyConfigError(
                    f"{where}: {key!r} must be lower case letters, digits, _ or -"
                )
        elif key not in keys:
            raise StrategyConfigError(f"{where}: unknown key {key!r} (known: {', '.join(keys)})")
        out[key] = _weights(value, f"{where}.{key}")
    return out


def _strategy(name: str, raw: Mapping[str, Any]) -> Strategy:
    where = f"strategy.{name}"
    known = {
        "retrievers", "device_weights", "segment_weights", "source_weights", "seeds",
        "same_category",
        "price_ratio", "complementary", "exclude_cart", "exclude_purchased",
        "max_per_category", "max_per_brand", "diversity", "exposure_cap",
    }  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise StrategyConfigError(f"{where}: unknown keys {sorted(unknown)}")
    seeds = raw.get("seeds", "request")
    if seeds not in SEED_SOURCES:
        raise StrategyConfigError(f"{where}.seeds: must be one of {SEED_SOURCES}, got {seeds!r}")
    ratio = raw.get("price_ratio")
    if ratio is not None:
        if not (isinstance(ratio, list) and len(ratio) == 2 and 0 <= ratio[0] <= ratio[1]):
            raise StrategyConfigError(f"{where}.price_ratio: must be [lo, hi] with 0 <= lo <= hi")
        ratio = (float(ratio[0]), float(ratio[1]))
    diversity = float(raw.get("diversity", 0.0))
    if not 0.0 <= diversity <= 1.0:
        raise StrategyConfigError(f"{where}.diversity: must be in [0, 1], got {diversity}")
    exposure_cap = raw.get("exposure_cap", 0)
    if isinstance(exposure_cap, bool) or not isinstance(exposure_cap, int) or exposure_cap < 0:
        raise StrategyConfigError(
            f"{where}.exposure_cap: must be an integer >= 0, got {exposure_cap!r}"
        )
    retrievers = _weights(raw.get("retrievers", {}), f"{where}.retrievers")
    if not retrievers:
        raise StrategyConfigError(f"{where}.retrievers: at least one retriever is required")
    return Strategy(
        name=name,
        retrievers=retrievers,
        device_weights=_nested(raw.get("device_weights"), f"{where}.device_weights", DEVICE_NAMES),
        segment_weights=_nested(
            raw.get("segment_weights"), f"{where}.segment_weights", SHOPPER_SEGMENTS
        ),
        source_weights=_nested(raw.get("source_weights"), f"{where}.source_weights", _SOURCE_NAME),
        seeds=seeds,
        same_category=bool(raw.get("same_category", False)),
        price_ratio=ratio,
        complementary=bool(raw.get("complementary", False)),
        exclude_cart=bool(raw.get("exclude_cart", False)),
        exclude_purchased=bool(raw.get("exclude_purchased", False)),
        max_per_category=int(raw.get("max_per_category", 0)),
        max_per_brand=int(raw.get("max_per_brand", 0)),
        diversity=diversity,
        exposure_cap=exposure_cap,
    )


def parse(raw: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> Strategies:
    """Build Strategies from a parsed file, each key overriding `base` (the defaults)."""
    merged: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in (base or {}).items()
    }
    for key, value in raw.items():
        if key == "strategy" and isinstance(value, Mapping):
            merged.setdefault("strategy", {})
            for name, body in value.items():
                merged["strategy"][name] = {**merged["strategy"].get(name, {}), **body}
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    strategies = {name: _strategy(name, body) for name, body in merged.get("strategy", {}).items()}
    if "default" not in strategies:
        raise StrategyConfigError("strategy.default: a default strategy is required")
    placements = dict(merged.get("placements", {}))
    for placement, name in placements.items():
        if placement not in PLACEMENTS:
            raise StrategyConfigError(f"placements.{placement}: unknown placement")
        if name not in strategies:
            raise StrategyConfigError(f"placements.{placement}: unknown strategy {name!r}")
    segments = _segments(merged.get("segments", {}))
    rules = merged.get("rules", {})
    boosts = []
    for i, b in enumerate(rules.get("boost", [])):
        if b.get("attribute") not in BOOST_ATTRIBUTES:
            raise StrategyConfigError(
                f"rules.boost[{i}].attribute: must be one of {', '.join(BOOST_ATTRIBUTES)}"
            )
        factor = float(b.get("factor", 1.0))
        if not 0 <= factor <= 100:
            raise StrategyConfigError(f"rules.boost[{i}].factor: must be in [0, 100]")
        boosts.append(Boost(str(b["attribute"]), str(b.get("value", "")), factor))
    return Strategies(
        strategies=strategies,
        placements=placements,
        segments=segments,
        boosts=tuple(boosts),
        blocked_item_ids=tuple(str(i) for i in rules.get("blocked_item_ids", [])),
    )


def _segments(raw: Any) -> dict[str, float]:
    """The VIP thresholds a file sets (the rest are learned or default)."""
    if not isinstance(raw, Mapping):
        raise StrategyConfigError("segments: must be a table")
    out = {}
    for key, value in raw.items():
        if key not in SEGMENT_KEYS:
            known = ", ".join(SEGMENT_KEYS)
            raise StrategyConfigError(f"segments: unknown key {key!r} (known: {known})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise StrategyConfigError(f"segments.{key}: must be a number >= 0, got {value!r}")
        if key == "vip_min_orders" and value != int(value):
            raise StrategyConfigError(f"segments.{key}: must be a whole number, got {value!r}")
        out[key] = float(value)
    return out


def defaults_raw() -> dict[str, Any]:
    text = resources.files("server.domain").joinpath("strategies.toml").read_text()
    return tomllib.loads(text)


def load(path: Path | None = None) -> Strategies:
    """The defaults, overridden by a shop's TOML file if given."""
    base = defaults_raw()
    if path is None:
        return parse(base)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StrategyConfigError(f"{path}: {exc}") from exc
    return parse(raw, base)
