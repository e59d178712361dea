"""Filtered retrieval: choose a plan per request from the number of passing items.

Plans (see shared/notes/filtered-retrieval.md for the measurements behind them):
  exact  fewer than `exact_scan_max_items` pass: score exactly the passing items.
  ann    many pass: IVF search restricted by IDSelectorBitmap, nprobe scaled with
         1/selectivity so recall holds; over-fetch, mask, truncate; if the
         result is short, fall back to exact.
  popularity  cold start: segment bestsellers, then catalog bestsellers, within
         the same filters.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

from server.domain.filters import Compiled, test_ids
from server.domain.ranking import top_k


class Provenance(enum.IntEnum):
    """Which stage produced an item; values match RecommendedItem.Provenance."""

    ANN_RETRIEVAL = 1
    EXACT_SCAN = 2
    SEGMENT_POPULARITY = 3
    GLOBAL_POPULARITY = 4
    RERANKED_CANDIDATE = 5


@dataclass(frozen=True, slots=True)
class Results:
    """(ids, scores) best first, with the provenance of each and the plan that ran."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    provenance: npt.NDArray[np.int8]
    plan: str

    @classmethod
    def of(
        cls,
        ids: npt.NDArray[np.int64],
        scores: npt.NDArray[np.float32],
        provenance: Provenance,
        plan: str,
    ) -> Results:
        return cls(ids, scores, np.full(ids.shape[0], provenance, dtype=np.int8), plan)


@dataclass(frozen=True, slots=True)
class SearchTuning:
    exact_scan_max_items: int = 20_000
    ann_min_nprobe: int = 8
    ann_overfetch: float = 1.5


class Retriever:
    """Inner-product retrieval over one artifact's embeddings and FAISS index."""

    def __init__(
        self,
        embeddings: npt.NDArray[np.float32],
        index: faiss.Index,
        popularity: npt.NDArray[np.float32],
        segment_items: npt.NDArray[np.int32],
        tuning: SearchTuning,
    ) -> None:
        self.embeddings = embeddings
        self.index = index
        self.tuning = tuning
        self.segment_items = segment_items
        self.n = int(embeddings.shape[0])
        # Catalog bestsellers, best first; ties to the smaller index.
        self.popular_order = np.lexsort((np.arange(self.n), -np.asarray(popularity))).astype(
            np.int64
        )
        self.popular_rank = np.empty(self.n, dtype=np.int64)
        self.popular_rank[self.popular_order] = np.arange(self.n)
        try:
            self._ivf: faiss.IndexIVF | None = faiss.extract_index_ivf(index)
        except RuntimeError:
            self._ivf = None

    # Personalised and item-to-item search.
    def search(self, query: npt.NDArray[np.float32], flt: Compiled, k: int) -> Results:
        """Top-k items by query . embedding among those passing `flt`."""
        if flt.estimate == 0 or k == 0:
            return Results.of(
                np.empty(0, np.int64), np.empty(0, np.float32), Provenance.EXACT_SCAN, "empty"
            )
        if flt.estimate <= self.tuning.exact_scan_max_items:
            return self.exact(query, flt, k)
        found = self._ann(query, flt, k)
        if found.ids.shape[0] >= k:
            return found
        # Approximate search came back short although enough items pass: scan.
        return self.exact(query, flt, k, plan="ann_then_exact")

    def exact(
        self, query: npt.NDArray[np.float32], flt: Compiled, k: int, plan: str = "exact"
    ) -> Results:
        ids = flt.passing_ids()
        scores = self.embeddings[ids] @ query
        ids, scores = top_k(ids, scores.astype(np.float32, copy=False), k)
        return Results.of(ids, scores, Provenance.EXACT_SCAN, plan)

    def _ann(self, query: npt.NDArray[np.float32], flt: Compiled, k: int) -> Results:
        fetch = min(self.n, max(k, math.ceil(k * self.tuning.ann_overfetch)))
        selector = faiss.IDSelectorBitmap(flt.bits.nbytes, faiss.swig_ptr(flt.bits.view(np.uint8)))
        if self._ivf is not None:
            selectivity = flt.estimate / self.n
            nprobe = min(self._ivf.nlist, math.ceil(self.tuning.ann_min_nprobe / selectivity))
            params: faiss.SearchParameters = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(query.reshape(1, -1), fetch, params=params)
        ids64 = ids[0].astype(np.int64)
        keep = ids64 >= 0
        if flt.has_residual:
            keep[keep] = flt.residual(ids64[keep])
        return Results.of(ids64[keep][:k], scores[0][keep][:k], Provenance.ANN_RETRIEVAL, "ann")

    # Cold start.
    def popular(self, segment: tuple[int, int], flt: Compiled, k: int) -> Results:
        """Segment bestsellers passing `flt`, then catalog bestsellers; scores 1/(1+rank)."""
        seg = self.segment_items[segment]
        seg = seg[seg >= 0].astype(np.int64)
        picked = seg[flt.passes(seg)][:k] if seg.size else seg
        n_seg = picked.shape[0]
        if n_seg < k:
            fill = self._popular_fill(flt, k, picked)
            picked = np.concatenate([picked, fill])
        scores = (1.0 / (1.0 + np.arange(picked.shape[0]))).astype(np.float32)
        prov = np.full(picked.shape[0], Provenance.GLOBAL_POPULARITY, dtype=np.int8)
        prov[:n_seg] = Provenance.SEGMENT_POPULARITY
        return Results(picked, scores, prov, "popularity")

    def _popular_fill(
        self, flt: Compiled, k: int, already: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        need = k - already.shape[0]
        if flt.estimate <= self.tuning.exact_scan_max_items:
            # Few pass: rank just those by catalog popularity.
            ids = flt.passing_ids()
            ids = ids[~np.isin(ids, already)]
            return ids[np.argsort(self.popular_rank[ids], kind="stable")][:need]
        # Many pass: walk the bestseller list in chunks sized by the pass rate.
        out: list[npt.NDArray[np.int64]] = []
        got = 0
        start = 0
        chunk = max(256, math.ceil(4 * k * self.n / max(flt.estimate, 1)))
        while got < need and start < self.n:
            ids = self.popular_order[start : start + chunk]
            ids = ids[test_ids(flt.bits, ids)]
            if flt.has_residual:
                ids = ids[flt.residual(ids)]
            if already.size:
                ids = ids[~np.isin(ids, already)]
            out.append(ids)
            got += ids.shape[0]
            start += chunk
            chunk *= 2
        return np.concatenate(out)[:need] if out else np.empty(0, np.int64)
