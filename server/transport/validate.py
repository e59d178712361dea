"""Edge validation: protobuf request -> frozen domain query, or InvalidRequest naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from endcap.v1 import recommender_pb2 as pb
from server.domain.query import Context, Filters, RecommendQuery, RerankQuery, SimilarQuery

MAX_RESULTS = 500
DEFAULT_RESULTS = 10
MAX_CANDIDATES = 500
MAX_SEEDS = 50
MAX_LIST = 100  # categories, brands per filter
MAX_EXCLUDED_ITEMS = 1000
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 256

_COUNTRY = re.compile(r"[A-Z]{2}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_DEVICES = frozenset(pb.RequestContext.Device.values())
_PLACEMENTS = frozenset(pb.RequestContext.Placement.values())


class InvalidRequest(ValueError):
    """A client mistake in one field; maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _text(field: str, value: str, limit: int = MAX_TEXT_CHARS) -> str:
    if len(value) > limit:
        raise InvalidRequest(field, f"must be at most {limit} characters, got {len(value)}")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidRequest(field, "must not contain control characters")
    return value


def _ids(
    field: str, values: Sequence[str], limit: int, *, unique: bool, chars: int = MAX_ID_CHARS
) -> tuple[str, ...]:
    """Non-empty, bounded strings; duplicates rejected if `unique`, else dropped."""
    if len(values) > limit:
        raise InvalidRequest(field, f"must have at most {limit} entries, got {len(values)}")
    seen: set[str] = set()
    for i, value in enumerate(values):
        if not value:
            raise InvalidRequest(f"{field}[{i}]", "must not be empty")
        _text(f"{field}[{i}]", value, chars)
        if unique and value in seen:
            raise InvalidRequest(f"{field}[{i}]", f"duplicate id {value!r}")
        seen.add(value)
    return tuple(dict.fromkeys(values))


def _num_results(field: str, value: int, default: int) -> int:
    if value == 0:
        return default
    if not 1 <= value <= MAX_RESULTS:
        raise InvalidRequest(field, f"must be in [1, {MAX_RESULTS}], got {value}")
    return value


def context(msg: pb.RequestContext) -> Context:
    if msg.device not in _DEVICES:
        raise InvalidRequest("context.device", f"unknown value {msg.device}")
    if msg.placement not in _PLACEMENTS:
        raise InvalidRequest("context.placement", f"unknown value {msg.placement}")
    country = msg.country.upper()
    if country and not _COUNTRY.fullmatch(country):
        raise InvalidRequest(
            "context.country", f"must be an ISO 3166-1 alpha-2 code like 'DE', got {msg.country!r}"
        )
    currency = msg.currency.upper()
    if currency and not _CURRENCY.fullmatch(currency):
        raise InvalidRequest(
            "context.currency", f"must be an ISO 4217 code like 'EUR', got {msg.currency!r}"
        )
    return Context(
        user_id=_text("context.user_id", msg.user_id, MAX_ID_CHARS),
        session_id=_text("context.session_id", msg.session_id, MAX_ID_CHARS),
        device=msg.device,
        os=_text("context.os", msg.os),
        country=country,
        region=_text("context.region", msg.region),
        city=_text("context.city", msg.city),
        language=_text("context.language", msg.language),
        currency=currency,
        traffic_source=_text("context.traffic_source", msg.traffic_source),
        placement=msg.placement,
    )


def _price(field: str, msg: pb.Filters) -> float | None:
    if not msg.HasField(field):
        return None
    value: float = getattr(msg, field)
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"filters.{field}", f"must be a finite number >= 0, got {value}")
    return value


def filters(msg: pb.Filters) -> Filters:
    lo, hi = _price("min_price", msg), _price("max_price", msg)
    if lo is not None and hi is not None and lo > hi:
        raise InvalidRequest("filters.min_price", f"must be <= max_price ({hi}), got {lo}")
    return Filters(
        min_price=lo,
        max_price=hi,
        include_categories=_ids(
            "filters.include_categories",
            msg.include_categories,
            MAX_LIST,
            unique=False,
            chars=MAX_TEXT_CHARS,
        ),
        exclude_categories=_ids(
            "filters.exclude_categories",
            msg.exclude_categories,
            MAX_LIST,
            unique=False,
            chars=MAX_TEXT_CHARS,
        ),
        brands=_ids("filters.brands", msg.brands, MAX_LIST, unique=False, chars=MAX_TEXT_CHARS),
        in_stock_only=msg.in_stock_only if msg.HasField("in_stock_only") else True,
        exclude_item_ids=_ids(
            "filters.exclude_item_ids", msg.exclude_item_ids, MAX_EXCLUDED_ITEMS, unique=False
        ),
    )


def recommend(msg: pb.RecommendRequest) -> RecommendQuery:
    return RecommendQuery(
        context=context(msg.context),
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, DEFAULT_RESULTS),
    )


def rerank(msg: pb.RerankRequest) -> RerankQuery:
    if not msg.candidate_item_ids:
        raise InvalidRequest("candidate_item_ids", f"must have 1 to {MAX_CANDIDATES} ids, got 0")
    return RerankQuery(
        candidates=_ids("candidate_item_ids", msg.candidate_item_ids, MAX_CANDIDATES, unique=True),
        context=context(msg.context),
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, 0),
    )


def similar(msg: pb.SimilarItemsRequest) -> SimilarQuery:
    if not msg.seed_item_ids:
        raise InvalidRequest("seed_item_ids", f"must have 1 to {MAX_SEEDS} ids, got 0")
    return SimilarQuery(
        seeds=_ids("seed_item_ids", msg.seed_item_ids, MAX_SEEDS, unique=False),
        context=context(msg.context),
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, DEFAULT_RESULTS),
    )
