"""Validated, frozen requests: what transport/validate.py hands the engine."""

from __future__ import annotations

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
class RecommendQuery:
    context: Context = field(default_factory=Context)
    filters: Filters = field(default_factory=Filters)
    k: int = 10


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
