"""Python client for the endcap gRPC API: blocking `Client` and asyncio `AsyncClient`.

Three lines::

    from endcap.client import Client

    with Client("localhost:50051") as client:
        recs = client.recommend(user_id="u1", country="DE", num_results=10)
    for item in recs.items:
        print(item.item_id, item.price, item.currency)

The shopper's context is keyword arguments (`user_id`, `session_id`, `device`,
`os`, `country`, `region`, `city`, `language`, `currency`, `traffic_source`,
`placement`; see `Context`), hard constraints are a `Filters`, and results are
frozen dataclasses. Failures raise `EndcapError` subclasses (`InvalidArgument`
names the field, `NotFound`, `Unavailable`, ...).

Each client owns one channel. Build it once per process and share it: a
channel multiplexes concurrent calls over HTTP/2 and reconnects on its own.
The channel is configured for a service that runs several replicas:

- a deadline on every call (`timeout_s`, default 1 s);
- a gRPC service config that retries `UNAVAILABLE` (a replica restarting or
  draining), see `service_config`;
- `round_robin` load balancing for `dns:///` targets, so calls spread over every
  address a headless Kubernetes Service returns (deploy/README.md);
- keepalive pings while calls are in flight, so a dead connection is noticed
  in seconds rather than at the next TCP timeout.

Every call also takes `timeout_s` (the deadline for that call) and `metadata`.
`api_key` adds `authorization: Bearer <key>` (or `x-api-key: <key>`) metadata
to every call; `credentials` (e.g. `grpc.ssl_channel_credentials()`) makes the
channel TLS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, TypedDict, Unpack, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SERVICE_NAME",
    "AsyncClient",
    "Boost",
    "Client",
    "Context",
    "DeadlineExceeded",
    "Diversity",
    "EndcapError",
    "Event",
    "EventRejection",
    "FieldViolation",
    "Filters",
    "HealthStatus",
    "InvalidArgument",
    "Item",
    "NotFound",
    "PermissionDenied",
    "Pin",
    "Recommendations",
    "Reranked",
    "ResourceExhausted",
    "Rules",
    "Tracked",
    "Unauthenticated",
    "Unavailable",
    "channel_options",
    "service_config",
]

SERVICE_NAME: Final = "endcap.v1.Recommender"
DEFAULT_TIMEOUT_S: Final = 1.0
"""Deadline of a call that names none: generous for a sub-millisecond server,
short enough that a page still renders (without recommendations) when it fails."""

Device = Literal["mobile", "tablet", "desktop"]
Placement = Literal[
    "home", "category", "product", "cart", "checkout", "email", "search", "post_purchase"
]
EventType = Literal[
    "view",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "search",
    "recommendation_impression",
    "recommendation_click",
]
HealthStatus = Literal["SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"]
ApiKeyHeader = Literal["authorization", "x-api-key"]


class Context(TypedDict, total=False):
    """Who is asking, from where, on what, for which spot (proto `RequestContext`).

    Every field is optional; pass them as keyword arguments to any call, or
    keep one dict per page view and splat it: `client.recommend(**ctx)`.
    """

    user_id: str
    """The shop's stable id for a logged-in shopper (at most 128 characters)."""
    session_id: str
    """The shop's session id; identifies an anonymous visitor across calls."""
    device: Device
    os: str
    country: str
    """ISO 3166-1 alpha-2, upper case ("DE"): items not shipped there never come back."""
    region: str
    city: str
    language: str
    """BCP 47 tag, e.g. "de-DE"."""
    currency: str
    """ISO 4217, upper case ("EUR"): filter prices are read, and result prices written, in it."""
    traffic_source: str
    placement: Placement


_CONTEXT_FIELDS: Final = frozenset(Context.__annotations__)


@dataclass(frozen=True, slots=True)
class Filters:
    """Hard constraints: every returned item satisfies all of them (proto `Filters`).

    Prices are in the call's `currency`, inclusive. `in_stock_only=None` keeps
    the server default (only items in stock); pass False to allow the rest.
    """

    min_price: float | None = None
    max_price: float | None = None
    include_categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    brands: Sequence[str] = ()
    in_stock_only: bool | None = None
    exclude_item_ids: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Diversity:
    """Per-call diversity (proto `Diversity`); 0 keeps the placement strategy's setting.

    Caps are hard: fewer items come back rather than break one. `exposure_cap`
    demotes items this shopper was shown that many times without engaging
    (impressions are `recommendation_impression` events naming the item).
    """

    max_per_category: int = 0
    max_per_brand: int = 0
    level: float = 0.0
    """MMR trade-off in [0, 1]: 0 = pure relevance, 1 = maximal spread."""
    exposure_cap: int = 0


@dataclass(frozen=True, slots=True)
class Boost:
    """Multiply the score of items whose `attribute` ("brand", "category" (matching its
    sub-categories) or "tag", a merchandising tag like "high_margin") equals `value`:
    factor > 1 boosts, < 1 buries, 0 hides (0..100)."""

    attribute: str
    value: str
    factor: float


@dataclass(frozen=True, slots=True)
class Pin:
    """Put `item_id` at 1-based `position` (if it passes the call's filters)."""

    item_id: str
    position: int


@dataclass(frozen=True, slots=True)
class Rules:
    """Per-call merchandising (proto `Rules`), applied on top of the shop's rules. Rules
    never break the hard filters: a pinned or boosted item that fails them stays out."""

    boosts: Sequence[Boost] = ()
    pins: Sequence[Pin] = ()
    blocked_item_ids: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Item:
    """One recommended item.

    `score` is comparable within one response only. `provenance` says which
    stage produced the item, lower case: "ann_retrieval", "exact_scan",
    "segment_popularity", "global_popularity", "reranked_candidate" (newer
    servers may add values).
    """

    item_id: str
    score: float
    price: float
    currency: str
    category: str
    brand: str
    in_stock: bool
    provenance: str
    reason: str = ""
    """A short explanation for the page, e.g. "Often bought with sku-1" ("" when none)."""
    reason_item_id: str = ""
    """The item the reason refers to ("" when none)."""


@dataclass(frozen=True, slots=True)
class Recommendations:
    """Items best first, and what to send back with impression and click events."""

    items: tuple[Item, ...]
    recommendation_id: str
    model_version: str
    currency: str
    personalized: bool
    """False on the cold-start path (segment bestsellers) and for SimilarItems."""
    experiment: str = ""
    """The experiment and variant that served this shopper ("" when none)."""
    variant: str = ""
    strategy: str = ""
    """The placement strategy that produced a Recommend answer, e.g. "product.upsell"."""
    shopper_segment: str = ""
    """Recommend only: "new_visitor", "returning_visitor", "customer" or "vip"."""
    traffic_source: str = ""
    """Recommend only: the context's traffic source as the strategy matched it
    (trimmed, lower case)."""

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class Reranked(Recommendations):
    """Rerank's answer: the candidates that passed, best first, and the rest reported."""

    unknown_item_ids: tuple[str, ...] = ()
    """Candidates not in the catalog."""
    filtered_item_ids: tuple[str, ...] = ()
    """Candidates in the catalog that failed a filter."""


@dataclass(frozen=True, slots=True)
class Event:
    """One shopper event for `track_events` (proto `Event`).

    `context` needs `user_id` and/or `session_id`. `item_id` is required except
    for "search" and "recommendation_impression". Send the `recommendation_id`
    of the response that showed an item with its impression and click (and
    purchase) events: that attributes them to the model and experiment variant.
    """

    type: EventType
    context: Context
    item_id: str = ""
    timestamp_s: float | None = None
    """Unix time it happened; None means when the server receives it."""
    price: float = 0.0
    """Unit price in context currency ("purchase")."""
    quantity: int = 0
    query: str = ""
    """Search text ("search")."""
    recommendation_id: str = ""
    event_id: str = ""
    """Your id for the event, echoed in rejections."""


@dataclass(frozen=True, slots=True)
class EventRejection:
    """Why one event of a batch was not accepted; the others in the batch were."""

    index: int
    event_id: str
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tracked:
    """`track_events`' answer: how many events were accepted, and why the rest were not."""

    accepted: int
    rejected: tuple[EventRejection, ...] = ()


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, from the server's `google.rpc.BadRequest` detail."""

    field: str
    description: str


class EndcapError(Exception):
    """A call failed. Subclasses name the common status codes; `code` has the exact one.

    Hierarchy::

        EndcapError
        ├── InvalidArgument      the request is wrong (`violations` name the fields)
        ├── NotFound             e.g. an unknown seed item in SimilarItems
        ├── Unavailable          no model loaded yet, draining, or unreachable
        ├── DeadlineExceeded     the call's `timeout_s` ran out
        ├── ResourceExhausted    the server shed load
        ├── Unauthenticated      missing or wrong API key
        └── PermissionDenied     the key may not call this method
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation] = ()
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = tuple(violations)


class InvalidArgument(EndcapError):
    pass


class NotFound(EndcapError):
    pass


class Unavailable(EndcapError):
    pass


class DeadlineExceeded(EndcapError):
    pass


class ResourceExhausted(EndcapError):
    pass


class Unauthenticated(EndcapError):
    pass


class PermissionDenied(EndcapError):
    pass


_ERRORS: Final[dict[grpc.StatusCode, type[EndcapError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def service_config(
    *,
    timeout_s: float | None = None,
    max_attempts: int = 3,
    load_balancing: Literal["pick_first", "round_robin"] = "pick_first",
) -> dict[str, Any]:
    """The gRPC service config the clients install (deploy/README.md shows it for other languages).

    Reads (Recommend, Rerank, SimilarItems, health, ...) failing with
    UNAVAILABLE (connection refused or reset, a replica draining) are retried
    up to `max_attempts` in total with jittered exponential backoff. Event
    writes are not: a batch the server applied before the connection broke
    would be applied twice. Nothing else is retried: retrying DEADLINE_EXCEEDED
    only adds load where it hurts.

    `timeout_s` adds a default deadline for callers that set none. The clients
    here leave it out and put a deadline on every call instead: gRPC Python
    misapplies service-config timeouts (grpc/grpc#34547: under about 2 s the
    call fails at once, above it no deadline is sent at all).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    method: dict[str, Any] = {
        "name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}],
    }
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        method["timeout"] = f"{timeout_s:.9f}".rstrip("0").rstrip(".") + "s"
    if max_attempts > 1:
        method["retryPolicy"] = {
            # gRPC caps maxAttempts at 5 whatever the config says.
            "maxAttempts": min(max_attempts, 5),
            "initialBackoff": "0.02s",
            "maxBackoff": "0.2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    writes: dict[str, Any] = {
        "name": [
            {"service": SERVICE_NAME, "method": name} for name in ("TrackEvents", "StreamEvents")
        ],
    }
    if "timeout" in method:
        writes["timeout"] = method["timeout"]
    return {"loadBalancingConfig": [{load_balancing: {}}], "methodConfig": [method, writes]}


def channel_options(
    target: str,
    *,
    max_attempts: int = 3,
    load_balancing: Literal["pick_first", "round_robin"] | None = None,
    keepalive_time_s: float = 30.0,
    keepalive_timeout_s: float = 10.0,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> list[tuple[str, Any]]:
    """Channel options for `target`; the clients use these, other gRPC code may too.

    `load_balancing=None` picks `round_robin` for `dns:///` targets (a headless
    Service resolving to many pods) and `pick_first` otherwise. Keepalive pings
    go out only while calls are in flight, which the server's default ping
    policy accepts.
    """
    if load_balancing is None:
        load_balancing = "round_robin" if target.startswith("dns:") else "pick_first"
    config = service_config(max_attempts=max_attempts, load_balancing=load_balancing)
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.primary_user_agent", "endcap-python"),
    ]


class _Base:
    """What both clients share: options, metadata, request building, result parsing."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        api_key: str | None,
        api_key_header: ApiKeyHeader,
        max_attempts: int,
        load_balancing: Literal["pick_first", "round_robin"] | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        base = channel_options(target, max_attempts=max_attempts, load_balancing=load_balancing)
        overridden = {name for name, _ in options}
        self._options = [(k, v) for k, v in base if k not in overridden] + list(options)
        self._metadata: tuple[tuple[str, str], ...] = ()
        if api_key is not None:
            if api_key_header == "authorization":
                self._metadata = (("authorization", f"Bearer {api_key}"),)
            else:
                self._metadata = (("x-api-key", api_key),)

    def _call_args(
        self, timeout_s: float | None, metadata: Iterable[tuple[str, str]]
    ) -> dict[str, Any]:
        return {
            "timeout": self.timeout_s if timeout_s is None else timeout_s,
            "metadata": self._metadata + tuple(metadata),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


def _seq(value: str | Sequence[str], name: str) -> list[str]:
    # A bare str is a Sequence[str] of characters: treat it as one id instead.
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be item id strings, got {value!r}")
    return list(value)


def _context(fields: Mapping[str, Any]) -> pb.RequestContext:
    unknown = set(fields) - _CONTEXT_FIELDS
    if unknown:
        raise TypeError(
            f"unknown context field(s) {sorted(unknown)}; expected some of {sorted(_CONTEXT_FIELDS)}"
        )
    values = dict(fields)
    ctx = pb.RequestContext()
    device = values.pop("device", None)
    placement = values.pop("placement", None)
    if device is not None:
        ctx.device = pb.RequestContext.Device.Value(_enum_name(_DEVICES, "device", device))
    if placement is not None:
        ctx.placement = pb.RequestContext.Placement.Value(
            _enum_name(_PLACEMENTS, "placement", placement)
        )
    for name, value in values.items():
        setattr(ctx, name, value)
    return ctx


def _names(enum: Any) -> frozenset[str]:
    return frozenset(v.name for v in enum.DESCRIPTOR.values if not v.name.endswith("_UNSPECIFIED"))


_DEVICES: Final = _names(pb.RequestContext.Device)
_PLACEMENTS: Final = _names(pb.RequestContext.Placement)


def _enum_name(names: frozenset[str], field: str, value: object) -> str:
    if not isinstance(value, str) or value.upper() not in names:
        choices = sorted(n.lower() for n in names)
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")
    return value.upper()


def _filters(filters: Filters | None) -> pb.Filters | None:
    if filters is None:
        return None
    out = pb.Filters(
        include_categories=filters.include_categories,
        exclude_categories=filters.exclude_categories,
        brands=filters.brands,
        exclude_item_ids=filters.exclude_item_ids,
    )
    if filters.min_price is not None:
        out.min_price = filters.min_price
    if filters.max_price is not None:
        out.max_price = filters.max_price
    if filters.in_stock_only is not None:
        out.in_stock_only = filters.in_stock_only
    return out


def _provenance(value: int) -> str:
    try:
        return pb.RecommendedItem.Provenance.Name(
            cast(pb.RecommendedItem.Provenance.ValueType, value)
        ).lower()
    except ValueError:  # a newer server's value this client does not know yet
        return f"provenance_{value}"


def _items(items: Iterable[pb.RecommendedItem]) -> tuple[Item, ...]:
    return tuple(
        Item(
            item_id=it.item_id,
            score=it.score,
            price=it.price,
            currency=it.currency,
            category=it.category,
            brand=it.brand,
            in_stock=it.in_stock,
            provenance=_provenance(it.provenance),
            reason=it.reason,
            reason_item_id=it.reason_item_id,
        )
        for it in items
    )


def _recommendations(
    reply: pb.RecommendResponse | pb.SimilarItemsResponse,
) -> Recommendations:
    return Recommendations(
        items=_items(reply.items),
        recommendation_id=reply.recommendation_id,
        model_version=reply.model_version,
        currency=reply.currency,
        personalized=isinstance(reply, pb.RecommendResponse) and reply.personalized,
        experiment=reply.experiment,
        variant=reply.variant,
        **_recommend_fields(reply),
    )


def _recommend_fields(reply: pb.RecommendResponse | pb.SimilarItemsResponse) -> dict[str, str]:
    if not isinstance(reply, pb.RecommendResponse):
        return {}
    segment = pb.ShopperSegment.Name(reply.shopper_segment)
    return {
        "strategy": reply.strategy,
        "shopper_segment": "" if reply.shopper_segment == 0 else segment.lower(),
        "traffic_source": reply.traffic_source,
    }


def _reranked(reply: pb.RerankResponse) -> Reranked:
    return Reranked(
        items=_items(reply.items),
        recommendation_id=reply.recommendation_id,
        model_version=reply.model_version,
        currency=reply.currency,
        personalized=reply.personalized,
        experiment=reply.experiment,
        variant=reply.variant,
        unknown_item_ids=tuple(reply.unknown_item_ids),
        filtered_item_ids=tuple(reply.filtered_item_ids),
    )


def _recommend_request(
    num_results: int,
    filters: Filters | None,
    context: Mapping[str, Any],
    seed_item_ids: str | Sequence[str] = (),
    strategy: str = "",
    diversity: Diversity | None = None,
    rules: Rules | None = None,
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        context=_context(context),
        filters=_filters(filters),
        num_results=num_results,
        seed_item_ids=_seq(seed_item_ids, "seed_item_ids"),
        strategy=strategy,
        diversity=None
        if diversity is None
        else pb.Diversity(
            max_per_category=diversity.max_per_category,
            max_per_brand=diversity.max_per_brand,
            level=diversity.level,
            exposure_cap=diversity.exposure_cap,
        ),
        rules=None if rules is None else _rules(rules),
    )


def _rules(rules: Rules) -> pb.Rules:
    return pb.Rules(
        boosts=[
            pb.Rules.Boost(attribute=b.attribute, value=b.value, factor=b.factor)
            for b in rules.boosts
        ],
        pins=[pb.Rules.Pin(item_id=p.item_id, position=p.position) for p in rules.pins],
        blocked_item_ids=_seq(rules.blocked_item_ids, "blocked_item_ids"),
    )


def _rerank_request(
    candidates: str | Sequence[str],
    num_results: int,
    filters: Filters | None,
    context: Mapping[str, Any],
) -> pb.RerankRequest:
    return pb.RerankRequest(
        context=_context(context),
        filters=_filters(filters),
        candidate_item_ids=_seq(candidates, "candidate_item_ids"),
        num_results=num_results,
    )


def _similar_request(
    seeds: str | Sequence[str],
    num_results: int,
    filters: Filters | None,
    context: Mapping[str, Any],
) -> pb.SimilarItemsRequest:
    return pb.SimilarItemsRequest(
        context=_context(context),
        filters=_filters(filters),
        seed_item_ids=_seq(seeds, "seed_item_ids"),
        num_results=num_results,
    )


_EVENT_TYPES: Final = _names(pb.Event.Type)


def _track_request(events: Sequence[Event]) -> pb.TrackEventsRequest:
    out = []
    for event in events:
        msg = pb.Event(
            type=pb.Event.Type.Value(_enum_name(_EVENT_TYPES, "type", event.type)),
            context=_context(event.context),
            item_id=event.item_id,
            price=event.price,
            quantity=event.quantity,
            query=event.query,
            recommendation_id=event.recommendation_id,
            event_id=event.event_id,
        )
        if event.timestamp_s is not None:
            msg.timestamp.FromNanoseconds(round(event.timestamp_s * 1e9))
        out.append(msg)
    return pb.TrackEventsRequest(events=out)


def _tracked(reply: pb.TrackEventsResponse) -> Tracked:
    return Tracked(
        accepted=reply.accepted,
        rejected=tuple(
            EventRejection(index=r.index, event_id=r.event_id, field=r.field, reason=r.reason)
            for r in reply.rejected
        ),
    )


_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


def _error(exc: grpc.RpcError) -> EndcapError:
    """The EndcapError for a failed call, with BadRequest field violations if sent."""
    call = cast(grpc.Call, exc)
    code = call.code()
    message = call.details() or ""
    violations: list[FieldViolation] = []
    for key, value in call.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            violations.extend(_violations(value))
    return _ERRORS.get(code, EndcapError)(code, message, violations)


def _violations(raw: bytes) -> list[FieldViolation]:
    from google.protobuf.message import DecodeError
    from google.rpc import error_details_pb2, status_pb2

    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return []
    out: list[FieldViolation] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return out


def _health_status(reply: Any) -> HealthStatus:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return cast(HealthStatus, name if name in {"SERVING", "NOT_SERVING"} else "UNKNOWN")


class Client(_Base):
    """Blocking client; thread-safe, one channel. Use as a context manager or `close()` it.

    Args:
        target: `host:port`, or `dns:///name:port` to balance over every address
            the name resolves to (a headless Kubernetes Service).
        timeout_s: deadline of every call that passes no `timeout_s` of its own.
        api_key: sent as `authorization: Bearer <key>` (or as `x-api-key` with
            `api_key_header="x-api-key"`) on every call.
        credentials: channel credentials for TLS, e.g.
            `grpc.ssl_channel_credentials(root_certificates=ca_pem)`; None is plaintext.
        max_attempts: attempts per call for UNAVAILABLE failures (1 disables retries).
        load_balancing: None picks round_robin for `dns:` targets, else pick_first.
        options: extra or overriding gRPC channel options.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        api_key_header: ApiKeyHeader = "authorization",
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = 3,
        load_balancing: Literal["pick_first", "round_robin"] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target,
            timeout_s=timeout_s,
            api_key=api_key,
            api_key_header=api_key_header,
            max_attempts=max_attempts,
            load_balancing=load_balancing,
            options=options,
        )
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=self._options)
        self._stub = pb_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def recommend(
        self,
        *,
        num_results: int = 10,
        filters: Filters | None = None,
        seed_item_ids: str | Sequence[str] = (),
        strategy: str = "",
        diversity: Diversity | None = None,
        rules: Rules | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Recommendations:
        """Personalised items for a known user, a session, or a new visitor.

        `num_results` is 1..500. Shoppers the model does not know get their
        segment's bestsellers (`personalized` is False), within the filters.
        `placement` (in the context) picks the page's strategy; `seed_item_ids`
        are the items the page is about (the product, the cart); `strategy`
        names another one, e.g. "product.upsell" or "product.cheaper"; `rules`
        boosts, buries, pins and blocks items for this call.
        """
        request = _recommend_request(
            num_results, filters, context, seed_item_ids, strategy, diversity, rules
        )
        try:
            reply = self._stub.Recommend(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _recommendations(reply)

    def rerank(
        self,
        candidate_item_ids: str | Sequence[str],
        *,
        num_results: int = 0,
        filters: Filters | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Reranked:
        """Orders up to 500 of your candidates for this shopper; 0 results means all that pass.

        Unknown ids and candidates failing a filter are reported, not fatal.
        """
        request = _rerank_request(candidate_item_ids, num_results, filters, context)
        try:
            reply = self._stub.Rerank(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _reranked(reply)

    def similar_items(
        self,
        seed_item_ids: str | Sequence[str],
        *,
        num_results: int = 10,
        filters: Filters | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Recommendations:
        """Items related to 1..50 seed items (product page, cart); seeds never come back.

        An unknown seed raises `NotFound`.
        """
        request = _similar_request(seed_item_ids, num_results, filters, context)
        try:
            reply = self._stub.SimilarItems(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _recommendations(reply)

    def track_events(
        self,
        events: Sequence[Event],
        *,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Tracked:
        """Records 1..1000 shopper events; each is validated on its own.

        Accepted events shape the shopper's next recommendations; rejected ones
        come back with the field and reason. Unlike reads, a batch is not
        retried on UNAVAILABLE (the server may have applied it): retry it
        yourself if your pipeline tolerates duplicates.
        """
        request = _track_request(events)
        try:
            reply = self._stub.TrackEvents(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _tracked(reply)

    def health(
        self, service: str = SERVICE_NAME, *, timeout_s: float | None = None
    ) -> HealthStatus:
        """The server's health for `service` ("" for the whole server).

        SERVING once a model is loaded; NOT_SERVING while loading or draining;
        SERVICE_UNKNOWN when the server does not know `service`. Unreachable
        servers raise `Unavailable`.
        """
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = self._health.Check(request, **self._call_args(timeout_s, ()))
        except grpc.RpcError as exc:
            error = _error(exc)
            if isinstance(error, NotFound):
                return "SERVICE_UNKNOWN"
            raise error from None
        return _health_status(reply)

    def wait_until_serving(self, timeout_s: float = 30.0, service: str = SERVICE_NAME) -> None:
        """Block until the server reports SERVING (it may not be up yet); else DeadlineExceeded."""
        request = health_pb2.HealthCheckRequest(service=service)
        stream = self._health.Watch(
            request, timeout=timeout_s, metadata=self._metadata, wait_for_ready=True
        )
        try:
            for reply in stream:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            stream.cancel()
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "health watch ended before SERVING")

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same API as `Client`; every call is a coroutine.

    Create it inside the event loop that will use it (`async with
    AsyncClient(target) as client: ...`): a grpc.aio channel belongs to one loop.
    Arguments are those of `Client`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        api_key_header: ApiKeyHeader = "authorization",
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = 3,
        load_balancing: Literal["pick_first", "round_robin"] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target,
            timeout_s=timeout_s,
            api_key=api_key,
            api_key_header=api_key_header,
            max_attempts=max_attempts,
            load_balancing=load_balancing,
            options=options,
        )
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=self._options)
        self._stub = pb_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def recommend(
        self,
        *,
        num_results: int = 10,
        filters: Filters | None = None,
        seed_item_ids: str | Sequence[str] = (),
        strategy: str = "",
        diversity: Diversity | None = None,
        rules: Rules | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Recommendations:
        """See `Client.recommend`."""
        request = _recommend_request(
            num_results, filters, context, seed_item_ids, strategy, diversity, rules
        )
        try:
            reply = await self._stub.Recommend(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _recommendations(reply)

    async def rerank(
        self,
        candidate_item_ids: str | Sequence[str],
        *,
        num_results: int = 0,
        filters: Filters | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Reranked:
        """See `Client.rerank`."""
        request = _rerank_request(candidate_item_ids, num_results, filters, context)
        try:
            reply = await self._stub.Rerank(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _reranked(reply)

    async def similar_items(
        self,
        seed_item_ids: str | Sequence[str],
        *,
        num_results: int = 10,
        filters: Filters | None = None,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **context: Unpack[Context],
    ) -> Recommendations:
        """See `Client.similar_items`."""
        request = _similar_request(seed_item_ids, num_results, filters, context)
        try:
            reply = await self._stub.SimilarItems(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _recommendations(reply)

    async def track_events(
        self,
        events: Sequence[Event],
        *,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Tracked:
        """See `Client.track_events`."""
        request = _track_request(events)
        try:
            reply = await self._stub.TrackEvents(request, **self._call_args(timeout_s, metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _tracked(reply)

    async def health(
        self, service: str = SERVICE_NAME, *, timeout_s: float | None = None
    ) -> HealthStatus:
        """See `Client.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._health.Check(request, **self._call_args(timeout_s, ()))
        except grpc.RpcError as exc:
            error = _error(exc)
            if isinstance(error, NotFound):
                return "SERVICE_UNKNOWN"
            raise error from None
        return _health_status(reply)

    async def wait_until_serving(
        self, timeout_s: float = 30.0, service: str = SERVICE_NAME
    ) -> None:
        """See `Client.wait_until_serving`."""
        request = health_pb2.HealthCheckRequest(service=service)
        stream = self._health.Watch(
            request, timeout=timeout_s, metadata=self._metadata, wait_for_ready=True
        )
        try:
            async for reply in stream:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            stream.cancel()
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "health watch ended before SERVING")

    async def close(self, grace_s: float | None = None) -> None:
        """Close the channel, letting calls in flight finish for up to `grace_s`."""
        await self._channel.close(grace_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
