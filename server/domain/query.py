"""Validated, frozen requests: what transport/validate.py hands the engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Device and placement codes follow RequestContext in the proto.
DEVICES = ("unspecified", "mobile", "tablet", "desktop")


@dataclass(frozen=True, slots=True)
class Context:
    user_id: str = ""
    session_id: str = ""
    device: int = 0
    os: str = ""
    country: str = ""  # ISO 3166-1 alpha-2, upper case, or ""
    region: str = ""
    city: str = ""
    language: str = ""
    currency: str = ""  # ISO 4217, upper case, or "" for the base currency
    traffic_source: str = ""
    placement: int = 0


@dataclass(frozen=True, slots=True)
class Filters:
    min_price: float | None = None  # request currency
    max_price: float | None = None
    include_categories: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    in_stock_only: bool = True
    exclude_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pin:
    item_id: str
    position: int  # 1-based


@dataclass(frozen=True, slots=True)
class Merchandising:
    """Per-request business rules (the shop's own come from the strategies file)."""

    boosts: tuple[tuple[str, str, float], ...] = ()  # (attribute, value, factor)
    pins: tuple[Pin, ...] = ()
    blocked_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DiversitySpec:
    max_per_category: int = 0
    max_per_brand: int = 0
    level: float = 0.0  # MMR trade-off in [0, 1]
    exposure_cap: int = 0  # demote items shown this often without engagement; 0 = strategy's


@dataclass(frozen=True, slots=True)
class RecommendQuery:
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 10
    seeds: tuple[str, ...] = ()
    strategy: str = ""
    rules: Merchandising = field(default_factory=Merchandising)
    diversity: DiversitySpec = field(default_factory=DiversitySpec)


@dataclass(frozen=True, slots=True)
class RerankQuery:
    candidates: tuple[str, ...]
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 0  # 0 = every candidate that passes


@dataclass(frozen=True, slots=True)
class SimilarQuery:
    seeds: tuple[str, ...]
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 10


@dataclass(frozen=True, slots=True)
class PopularQuery:
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 10
    trending: bool = False


@dataclass(frozen=True, slots=True)
class RecentQuery:
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 10


@dataclass(frozen=True, slots=True)
class TrackedEvent:
    """One validated event, before it is resolved against the catalog."""

    kind: int  # Event.Type value
    context: Context
    item_id: str
    ts_s: float
    price: float = 0.0  # per unit, in context.currency
    quantity: int = 1
    query: str = ""
    recommendation_id: str = ""


@dataclass(frozen=True, slots=True)
class StateEvent:
    """What the real-time state keeps of one accepted event."""

    key: str  # shopper key, see shopper_key()
    kind: int
    item_id: str
    ts_s: float
    value: float = 0.0  # purchase amount in base currency
    segments: tuple[str, ...] = ()  # popularity segment keys this event counts in


@dataclass(frozen=True, slots=True)
class Profile:
    """A shopper's real-time state. Lists are newest first."""

    recent: tuple[tuple[str, float], ...] = ()  # (item_id, ts_s) of views/carts/purchases
    cart: tuple[str, ...] = ()
    purchased: tuple[str, ...] = ()
    orders: int = 0
    monetary: float = 0.0  # base currency
    first_seen_s: float = 0.0
    last_purchase_s: float = 0.0
    forgotten: bool = False  # the shopper asked to be forgotten: ignore trained profile
    # (item_id, impressions) of items shown since the shopper last engaged with them;
    # impressions fade (a week-old one counts about 1/e), so counts are fractional.
    exposures: tuple[tuple[str, float], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.recent or self.cart or self.purchased)


def shopper_key(user_id: str, session_id: str) -> str:
    """ "u:<user_id>" for a logged-in shopper, else "s:<session_id>", "" if neither."""
    if user_id:
        return f"u:{user_id}"
    return f"s:{session_id}" if session_id else ""


def key_hash(key: str) -> bytes:
    """SHA-256 of a shopper key: what tombstones and forgotten-sets keep instead of ids."""
    return hashlib.sha256(key.encode()).digest()


def segment_key(country: str, device: int | str, category: str = "*") -> str:
    """Popularity segment: country (or *), device code (or *), category (or *)."""
    return f"{country or '*'}|{device}|{category}"
