"""Edge validation: protobuf request -> frozen domain query, or InvalidRequest naming the field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from endcap.v1 import recommender_pb2 as pb
from server.domain.catalog import ItemUpdate
from server.domain.query import (
    Context,
    DiversitySpec,
    Filters,
    Merchandising,
    Pin,
    PopularQuery,
    RecentQuery,
    RecommendQuery,
    RerankQuery,
    SimilarQuery,
    TrackedEvent,
)
from server.domain.strategy import BOOST_ATTRIBUTES

MAX_RESULTS = 500
DEFAULT_RESULTS = 10
MAX_CANDIDATES = 500
MAX_SEEDS = 50
MAX_LIST = 100  # categories, brands per filter
MAX_EXCLUDED_ITEMS = 1000
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 256

_COUNTRY = re.compile(r"[A-Z]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))
_CURRENCY = re.compile(r"[A-Z]{3}")
_DEVICES = frozenset(pb.RequestContext.Device.values())
_PLACEMENTS = frozenset(pb.RequestContext.Placement.values())


def _has_control(value: str) -> bool:
    """Whether `value` holds a control character. ASCII text (nearly every id) is
    checked by deleting the printable bytes, ~10x faster than the regex's scan."""
    if value.isascii():
        return bool(value.encode("ascii").translate(None, _PRINTABLE_ASCII))
    return _CONTROL.search(value) is not None


class InvalidRequest(ValueError):
    """A client mistake in one field; maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _text(field: str, value: str, limit: int = MAX_TEXT_CHARS) -> str:
    if len(value) > limit:
        raise InvalidRequest(field, f"must be at most {limit} characters, got {len(value)}")
    if _has_control(value):
        raise InvalidRequest(field, "must not contain control characters")
    return value


def _show(value: str, limit: int = 40) -> str:
    """A client value quoted for an error message, cut short: status messages travel in
    trailers, and a megabyte of echoed input would break them."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"


def _ids(
    field: str, values: Sequence[str], limit: int, *, unique: bool, chars: int = MAX_ID_CHARS
) -> tuple[str, ...]:
    """Non-empty, bounded strings; duplicates rejected if `unique`, else dropped."""
    if len(values) > limit:
        raise InvalidRequest(field, f"must have at most {limit} entries, got {len(values)}")
    if not values:
        return ()
    # Whole-list checks in C first (500 ids one character at a time cost ~1 ms); the
    # loop below runs only to name the first offending entry.
    listed = list(values)  # a protobuf repeated field makes new str objects per pass
    unique_values = tuple(dict.fromkeys(listed))  # hashes each id (cached for the lookup)
    if (
        "" not in unique_values
        and max(map(len, unique_values)) <= chars
        and not _has_control("".join(unique_values))
        and (not unique or len(unique_values) == len(listed))
    ):
        return unique_values
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
    # isascii(): "ß".upper() is "SS", a valid-looking code.
    country = msg.country.upper()
    if country and not (msg.country.isascii() and _COUNTRY.fullmatch(country)):
        raise InvalidRequest(
            "context.country",
            f"must be an ISO 3166-1 alpha-2 code like 'DE', got {_show(msg.country)}",
        )
    currency = msg.currency.upper()
    if currency and not (msg.currency.isascii() and _CURRENCY.fullmatch(currency)):
        raise InvalidRequest(
            "context.currency", f"must be an ISO 4217 code like 'EUR', got {_show(msg.currency)}"
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


def _price(field: Literal["min_price", "max_price"], msg: pb.Filters) -> float | None:
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


def _rules(msg: pb.Rules) -> Merchandising:
    if len(msg.boosts) > MAX_LIST:
        raise InvalidRequest(
            "rules.boosts", f"must have at most {MAX_LIST} entries, got {len(msg.boosts)}"
        )
    boosts = []
    for i, b in enumerate(msg.boosts):
        if b.attribute not in BOOST_ATTRIBUTES:
            raise InvalidRequest(
                f"rules.boosts[{i}].attribute",
                f"must be one of {', '.join(BOOST_ATTRIBUTES)}, got {_show(b.attribute)}",
            )
        if not math.isfinite(b.factor) or not 0 <= b.factor <= 100:
            raise InvalidRequest(
                f"rules.boosts[{i}].factor", f"must be in [0, 100], got {b.factor}"
            )
        boosts.append((b.attribute, _text(f"rules.boosts[{i}].value", b.value), b.factor))
    if len(msg.pins) > MAX_RESULTS:
        raise InvalidRequest(
            "rules.pins", f"must have at most {MAX_RESULTS} entries, got {len(msg.pins)}"
        )
    pins = []
    for i, p in enumerate(msg.pins):
        if not p.item_id:
            raise InvalidRequest(f"rules.pins[{i}].item_id", "must not be empty")
        _text(f"rules.pins[{i}].item_id", p.item_id, MAX_ID_CHARS)
        if not 1 <= p.position <= MAX_RESULTS:
            raise InvalidRequest(
                f"rules.pins[{i}].position", f"must be in [1, {MAX_RESULTS}], got {p.position}"
            )
        pins.append(Pin(p.item_id, p.position))
    return Merchandising(
        boosts=tuple(boosts),
        pins=tuple(pins),
        blocked_item_ids=_ids(
            "rules.blocked_item_ids", msg.blocked_item_ids, MAX_EXCLUDED_ITEMS, unique=False
        ),
    )


def _diversity(msg: pb.Diversity) -> DiversitySpec:
    for name in ("max_per_category", "max_per_brand"):
        value = getattr(msg, name)
        if not 0 <= value <= MAX_RESULTS:
            raise InvalidRequest(f"diversity.{name}", f"must be in [0, {MAX_RESULTS}], got {value}")
    if not math.isfinite(msg.level) or not 0 <= msg.level <= 1:
        raise InvalidRequest("diversity.level", f"must be in [0, 1], got {msg.level}")
    if not 0 <= msg.exposure_cap <= MAX_EXPOSURE_CAP:
        raise InvalidRequest(
            "diversity.exposure_cap", f"must be in [0, {MAX_EXPOSURE_CAP}], got {msg.exposure_cap}"
        )
    return DiversitySpec(msg.max_per_category, msg.max_per_brand, msg.level, msg.exposure_cap)


MAX_EXPOSURE_CAP = 1000


def recommend(msg: pb.RecommendRequest) -> RecommendQuery:
    strategy = _text("strategy", msg.strategy, 64)
    return RecommendQuery(
        context=context(msg.context),
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, DEFAULT_RESULTS),
        seeds=_ids("seed_item_ids", msg.seed_item_ids, MAX_SEEDS, unique=False),
        strategy=strategy,
        rules=_rules(msg.rules),
        diversity=_diversity(msg.diversity),
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


MAX_EVENTS = 1000
MAX_UPSERT = 10_000
MAX_COUNTRIES = 300  # per catalog item; ISO 3166-1 has 249 codes
MAX_ITEM_TAGS = 16
MAX_TAG_CHARS = 64
MAX_FUTURE_S = 300.0
_EVENT_TYPES = frozenset(pb.Event.Type.values()) - {pb.Event.TYPE_UNSPECIFIED}
_NEEDS_ITEM = {
    pb.Event.VIEW,
    pb.Event.ADD_TO_CART,
    pb.Event.REMOVE_FROM_CART,
    pb.Event.PURCHASE,
    pb.Event.RECOMMENDATION_CLICK,
}
_NEEDS_REC_ID = {pb.Event.RECOMMENDATION_IMPRESSION, pb.Event.RECOMMENDATION_CLICK}


def popular(msg: pb.PopularRequest) -> PopularQuery:
    if msg.kind not in pb.PopularRequest.Kind.values():
        raise InvalidRequest("kind", f"unknown value {msg.kind}")
    return PopularQuery(
        context=context(msg.context),
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, DEFAULT_RESULTS),
        trending=msg.kind == pb.PopularRequest.TRENDING,
    )


def recently_viewed(msg: pb.RecentlyViewedRequest) -> RecentQuery:
    ctx = context(msg.context)
    if not ctx.user_id and not ctx.session_id:
        raise InvalidRequest("context.user_id", "user_id or session_id is required")
    return RecentQuery(
        context=ctx,
        filters=filters(msg.filters),
        k=_num_results("num_results", msg.num_results, DEFAULT_RESULTS),
    )


def event(msg: pb.Event, prefix: str, now_s: float) -> TrackedEvent:
    """One event of a batch; field names in errors carry `prefix` (e.g. "events[3]")."""
    if msg.type not in _EVENT_TYPES:
        raise InvalidRequest(f"{prefix}.type", f"must be a known event type, got {msg.type}")
    _text(f"{prefix}.event_id", msg.event_id, MAX_ID_CHARS)  # echoed in rejections, logged
    try:
        ctx = context(msg.context)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{prefix}.{exc.field}", exc.reason) from None
    if not ctx.user_id and not ctx.session_id:
        raise InvalidRequest(f"{prefix}.context.user_id", "user_id or session_id is required")
    item_id = _text(f"{prefix}.item_id", msg.item_id, MAX_ID_CHARS)
    if msg.type in _NEEDS_ITEM and not item_id:
        raise InvalidRequest(f"{prefix}.item_id", "is required for this event type")
    if msg.type in _NEEDS_REC_ID and not msg.recommendation_id:
        raise InvalidRequest(f"{prefix}.recommendation_id", "is required for this event type")
    ts = now_s
    if msg.HasField("timestamp"):
        ts = msg.timestamp.seconds + msg.timestamp.nanos / 1e9
        if ts <= 0 or ts > now_s + MAX_FUTURE_S:
            raise InvalidRequest(
                f"{prefix}.timestamp", "must be after 1970 and at most 5 minutes in the future"
            )
    if not math.isfinite(msg.price) or msg.price < 0:
        raise InvalidRequest(f"{prefix}.price", f"must be a finite number >= 0, got {msg.price}")
    if msg.quantity < 0 or msg.quantity > 10_000:
        raise InvalidRequest(f"{prefix}.quantity", f"must be in [0, 10000], got {msg.quantity}")
    return TrackedEvent(
        kind=msg.type,
        context=ctx,
        item_id=item_id,
        ts_s=ts,
        price=msg.price,
        quantity=msg.quantity or 1,
        query=_text(f"{prefix}.query", msg.query),
        recommendation_id=_text(f"{prefix}.recommendation_id", msg.recommendation_id, MAX_ID_CHARS),
    )


def events(
    msgs: Sequence[pb.Event], now_s: float, offset: int = 0
) -> tuple[list[tuple[int, TrackedEvent]], list[tuple[int, InvalidRequest]]]:
    """Validate each event on its own: (index, event) accepted, (index, error) rejected."""
    if not msgs:
        raise InvalidRequest("events", f"must have 1 to {MAX_EVENTS} events, got 0")
    if len(msgs) > MAX_EVENTS:
        raise InvalidRequest("events", f"must have at most {MAX_EVENTS} events, got {len(msgs)}")
    good: list[tuple[int, TrackedEvent]] = []
    bad: list[tuple[int, InvalidRequest]] = []
    for i, msg in enumerate(msgs):
        try:
            good.append((offset + i, event(msg, f"events[{offset + i}]", now_s)))
        except InvalidRequest as exc:
            bad.append((offset + i, exc))
    return good, bad


def check_upsert_count(msg: pb.UpsertItemsRequest) -> None:
    if not 1 <= len(msg.items) <= MAX_UPSERT:
        raise InvalidRequest("items", f"must have 1 to {MAX_UPSERT} items, got {len(msg.items)}")


def upsert_item(item: pb.CatalogItem, i: int, seen: set[str]) -> ItemUpdate:
    """items[i] of an UpsertItemsRequest; `seen` collects the batch's ids (duplicates are
    refused). A batch can be validated in slices this way, between event-loop turns."""
    field = f"items[{i}]"
    if not item.item_id:
        raise InvalidRequest(f"{field}.item_id", "must not be empty")
    _text(f"{field}.item_id", item.item_id, MAX_ID_CHARS)
    if item.item_id in seen:
        raise InvalidRequest(f"{field}.item_id", f"duplicate id {item.item_id!r}")
    seen.add(item.item_id)
    if item.HasField("price") and (not math.isfinite(item.price) or item.price <= 0):
        raise InvalidRequest(f"{field}.price", f"must be a finite number > 0, got {item.price}")
    currency = item.currency.upper()
    if currency and not (item.currency.isascii() and _CURRENCY.fullmatch(currency)):
        raise InvalidRequest(
            f"{field}.currency", f"must be an ISO 4217 code, got {_show(item.currency)}"
        )
    if len(item.countries) > MAX_COUNTRIES:
        raise InvalidRequest(
            f"{field}.countries",
            f"must have at most {MAX_COUNTRIES} entries, got {len(item.countries)}",
        )
    countries = tuple(c.upper() for c in item.countries)
    for j, c in enumerate(countries):
        if not (c.isascii() and _COUNTRY.fullmatch(c)):
            raise InvalidRequest(
                f"{field}.countries[{j}]",
                f"must be ISO 3166-1 alpha-2, got {_show(item.countries[j])}",
            )
    return ItemUpdate(
        item_id=item.item_id,
        category=_text(f"{field}.category", item.category),
        brand=_text(f"{field}.brand", item.brand),
        price=item.price if item.HasField("price") else None,
        currency=currency,
        countries=countries,
        in_stock=item.in_stock if item.HasField("in_stock") else None,
        tags=(
            _ids(
                f"{field}.tags.values",
                item.tags.values,
                MAX_ITEM_TAGS,
                unique=False,
                chars=MAX_TAG_CHARS,
            )
            if item.HasField("tags")
            else None
        ),
    )


def delete_items(msg: pb.DeleteItemsRequest) -> tuple[str, ...]:
    if not msg.item_ids:
        raise InvalidRequest("item_ids", f"must have 1 to {MAX_UPSERT} ids, got 0")
    return _ids("item_ids", msg.item_ids, MAX_UPSERT, unique=False)


def forget_user(msg: pb.ForgetUserRequest) -> tuple[str, str]:
    user_id = _text("user_id", msg.user_id, MAX_ID_CHARS)
    session_id = _text("session_id", msg.session_id, MAX_ID_CHARS)
    if not user_id and not session_id:
        raise InvalidRequest("user_id", "user_id or session_id is required")
    return user_id, session_id


def reload_model(msg: pb.ReloadModelRequest) -> str:
    version = _text("version", msg.version, MAX_ID_CHARS)
    # A plain directory name: no path separators, no "..", nothing the filesystem refuses.
    if version and (version.startswith(".") or not _VERSION.fullmatch(version)):
        raise InvalidRequest(
            "version", f"must be a version directory name [A-Za-z0-9._-], got {_show(version)}"
        )
    return version


_VERSION = re.compile(r"[A-Za-z0-9._-]+")
