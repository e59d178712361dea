"""The recommendation engine: one loaded artifact plus live catalog changes, answering
every read RPC from a query, the shopper's real-time profile and live popularity."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.artifact import Artifact
from server.domain import placement
from server.domain.catalog import Catalog, IdIndex, ItemUpdate, Rejected, plain, release
from server.domain.errors import UnknownItems
from server.domain.filters import Compiled
from server.domain.query import (
    Context,
    Filters,
    PopularQuery,
    Profile,
    RecentQuery,
    RecommendQuery,
    RerankQuery,
    SimilarQuery,
    StateEvent,
    TrackedEvent,
    segment_key,
    shopper_key,
)
from server.domain.ranking import top_k
from server.domain.retrieval import Provenance, Results, Retriever, SearchTuning, Vectors
from server.domain.sequence import Encoder
from server.domain.strategy import Strategies, learn_segment_rules
from server.domain.strategy import load as load_strategies

# Event kinds (Event.Type values in the proto).
VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE = 1, 2, 3, 4
SEARCH, IMPRESSION, CLICK = 5, 6, 7
_NEEDS_ITEM = {VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE, CLICK}
# Placements (RequestContext.Placement values) that must not show cart items.
_CART_PLACEMENTS = {4, 5}  # CART, CHECKOUT


@dataclass(frozen=True, slots=True)
class Answer:
    """Results plus what the transport needs to render them."""

    results: Results
    currency: str
    rate: float  # base -> response currency
    personalized: bool
    unknown_ids: tuple[str, ...] = ()
    filtered_ids: tuple[str, ...] = ()
    segment: str = ""
    reasons: tuple[str, ...] = ()
    reason_items: tuple[str, ...] = ()
    strategy: str = ""
    shopper_segment: str = ""
    traffic_source: str = ""


@dataclass(frozen=True, slots=True)
class Blend:
    """How the real-time session shapes the query vector."""

    session_boost: float = 2.0  # extra weight of a just-seen item vs a trained-history item
    session_half_life_s: float = 1800.0


class Engine:
    """Answers reads for one artifact. Reads and live changes both run on the event
    loop thread, so no locking is needed."""

    def __init__(
        self,
        artifact: Artifact,
        tuning: SearchTuning | None = None,
        *,
        live_capacity: int = 100_000,
        blend: Blend | None = None,
        strategies: Strategies | None = None,
    ) -> None:
        self.artifact = artifact
        self.strategies = strategies or load_strategies()
        self.model_version = artifact.manifest.model_version
        self.blend = blend or Blend()
        n = artifact.manifest.n_items
        self.catalog = Catalog(artifact, capacity=n + live_capacity)
        self.vectors = Vectors(artifact["item_embeddings"], n + live_capacity)
        self.user_index = IdIndex(artifact["user_ids"])
        # Plain ndarray views of the memory maps read per request (`plain`).
        self.user_embeddings = plain(artifact["user_embeddings"])
        self.history_indptr = plain(artifact["user_history_indptr"])
        self.history_items = plain(artifact["user_history_items"])
        self.history_projection = np.ascontiguousarray(artifact["history_projection"])
        self.context_device = np.ascontiguousarray(artifact["context_device"])
        self.context_country = np.ascontiguousarray(artifact["context_country"])
        self.tower_category = np.ascontiguousarray(artifact["item_tower_category"])
        self.tower_brand = np.ascontiguousarray(artifact["item_tower_brand"])
        self.tower_price = np.ascontiguousarray(artifact["item_tower_price"])
        self.price_edges = np.asarray(artifact["price_bucket_edges"])
        self.history_length = artifact.manifest.history_length
        # A sequential encoder replaces P @ mean(history) with a read of the history in order.
        self.encoder = None if artifact.encoder is None else Encoder.of(artifact.encoder)
        optional = artifact.arrays
        self.user_orders = plain(optional.get("user_orders"))
        self.user_monetary = plain(optional.get("user_monetary"))
        self.user_last_purchase_s = plain(optional.get("user_last_purchase_s"))
        learned = None
        if self.user_orders is not None:
            assert self.user_monetary is not None and self.user_last_purchase_s is not None
            learned = learn_segment_rules(
                self.user_orders, self.user_monetary, self.user_last_purchase_s
            )
        # VIP thresholds: the shop's, else learned from the trained shoppers, else defaults.
        self.segment_rules = self.strategies.segment_rules(learned)
        self.copurchase = (
            (plain(optional["copurchase_indptr"]), plain(optional["copurchase_items"]))
            if "copurchase_indptr" in optional
            else None
        )
        self.retriever = Retriever(
            self.vectors,
            artifact.index,
            artifact["item_popularity"],
            plain(artifact["segment_top_items"]),
            tuning or SearchTuning(),
        )
        # Columns copied above: drop their mapped pages from this process (~25 MB at 1M).
        for name in _COPIED_AT_LOAD:
            release(artifact[name])

    # Query side.
    def country_row(self, country: str) -> int:
        """Row of a country in the context/segment tables (the last row = unknown)."""
        row = self.catalog.country_row(country) if country else None
        return len(self.catalog.country_codes) if row is None else row

    def _trained_history(self, user_row: int | None) -> npt.NDArray[np.int64]:
        if user_row is None:
            return np.empty(0, dtype=np.int64)
        lo, hi = int(self.history_indptr[user_row]), int(self.history_indptr[user_row + 1])
        return self.history_items[max(lo, hi - self.history_length) : hi].astype(np.int64)

    def user_row(self, ctx: Context, profile: Profile) -> int | None:
        """The trained profile to use, None for unknown or forgotten shoppers."""
        if not ctx.user_id or profile.forgotten:
            return None
        return self.user_index.get(ctx.user_id)

    def is_personal(self, ctx: Context, profile: Profile) -> bool:
        return self.user_row(ctx, profile) is not None or bool(profile.recent)

    def encode(
        self, ctx: Context, profile: Profile, now_s: float, blend: Blend | None = None
    ) -> tuple[npt.NDArray[np.float32], bool]:
        """The query vector for a shopper in context, and whether it is personal.

        q = user + P @ weighted mean(history) + device + country, where history is
        the trained history followed by the session's items; a session item seen
        just now weighs 1 + session_boost, decaying to 1 with its half-life. With
        a sequential encoder, encoder(history) replaces P @ mean(history).
        """
        user_row = self.user_row(ctx, profile)
        q = self.context_device[ctx.device] + self.context_country[self.country_row(ctx.country)]
        if user_row is not None:
            q = q + self.user_embeddings[user_row]
        trained = self._trained_history(user_row)
        rows, weights = trained, None  # no session: the trained history's plain mean
        if profile.recent:
            recent = profile.recent[: self.history_length]
            session = self.catalog.lookup([item for item, _ in recent])
            keep = session >= 0
            # Oldest first, the session's items last (profile lists are newest first).
            rows = np.concatenate([trained, session[keep][::-1]])
            ages = np.array([now_s - ts for _, ts in recent])[keep][::-1]
            b = blend or self.blend
            decay = np.exp2(-np.maximum(ages, 0.0) / b.session_half_life_s)
            weights = np.concatenate([np.ones(trained.shape[0]), 1.0 + b.session_boost * decay])
        if rows.size and self.encoder is not None:
            q = q + self.encoder.encode(self.vectors.take(rows[-self.encoder.max_len :]))
        elif rows.size:
            vectors = self.vectors.take(rows)
            history = vectors.mean(axis=0) if weights is None else weights @ vectors / weights.sum()
            q = q + self.history_projection @ history
        return q.astype(np.float32, copy=False), user_row is not None or rows.size > trained.size

    def _compile(
        self, ctx: Context, filters: Filters, extra_exclude: npt.NDArray[np.int64] | None = None
    ) -> tuple[Compiled, str, float]:
        currency, rate = self.catalog.currency(ctx.currency)
        spec = self.catalog.filter_spec(
            filters, ctx.country, rate, () if extra_exclude is None else extra_exclude
        )
        return self.catalog.filters.compile(spec), currency, rate

    def _rows(self, ids: Sequence[str]) -> npt.NDArray[np.int64]:
        rows = self.catalog.lookup(ids) if ids else np.empty(0, np.int64)
        return rows[rows >= 0]

    # Reads.
    def plan(self, query: RecommendQuery, profile: Profile, now_s: float) -> placement.Plan:
        """Strategy, seeds and shopper segment; says which live lists to fetch."""
        return placement.plan(self, self.strategies, query, profile, now_s)

    def recommend(
        self,
        query: RecommendQuery,
        plan: placement.Plan,
        profile: Profile,
        live: Mapping[str, Sequence[str]],
        now_s: float,
        blend: Blend | None = None,
    ) -> Answer:
        """Run the placement's strategy under the request's filters."""
        currency, rate = self.catalog.currency(query.context.currency)
        flt, _ = placement.constrain(self, query, plan, profile, rate)
        placed = placement.execute(self, query, plan, profile, live, flt, now_s, blend)
        return Answer(
            placed.results,
            currency,
            rate,
            placed.personalized,
            reasons=placed.reasons,
            reason_items=placed.reason_items,
            strategy=placed.strategy,
            shopper_segment=placed.shopper_segment,
            traffic_source=placed.traffic_source,
        )

    def popular(self, query: PopularQuery, live: Sequence[str]) -> Answer:
        """Bestsellers (or trending) of the shopper's segment within the filters."""
        ctx = query.context
        flt, currency, rate = self._compile(ctx, query.filters)
        segment = (self.country_row(ctx.country), ctx.device)
        results = self.popular_list(
            segment,
            flt,
            query.k,
            live,
            Provenance.TRENDING if query.trending else Provenance.SEGMENT_POPULARITY,
        )
        name = segment_key(ctx.country, _DEVICE_NAMES[ctx.device] if ctx.device else "*")
        return Answer(results, currency, rate, False, segment=name)

    def popular_list(
        self,
        segment: tuple[int, int],
        flt: Compiled,
        k: int,
        live: Sequence[str],
        live_provenance: Provenance = Provenance.SEGMENT_POPULARITY,
    ) -> Results:
        """Live segment counts passing `flt` first, then the trained segment and catalog
        bestsellers; scores 1/(1+rank)."""
        rows = self._rows(live)
        rows = rows[flt.passes(rows)][:k] if rows.size else rows
        fill = self.retriever.popular(segment, flt, k + rows.shape[0])
        keep = ~np.isin(fill.ids, rows)
        ids = np.concatenate([rows, fill.ids[keep]])[:k]
        prov = np.concatenate(
            [np.full(rows.shape[0], live_provenance, np.int8), fill.provenance[keep]]
        )[:k]
        scores = (1.0 / (1.0 + np.arange(ids.shape[0]))).astype(np.float32)
        return Results(ids, scores, prov, "popularity")

    def also_bought(
        self,
        seeds: npt.NDArray[np.int64],
        live: Sequence[str],
        flt: Compiled,
        k: int,
    ) -> npt.NDArray[np.int64]:
        """Items co-purchased with the seeds: live counts first, then training's."""
        rows = [self._rows(live)]
        if self.copurchase is not None:
            indptr, items = self.copurchase
            for s in seeds.tolist():
                if s < indptr.shape[0] - 1:
                    rows.append(np.asarray(items[indptr[s] : indptr[s + 1]], dtype=np.int64))
        merged = np.concatenate(rows) if rows else np.empty(0, np.int64)
        if merged.size == 0:
            return merged
        _, first = np.unique(merged, return_index=True)
        merged = merged[np.sort(first)]
        return merged[flt.passes(merged)][:k]

    def recently_viewed(self, query: RecentQuery, profile: Profile) -> Answer:
        flt, currency, rate = self._compile(query.context, query.filters)
        rows = self._rows([item for item, _ in profile.recent])
        rows = rows[flt.passes(rows)][: query.k] if rows.size else rows
        scores = (1.0 / (1.0 + np.arange(rows.shape[0]))).astype(np.float32)
        results = Results.of(rows, scores, Provenance.RECENTLY_VIEWED, "recent")
        return Answer(results, currency, rate, True)

    def similar(self, query: SimilarQuery) -> Answer:
        seeds = self.catalog.lookup(query.seeds)
        if (seeds < 0).any():
            missing = tuple(s for s, row in zip(query.seeds, seeds, strict=True) if row < 0)
            raise UnknownItems("seed_item_ids", missing)
        flt, currency, rate = self._compile(query.context, query.filters, seeds)
        q = self.vectors.take(seeds).mean(axis=0).astype(np.float32)
        return Answer(self.retriever.search(q, flt, query.k), currency, rate, False)

    def rerank(
        self, query: RerankQuery, profile: Profile, now_s: float, blend: Blend | None = None
    ) -> Answer:
        ctx = query.context
        rows = self.catalog.lookup(query.candidates)
        known = rows >= 0
        flt, currency, rate = self._compile(ctx, query.filters)
        passing = known.copy()
        passing[known] = flt.passes(rows[known])
        ids = rows[passing]
        q, personal = self.encode(ctx, profile, now_s, blend)
        scores = (self.vectors.take(ids) @ q).astype(np.float32, copy=False)
        ids, scores = top_k(ids, scores, query.k or ids.shape[0])
        cands = query.candidates
        return Answer(
            Results.of(ids, scores, Provenance.RERANKED_CANDIDATE, "rerank"),
            currency,
            rate,
            personal,
            unknown_ids=tuple(cands[i] for i in np.flatnonzero(~known).tolist()),
            filtered_ids=tuple(cands[i] for i in np.flatnonzero(known & ~passing).tolist()),
        )

    # Writes.
    def resolve_events(
        self, events: Sequence[tuple[int, TrackedEvent]]
    ) -> tuple[list[tuple[int, StateEvent]], list[Rejected]]:
        """Check items exist and derive popularity segments and base-currency values."""
        accepted: list[tuple[int, StateEvent]] = []
        rejected: list[Rejected] = []
        for index, ev in events:
            ctx = ev.context
            row = self.catalog.ids.get(ev.item_id) if ev.item_id else None
            if ev.kind in _NEEDS_ITEM and (row is None or not self.catalog.alive[row]):
                rejected.append(
                    Rejected(index, ev.item_id, "item_id", f"unknown item {ev.item_id!r}")
                )
                continue
            if ev.context.currency and ev.context.currency not in self.catalog.rates:
                rejected.append(
                    Rejected(
                        index,
                        ev.item_id,
                        "context.currency",
                        f"no exchange rate for {ctx.currency!r}",
                    )
                )
                continue
            segments: tuple[str, ...] = ()
            if row is not None:
                device = _DEVICE_NAMES[ctx.device] if ctx.device else "*"
                ancestors = self.catalog.filters.ancestors(int(self.catalog.category[row]))
                segments = (
                    segment_key(ctx.country, device),
                    segment_key(ctx.country, "*"),
                    segment_key("", device),
                    segment_key("", "*"),
                    *(
                        segment_key(country, "*", self.catalog.category_names[c])
                        for c in ancestors
                        for country in ({ctx.country, ""} if ctx.country else {""})
                    ),
                )
            value = 0.0
            if ev.kind == PURCHASE:
                rate = self.catalog.rates.get(ctx.currency or self.catalog.base_currency, 1.0)
                value = ev.price * max(ev.quantity, 1) / rate
            accepted.append(
                (
                    index,
                    StateEvent(
                        key=shopper_key(ctx.user_id, ctx.session_id),
                        kind=ev.kind,
                        item_id=ev.item_id,
                        ts_s=ev.ts_s,
                        value=value,
                        segments=segments if ev.kind in (VIEW, ADD_TO_CART, PURCHASE) else (),
                    ),
                )
            )
        return accepted, rejected

    def item_vector(self, category: int, brand: int, base_price: float) -> npt.NDArray[np.float32]:
        """The content-tower embedding of an item the model never saw."""
        vec: npt.NDArray[np.float32] = self.tower_category[category].copy()
        if brand < self.tower_brand.shape[0]:
            vec += self.tower_brand[brand]
        bucket = int(np.searchsorted(self.price_edges, base_price, side="right"))
        vec += self.tower_price[min(bucket, self.tower_price.shape[0] - 1)]
        return vec.astype(np.float32)

    def upsert(self, items: Sequence[tuple[int, ItemUpdate]]) -> tuple[int, int, list[Rejected]]:
        """Apply item changes; new items become searchable before this returns."""
        created = updated = 0
        rejected: list[Rejected] = []
        new_rows: list[int] = []
        for index, item in items:
            existing = self.catalog.ids.get(item.item_id)
            problem = self.catalog.check(index, item, existing is not None)
            if problem is not None:
                rejected.append(problem)
                continue
            row, is_new = self.catalog.upsert(item)
            if is_new:
                created += 1
                new_rows.append(row)
            else:
                updated += 1
        if new_rows:
            rows = np.asarray(new_rows, dtype=np.int64)
            cat = self.catalog
            vecs = np.stack(
                [
                    self.item_vector(int(cat.category[r]), int(cat.brand[r]), float(cat.price[r]))
                    for r in new_rows
                ]
            )
            self.retriever.add(rows, vecs)
        return created, updated, rejected

    def delete(self, item_ids: Sequence[str]) -> tuple[int, tuple[str, ...]]:
        rows = self.catalog.lookup(item_ids)
        for row in rows[rows >= 0].tolist():
            self.catalog.delete(row)
        unknown = tuple(i for i, r in zip(item_ids, rows, strict=True) if r < 0)
        return int((rows >= 0).sum()), unknown

    def live_popular_segment(self, ctx: Context, categories: Sequence[str]) -> str:
        """The live-popularity segment a request reads."""
        if len(categories) == 1:
            return segment_key(ctx.country, "*", categories[0])
        return segment_key(ctx.country, _DEVICE_NAMES[ctx.device] if ctx.device else "*")

    def smoke_test(self) -> None:
        """One query through every stage; raises if the artifact cannot serve."""
        q, _ = self.encode(Context(), Profile(), 0.0)
        flt, _, _ = self._compile(Context(), Filters(in_stock_only=False))
        res = self.retriever.search(q, flt, min(10, max(1, len(self.catalog))))
        if len(self.catalog) and (res.ids.size == 0 or not np.all(np.isfinite(res.scores))):
            raise ValueError("smoke query returned no finite results")
        if not math.isfinite(float(np.abs(q).sum())):
            raise ValueError("query vector is not finite")


_DEVICE_NAMES = ("*", "mobile", "tablet", "desktop")


_COPIED_AT_LOAD = (
    "item_category", "item_brand", "item_price", "item_in_stock", "item_country_bits",
    "item_popularity",
)  # fmt: skip
