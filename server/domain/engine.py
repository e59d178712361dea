"""The recommendation engine: one loaded artifact answering Recommend, Rerank, SimilarItems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.artifact import Artifact
from server.domain.catalog import Catalog, IdIndex
from server.domain.errors import UnknownItems
from server.domain.filters import Compiled
from server.domain.query import Context, Filters, RecommendQuery, RerankQuery, SimilarQuery
from server.domain.ranking import top_k
from server.domain.retrieval import Provenance, Results, Retriever, SearchTuning


@dataclass(frozen=True, slots=True)
class Answer:
    """Results plus what the transport needs to render them."""

    results: Results
    currency: str
    rate: float  # base -> response currency
    personalized: bool
    unknown_ids: tuple[str, ...] = ()
    filtered_ids: tuple[str, ...] = ()


class Engine:
    """Read-only after construction; safe to share across concurrent requests."""

    def __init__(self, artifact: Artifact, tuning: SearchTuning | None = None) -> None:
        self.artifact = artifact
        self.model_version = artifact.manifest.model_version
        self.catalog = Catalog(artifact)
        self.embeddings: npt.NDArray[np.float32] = artifact["item_embeddings"]
        self.user_index = IdIndex(artifact["user_ids"])
        self.user_embeddings = artifact["user_embeddings"]
        self.history_indptr = artifact["user_history_indptr"]
        self.history_items = artifact["user_history_items"]
        self.history_projection = np.ascontiguousarray(artifact["history_projection"])
        self.context_device = np.ascontiguousarray(artifact["context_device"])
        self.context_country = np.ascontiguousarray(artifact["context_country"])
        self.history_length = artifact.manifest.history_length
        self.retriever = Retriever(
            self.embeddings,
            artifact.index,
            artifact["item_popularity"],
            artifact["segment_top_items"],
            tuning or SearchTuning(),
        )

    # Query side.
    def _country_row(self, country: str) -> int:
        row = self.catalog.country_row(country) if country else None
        return len(self.catalog.country_codes) if row is None else row

    def _history(self, user_row: int | None) -> npt.NDArray[np.int64]:
        if user_row is None:
            return np.empty(0, dtype=np.int64)
        lo, hi = int(self.history_indptr[user_row]), int(self.history_indptr[user_row + 1])
        return self.history_items[max(lo, hi - self.history_length) : hi].astype(np.int64)

    def encode(self, ctx: Context) -> tuple[npt.NDArray[np.float32], bool]:
        """The query vector for a shopper in context, and whether it is personal."""
        user_row = self.user_index.get(ctx.user_id) if ctx.user_id else None
        q = self.context_device[ctx.device] + self.context_country[self._country_row(ctx.country)]
        if user_row is not None:
            q = q + self.user_embeddings[user_row]
        history = self._history(user_row)
        if history.size:
            q = q + self.history_projection @ self.embeddings[history].mean(axis=0)
        return q.astype(np.float32, copy=False), user_row is not None

    def _compile(
        self, ctx: Context, filters: Filters, extra_exclude: npt.NDArray[np.int64] | None = None
    ) -> tuple[Compiled, str, float]:
        currency, rate = self.catalog.currency(ctx.currency)
        spec = self.catalog.filter_spec(
            filters, ctx.country, rate, () if extra_exclude is None else extra_exclude
        )
        return self.catalog.filters.compile(spec), currency, rate

    # RPCs.
    def recommend(self, query: RecommendQuery) -> Answer:
        ctx = query.context
        flt, currency, rate = self._compile(ctx, query.filters)
        q, personal = self.encode(ctx)
        if personal:
            results = self.retriever.search(q, flt, query.k)
        else:
            segment = (self._country_row(ctx.country), ctx.device)
            results = self.retriever.popular(segment, flt, query.k)
        return Answer(results, currency, rate, personal)

    def similar(self, query: SimilarQuery) -> Answer:
        seeds = self.catalog.ids.lookup(query.seeds)
        if (seeds < 0).any():
            missing = tuple(s for s, row in zip(query.seeds, seeds, strict=True) if row < 0)
            raise UnknownItems("seed_item_ids", missing)
        flt, currency, rate = self._compile(query.context, query.filters, seeds)
        q = self.embeddings[seeds].mean(axis=0).astype(np.float32)
        return Answer(self.retriever.search(q, flt, query.k), currency, rate, False)

    def rerank(self, query: RerankQuery) -> Answer:
        ctx = query.context
        rows = self.catalog.ids.lookup(query.candidates)
        known = rows >= 0
        flt, currency, rate = self._compile(ctx, query.filters)
        passing = np.zeros(rows.shape[0], dtype=bool)
        passing[known] = flt.passes(rows[known])
        ids = rows[passing]
        q, personal = self.encode(ctx)
        scores = (self.embeddings[ids] @ q).astype(np.float32, copy=False)
        k = query.k or ids.shape[0]
        ids, scores = top_k(ids, scores, k)
        cands = query.candidates
        return Answer(
            Results.of(ids, scores, Provenance.RERANKED_CANDIDATE, "rerank"),
            currency,
            rate,
            personal,
            unknown_ids=tuple(c for c, ok in zip(cands, known, strict=True) if not ok),
            filtered_ids=tuple(
                c for c, ok, p in zip(cands, known, passing, strict=True) if ok and not p
            ),
        )
