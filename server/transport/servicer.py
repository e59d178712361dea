"""The Recommender servicer: validate, call the engine, render; errors mapped in one place."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import ArtifactError
from server.domain import experiments
from server.domain.catalog import ItemUpdate, Rejected
from server.domain.engine import Answer, Blend, Engine
from server.domain.errors import InvalidQuery, UnknownItems
from server.domain.experiments import Assignment, Experiment
from server.domain.query import (
    Context,
    Profile,
    RecommendQuery,
    SimilarQuery,
    StateEvent,
    shopper_key,
)
from server.infra.metrics import Metrics
from server.state.catalog_feed import CatalogFeed, Change, FeedUnavailable
from server.state.eventlog import EventLog
from server.state.store import StateStore
from server.transport import validate
from server.transport.auth import METHOD_ROLES
from server.transport.budget import BudgetPolicy, popular_fallback, similar_fallback
from server.transport.validate import InvalidRequest

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[object, object]
MAX_LISTED_REJECTIONS = 1000
# Live catalog changes share the event loop with requests: apply UPSERT_CHUNK items
# at a time for up to UPSERT_SLICE_S, then step aside for UPSERT_PAUSE_S, and on
# while reads are in flight (up to UPSERT_MAX_WAIT_S, so a batch always progresses).
UPSERT_CHUNK = 16
UPSERT_SLICE_S = 0.002
UPSERT_PAUSE_S = 0.002
UPSERT_MAX_WAIT_S = 0.02
_READS = frozenset(m for m, role in METHOD_ROLES.items() if role == "read")
_ADD_TO_CART, _PURCHASE = pb.Event.ADD_TO_CART, pb.Event.PURCHASE


@dataclass
class EngineHolder:
    """The engine currently served (swapped whole on reload; None until one loads) and
    the live catalog changes applied since startup, replayed onto a reloaded engine."""

    current: Engine | None = None
    journal: list[tuple[str, ItemUpdate | str]] = field(default_factory=list)
    experiments: tuple[Experiment, ...] = ()
    variant_engines: dict[str, Engine] = field(default_factory=dict)  # model version -> engine


class NoModel(Exception):
    pass


@dataclass
class CatalogResult:
    """What a batch of live catalog changes did."""

    created: int = 0
    updated: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    deleted: int = 0
    unknown: tuple[str, ...] = ()


def _status(code: int, message: str, field_name: str | None = None) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    if field_name is not None:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field_name, description=message
                    )
                ]
            )
        )
        status.details.append(detail)
    # grpc_status has no type information (ignore_missing_imports): it returns Any.
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _status_for(exc: Exception) -> grpc.Status | None:
    """The one place exceptions become status codes; None = a bug (INTERNAL)."""
    if isinstance(exc, InvalidRequest | InvalidQuery):
        return _status(code_pb2.INVALID_ARGUMENT, str(exc), exc.field)
    if isinstance(exc, UnknownItems):
        return _status(code_pb2.NOT_FOUND, str(exc), exc.field)
    if isinstance(exc, FeedUnavailable):
        return _status(code_pb2.UNAVAILABLE, f"{exc}; the change was not applied, retry")
    if isinstance(exc, NoModel):
        return _status(code_pb2.UNAVAILABLE, "no model loaded yet; retry shortly")
    if isinstance(exc, ArtifactError):
        return _status(code_pb2.FAILED_PRECONDITION, f"artifact refused: {exc}")
    return None


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Ctx], Awaitable[Resp]]


def _guarded(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Map domain and validation errors to a status; let anything else be INTERNAL."""

    read = handler.__name__ in _READS

    @functools.wraps(handler)
    async def guarded(self: Any, request: Req, context: Ctx) -> Resp:
        if read:
            self._reads += 1
        try:
            return await handler(self, request, context)
        except Exception as exc:
            status = _status_for(exc)
            if status is None:
                raise
            await context.abort_with_status(status)
            raise AssertionError("abort_with_status returned") from exc
        finally:
            if read:
                self._reads -= 1

    return guarded


def _rejection(r: Rejected, prefix: str) -> pb.EventRejection:
    return pb.EventRejection(index=r.index, field=f"{prefix}[{r.index}].{r.field}", reason=r.reason)


class _Children:
    """A labelled metric's children by label values, resolved once: labels() takes a
    lock and builds a key on every call."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(
        self,
        holder: EngineHolder,
        metrics: Metrics,
        store: StateStore,
        events: EventLog | None = None,
        reload: Callable[[str], Awaitable[tuple[str, str]]] | None = None,
        budget: BudgetPolicy | None = None,
        feed: CatalogFeed | None = None,
    ) -> None:
        self._holder = holder
        self._feed = feed
        self._metrics = metrics
        self._store = store
        self._events = events
        self._reload = reload
        self._budget = budget or BudgetPolicy()
        self._reads = 0  # read calls in flight; catalog batches yield to them
        self._by_plan = _Children(metrics.retrieval)
        self._served = {p: metrics.items_served.labels(n) for p, n in _PROVENANCE_LABELS.items()}
        self._answers = _Children(metrics.recommendations)  # Recommend answers by labels

    def _fallback(
        self,
        method: str,
        engine: Engine,
        query: RecommendQuery | SimilarQuery,
        seeds: tuple[str, ...],
    ) -> Answer:
        """Segment bestsellers under the same filters: the answer when time runs short."""
        self._metrics.budget_fallbacks.labels(method).inc()
        ctx, flt, k = query.context, query.filters, query.k
        if isinstance(query, SimilarQuery):
            return self._run(engine, lambda: similar_fallback(engine, ctx, flt, k, seeds))
        return self._run(engine, lambda: popular_fallback(engine, ctx, flt, k, seeds))

    def _engine(self) -> Engine:
        engine = self._holder.current
        if engine is None:
            raise NoModel
        return engine

    def _route(self, ctx: Context) -> tuple[Engine, Blend | None, Assignment | None]:
        """The engine and strategy parameters for this shopper's experiment variant."""
        engine = self._engine()
        assignment = experiments.assign(self._holder.experiments, ctx.user_id, ctx.session_id)
        if assignment is None:
            return engine, None, None
        variant = assignment.variant
        self._metrics.experiment_requests.labels(assignment.experiment, variant.name).inc()
        if variant.model:
            engine = self._holder.variant_engines.get(variant.model, engine)
        blend = dataclasses.replace(engine.blend, **variant.params) if variant.params else None
        return engine, blend, assignment

    def _attribute(self, msgs: Sequence[pb.Event]) -> None:
        """Count impressions, clicks and purchases per variant via their recommendation_id."""
        known = {(e.name, v.name) for e in self._holder.experiments for v in e.variants}
        for msg in msgs:
            if not msg.recommendation_id or msg.type not in _ATTRIBUTED:
                continue
            pair = experiments.attribution(msg.recommendation_id)
            if pair in known:
                self._metrics.experiment_events.labels(*pair, _ATTRIBUTED[msg.type]).inc()

    def _run(self, engine: Engine, run: Callable[[], Answer]) -> Answer:
        start = time.perf_counter()
        answer = run()
        elapsed = time.perf_counter() - start
        self._by_plan(answer.results.plan).observe(elapsed)
        return answer

    async def _profile(self, ctx: Context) -> Profile:
        key = shopper_key(ctx.user_id, ctx.session_id)
        return await self._store.profile(key) if key else Profile()

    def _items(self, engine: Engine, answer: Answer, out: Any) -> None:
        """Render the results into `out`, a response's repeated RecommendedItem field
        (adding in place: building messages and passing them copies each one)."""
        cat = engine.catalog
        res = answer.results
        ids = res.ids
        add = out.add
        for item_id, score, price, category, brand, stock, prov, reason, reason_item in zip(
            cat.item_ids(ids),
            res.scores.tolist(),
            (cat.price[ids] * answer.rate).tolist(),
            cat.category[ids].tolist(),
            cat.brand[ids].tolist(),
            cat.in_stock[ids].tolist(),
            res.provenance.tolist(),
            answer.reasons or ("",) * ids.shape[0],
            answer.reason_items or ("",) * ids.shape[0],
            strict=True,
        ):
            add(
                item_id=item_id,
                score=score,
                price=price,
                currency=answer.currency,
                category=cat.category_names[category],
                brand=cat.brand_names[brand],
                in_stock=stock,
                provenance=prov,
                reason=reason,
                reason_item_id=reason_item,
            )
        counts: dict[int, int] = {}
        for prov in res.provenance.tolist():
            counts[prov] = counts.get(prov, 0) + 1
        for prov, n in counts.items():
            self._served[prov].inc(n)

    # Reads.
    @_guarded
    async def Recommend(self, request: pb.RecommendRequest, context: Ctx) -> pb.RecommendResponse:
        query = validate.recommend(request)
        engine, blend, assignment = self._route(query.context)
        budget = self._budget.start(context)
        if budget.short():
            answer = self._fallback("Recommend", engine, query, query.seeds)
        else:
            profile = await self._profile(query.context)
            now = time.time()
            plan = engine.plan(query, profile, now)
            pool = max(3 * query.k, 30)
            live: dict[str, list[str]] = {}
            for name, keys in plan.live_keys.items():
                for key in keys:
                    top = await self._store.top(key, pool, name == "trending")
                    live.setdefault(name, []).extend(item for item, _ in top)
            if budget.short():  # the state store used it up
                answer = self._fallback("Recommend", engine, query, query.seeds)
            else:
                answer = self._run(
                    engine, lambda: engine.recommend(query, plan, profile, live, now, blend)
                )
        resp = pb.RecommendResponse(
            recommendation_id=experiments.recommendation_id(uuid.uuid4().hex, assignment),
            model_version=engine.model_version,
            currency=answer.currency,
            personalized=answer.personalized,
            strategy=answer.strategy,
            shopper_segment=_SEGMENTS[answer.shopper_segment],
            traffic_source=answer.traffic_source,
            **_variant_fields(assignment),
        )
        self._items(engine, answer, resp.items)
        self._count_answer(engine, answer)
        return resp

    def _count_answer(self, engine: Engine, answer: Answer) -> None:
        self._answers(
            answer.strategy or "fallback",
            answer.shopper_segment or "unknown",
            engine.strategies.source_label(answer.traffic_source),
        ).inc()

    @_guarded
    async def Rerank(self, request: pb.RerankRequest, context: Ctx) -> pb.RerankResponse:
        query = validate.rerank(request)
        engine, blend, assignment = self._route(query.context)
        profile = await self._profile(query.context)
        now = time.time()
        answer = self._run(engine, lambda: engine.rerank(query, profile, now, blend))
        resp = pb.RerankResponse(
            unknown_item_ids=answer.unknown_ids,
            filtered_item_ids=answer.filtered_ids,
            recommendation_id=experiments.recommendation_id(uuid.uuid4().hex, assignment),
            model_version=engine.model_version,
            currency=answer.currency,
            personalized=answer.personalized,
            **_variant_fields(assignment),
        )
        self._items(engine, answer, resp.items)
        return resp

    @_guarded
    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: Ctx
    ) -> pb.SimilarItemsResponse:
        query = validate.similar(request)
        engine, _, assignment = self._route(query.context)
        if self._budget.start(context).short():
            answer = self._fallback("SimilarItems", engine, query, query.seeds)
        else:
            answer = self._run(engine, lambda: engine.similar(query))
        resp = pb.SimilarItemsResponse(
            recommendation_id=experiments.recommendation_id(uuid.uuid4().hex, assignment),
            model_version=engine.model_version,
            currency=answer.currency,
            **_variant_fields(assignment),
        )
        self._items(engine, answer, resp.items)
        return resp

    @_guarded
    async def Popular(self, request: pb.PopularRequest, context: Ctx) -> pb.PopularResponse:
        query = validate.popular(request)
        engine = self._engine()
        segment = engine.live_popular_segment(query.context, query.filters.include_categories)
        live: list[str] = []
        if not self._budget.start(context).short():  # else trained counts only
            live = [item for item, _ in await self._store.top(segment, 4 * query.k, query.trending)]
        answer = self._run(engine, lambda: engine.popular(query, live))
        resp = pb.PopularResponse(
            recommendation_id=uuid.uuid4().hex,
            model_version=engine.model_version,
            currency=answer.currency,
            segment=answer.segment,
        )
        self._items(engine, answer, resp.items)
        return resp

    @_guarded
    async def RecentlyViewed(
        self, request: pb.RecentlyViewedRequest, context: Ctx
    ) -> pb.RecentlyViewedResponse:
        query = validate.recently_viewed(request)
        engine = self._engine()
        profile = await self._profile(query.context)
        answer = self._run(engine, lambda: engine.recently_viewed(query, profile))
        resp = pb.RecentlyViewedResponse(
            recommendation_id=uuid.uuid4().hex,
            currency=answer.currency,
        )
        self._items(engine, answer, resp.items)
        return resp

    # Events.
    async def _track(
        self, msgs: Sequence[pb.Event], offset: int
    ) -> tuple[int, list[pb.EventRejection]]:
        """Validate, log durably, apply to state. Returns (accepted, rejections)."""
        engine = self._engine()
        now = time.time()
        good, bad = validate.events(msgs, now, offset)
        resolved, unresolved = engine.resolve_events(good)
        rejections = [
            pb.EventRejection(
                index=i, event_id=msgs[i - offset].event_id, field=e.field, reason=e.reason
            )
            for i, e in bad
        ]
        rejections += [
            pb.EventRejection(
                index=r.index,
                event_id=msgs[r.index - offset].event_id,
                field=f"events[{r.index}].{r.field}",
                reason=r.reason,
            )
            for r in unresolved
        ]
        rejections.sort(key=lambda r: r.index)
        self._attribute([msgs[i - offset] for i, _ in good])
        for _, ev in good:
            self._metrics.event_lag.observe(max(0.0, now - ev.ts_s))
        resolved = [(i, await self._with_copurchase(ev)) for i, ev in resolved]
        if resolved:
            if self._events is not None:
                await self._events.append_events(
                    [msgs[i - offset] for i, _ in resolved], int(now * 1000)
                )
            await self._store.apply([ev for _, ev in resolved])
        self._metrics.events.labels("accepted").inc(len(resolved))
        self._metrics.events.labels("rejected").inc(len(rejections))
        return len(resolved), rejections

    async def _with_copurchase(self, ev: StateEvent) -> StateEvent:
        """Carts and purchases also count as "bought with" each item already in the
        shopper's cart or recent purchases, keeping also-bought lists fresh."""
        if ev.kind not in (_ADD_TO_CART, _PURCHASE):
            return ev
        profile = await self._store.profile(ev.key)
        others = dict.fromkeys((*profile.cart, *profile.purchased[:10]))
        keys = tuple(f"co|{other}" for other in others if other != ev.item_id)
        return dataclasses.replace(ev, segments=ev.segments + keys) if keys else ev

    @_guarded
    async def TrackEvents(
        self, request: pb.TrackEventsRequest, context: Ctx
    ) -> pb.TrackEventsResponse:
        accepted, rejected = await self._track(request.events, 0)
        return pb.TrackEventsResponse(accepted=accepted, rejected=rejected)

    @_guarded
    async def StreamEvents(
        self, request_iterator: AsyncIterator[pb.StreamEventsRequest], context: Ctx
    ) -> pb.StreamEventsResponse:
        accepted = rejected_count = offset = 0
        listed: list[pb.EventRejection] = []
        async for batch in request_iterator:
            n_ok, rejected = await self._track(batch.events, offset)
            accepted += n_ok
            rejected_count += len(rejected)
            listed.extend(rejected[: MAX_LISTED_REJECTIONS - len(listed)])
            offset += len(batch.events)
        return pb.StreamEventsResponse(
            accepted=accepted, rejected=listed, rejected_count=rejected_count
        )

    # Admin.
    async def apply_catalog(self, changes: Sequence[Change]) -> CatalogResult:
        """Apply live catalog changes (one request's, or the shared feed's) to the served
        engine and record them for replay onto a reloaded one."""
        engine = self._engine()
        result = CatalogResult()
        upserts = [(i, c) for i, (_, c) in enumerate(changes) if isinstance(c, ItemUpdate)]
        deletes = [c for _, c in changes if isinstance(c, str)]
        # Apply for at most UPSERT_SLICE_S of loop time, then pause for real: a gRPC
        # call needs several loop turns (read, handler, send), and with a bare
        # sleep(0) every turn ran another slice, so a 10k-item batch delayed the
        # requests that arrived meanwhile by most of its ~1.5 s.
        start = 0
        slice_start = time.perf_counter()
        while start < len(upserts):
            chunk = upserts[start : start + UPSERT_CHUNK]
            start += len(chunk)
            n_new, n_changed, bad_chunk = engine.upsert(chunk)
            result.created += n_new
            result.updated += n_changed
            result.rejected += bad_chunk
            bad = {r.index for r in bad_chunk}
            self._holder.journal.extend(("upsert", it) for i, it in chunk if i not in bad)
            if start < len(upserts) and time.perf_counter() - slice_start >= UPSERT_SLICE_S:
                await self._step_aside()
                slice_start = time.perf_counter()
        if deletes:
            deleted, unknown = engine.delete(deletes)
            result.deleted += deleted
            result.unknown += unknown
            self._holder.journal.extend(("delete", i) for i in deletes)
        self._metrics.catalog_items.set(len(engine.catalog))
        return result

    async def _validate_upserts(self, request: pb.UpsertItemsRequest) -> list[ItemUpdate]:
        """Validate every item before any applies, in slices like the apply (10k items
        take ~0.2 s of Python here)."""
        validate.check_upsert_count(request)
        seen: set[str] = set()
        out: list[ItemUpdate] = []
        slice_start = time.perf_counter()
        for i, item in enumerate(request.items):
            out.append(validate.upsert_item(item, i, seen))
            if time.perf_counter() - slice_start >= UPSERT_SLICE_S:
                await self._step_aside()
                slice_start = time.perf_counter()
        return out

    async def _step_aside(self) -> None:
        """Pause a catalog batch so reads go first (at most UPSERT_MAX_WAIT_S)."""
        waited = 0.0
        while waited < UPSERT_PAUSE_S or (self._reads and waited < UPSERT_MAX_WAIT_S):
            await asyncio.sleep(UPSERT_PAUSE_S)
            waited += UPSERT_PAUSE_S

    async def _change_catalog(self, changes: Sequence[Change]) -> CatalogResult:
        """Through the shared feed when replicas share one (every replica applies it in
        the same order; this one before answering), else here only."""
        self._engine()  # no model: UNAVAILABLE before anything is written
        if self._feed is None:
            return await self.apply_catalog(changes)
        result = await self._feed.publish(changes)
        if not isinstance(result, CatalogResult):  # the engine went away meanwhile
            raise NoModel
        return result

    @_guarded
    async def UpsertItems(
        self, request: pb.UpsertItemsRequest, context: Ctx
    ) -> pb.UpsertItemsResponse:
        items = await self._validate_upserts(request)
        result = await self._change_catalog([("upsert", item) for item in items])
        return pb.UpsertItemsResponse(
            created=result.created,
            updated=result.updated,
            rejected=[_rejection(r, "items") for r in result.rejected],
        )

    @_guarded
    async def DeleteItems(
        self, request: pb.DeleteItemsRequest, context: Ctx
    ) -> pb.DeleteItemsResponse:
        ids = validate.delete_items(request)
        result = await self._change_catalog([("delete", i) for i in ids])
        return pb.DeleteItemsResponse(deleted=result.deleted, unknown_item_ids=result.unknown)

    @_guarded
    async def ForgetUser(
        self, request: pb.ForgetUserRequest, context: Ctx
    ) -> pb.ForgetUserResponse:
        user_id, session_id = validate.forget_user(request)
        engine = self._holder.current
        removed = tombstoned = 0
        suppressed = False
        for uid, sid in ((user_id, ""), ("", session_id)):
            key = shopper_key(uid, sid)
            if not key:
                continue
            if uid and engine is not None:
                suppressed = engine.user_index.get(uid) is not None
            removed += await self._store.forget(key)
            if self._events is not None:
                tombstoned += await self._events.forget(uid, sid, int(time.time() * 1000))
        log.info("forgot a shopper: %d state entries, %d logged events", removed, tombstoned)
        return pb.ForgetUserResponse(
            state_entries_removed=removed,
            events_tombstoned=tombstoned,
            trained_profile_suppressed=suppressed,
        )

    @_guarded
    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: Ctx
    ) -> pb.ReloadModelResponse:
        version = validate.reload_model(request)
        if self._reload is None:
            raise NoModel
        new, old = await self._reload(version)
        return pb.ReloadModelResponse(model_version=new, previous_model_version=old)


_SEGMENTS = {
    "": pb.SHOPPER_SEGMENT_UNSPECIFIED,
    "new_visitor": pb.NEW_VISITOR,
    "returning_visitor": pb.RETURNING_VISITOR,
    "customer": pb.CUSTOMER,
    "vip": pb.VIP,
}

_ATTRIBUTED = {
    pb.Event.RECOMMENDATION_IMPRESSION: "impression",
    pb.Event.RECOMMENDATION_CLICK: "click",
    pb.Event.PURCHASE: "purchase",
}


class _VariantFields(TypedDict, total=False):
    """The experiment fields of a response (absent when the request is in none)."""

    experiment: str
    variant: str


def _variant_fields(assignment: Assignment | None) -> _VariantFields:
    if assignment is None:
        return {}
    return {"experiment": assignment.experiment, "variant": assignment.variant.name}


_PROVENANCE_LABELS = {
    v.number: v.name.lower()
    for v in pb.RecommendedItem.DESCRIPTOR.enum_types_by_name["Provenance"].values
}
