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
    RECENTLY_VIEWED = 6
    TRENDING = 7
    ALSO_BOUGHT = 8
    CONTENT_SIMILAR = 9
    PINNED = 10


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


class Vectors:
    """Item embeddings: the artifact's (memory-mapped) rows, then rows added live."""

    def __init__(self, base: npt.NDArray[np.float32], capacity: int) -> None:
        self.base = base
        self.n_base = int(base.shape[0])
        self.n = self.n_base
        self.dim = int(base.shape[1])
        self.live = np.zeros((max(capacity - self.n_base, 0), self.dim), dtype=np.float32)

    def take(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(len(rows), dim) embeddings of `rows`."""
        if rows.size == 0 or int(rows.max()) < self.n_base:
            out: npt.NDArray[np.float32] = self.base[rows]
            return out
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        base = rows < self.n_base
        out[base] = self.base[rows[base]]
        out[~base] = self.live[rows[~base] - self.n_base]
        return out

    def set_live(self, row: int, vector: npt.NDArray[np.float32]) -> None:
        self.live[row - self.n_base] = vector
        self.n = max(self.n, row + 1)


@dataclass(frozen=True, slots=True)
class SearchTuning:
    exact_scan_max_items: int = 20_000
    ann_min_nprobe: int = 8
    ann_overfetch: float = 1.5


class Retriever:
    """Inner-product retrieval over one artifact's embeddings and FAISS index."""

    def __init__(
        self,
        vectors: Vectors,
        index: faiss.Index,
        popularity: npt.NDArray[np.float32],
        segment_items: npt.NDArray[np.int32],
        tuning: SearchTuning,
    ) -> None:
        self.vectors = vectors
        self.index = index
        self.tuning = tuning
        self.segment_items = segment_items
        # Catalog bestsellers, best first; ties to the smaller index. Live rows
        # have no history: they rank after every trained item.
        n = vectors.n_base
        self.popular_order = np.lexsort((np.arange(n), -np.asarray(popularity))).astype(np.int64)
        self.popular_rank = np.full(vectors.live.shape[0] + n, n, dtype=np.int64)
        self.popular_rank[self.popular_order] = np.arange(n)
        try:
            self._ivf: faiss.IndexIVF | None = faiss.extract_index_ivf(index)
        except RuntimeError:
            self._ivf = None

    @property
    def n(self) -> int:
        return self.vectors.n

    def add(self, rows: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        """Make new rows searchable (rows must continue the index's id sequence)."""
        if rows.size == 0:
            return
        if int(rows[0]) != self.index.ntotal:
            raise RuntimeError(
                f"live rows start at {int(rows[0])}, index holds {self.index.ntotal}"
            )
        for row, vec in zip(rows.tolist(), vectors, strict=True):
            self.vectors.set_live(row, vec)
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.popular_order = np.concatenate([self.popular_order, rows])

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
        scores = self.vectors.take(ids) @ query
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
