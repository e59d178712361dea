"""Filtered retrieval: choose a plan per request from the number of passing items.

Plans (see shared/notes/filtered-retrieval.md for the measurements behind them):
  exact  fewer than `exact_scan_max_items` pass, or scanning the IVF lists that
         hold enough of them would cost more: score exactly the passing items.
  ann    many pass: IVF search restricted by IDSelectorBitmap over the lists
         chosen for this filter (nearest centroids first, skipping lists with no
         passing items, until ann_min_nprobe lists' worth of passing items times
         selectivity ** (1/3) is scanned; a filter correlated with the embedding
         space, like a category, so probes where its items are); over-fetch,
         mask, truncate;
         if the result is short, fall back to exact.
  popularity  cold start: segment bestsellers, then catalog bestsellers, within
         the same filters.

The FAISS index is never written to: rows added live (UpsertItems) are scored
exactly and merged, so the index can be a read-only memory map shared by
every serving process on a host.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from server.domain.catalog import plain
from server.domain.filters import Compiled, Partitions, n_words, test_ids, to_ids
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
        self.base = plain(base)
        self.n_base = int(base.shape[0])
        self.n = self.n_base
        self.dim = int(base.shape[1])
        self.live = np.zeros((max(capacity - self.n_base, 0), self.dim), dtype=np.float32)

    def take(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(len(rows), dim) embeddings of `rows`."""
        # np.take gathers rows 3x faster than fancy indexing (measured at 2k-20k rows).
        if rows.size == 0 or int(rows.max()) < self.n_base:
            out: npt.NDArray[np.float32] = np.take(self.base, rows, axis=0)
            return out
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        base = rows < self.n_base
        out[base] = np.take(self.base, rows[base], axis=0)
        out[~base] = np.take(self.live, rows[~base] - self.n_base, axis=0)
        return out

    def set_live(self, row: int, vector: npt.NDArray[np.float32]) -> None:
        self.live[row - self.n_base] = vector
        self.n = max(self.n, row + 1)


@dataclass(frozen=True, slots=True)
class SearchTuning:
    exact_scan_max_items: int = 20_000
    ann_min_nprobe: int = 64
    ann_overfetch: float = 1.5
    # Category filters select a region of the embedding space: the nearest passing
    # items spread over more of its lists than a price or country filter's do. At 1M
    # items, 1.5x keeps recall@20 of root and leaf filters at 0.93-0.97 (0.89-0.93
    # without) at 3-10% selectivity (benchmarks/README.md).
    ann_category_factor: float = 1.5


# Plan cost model (ns, one thread), from shared/notes/filtered-retrieval.md and
# benchmarks/: an IVF probe pays per list and per id checked against the bitmap;
# an exact scan pays per passing item (gather + dot product).
_NS_PER_LIST = 150.0
_NS_PER_LISTED_ID = 3.5
_NS_ANN_FIXED = 40_000.0
_NS_PER_EXACT_ITEM = 20.0
_MEMO_MAX_ENTRIES = 256  # bestseller lists kept per compiled filter (segment x k)
# Compressed codes score approximately: fetch this many times more, rescore exactly
# from the embeddings. 8-bit scalar codes keep the exact top 20 within the top 30-40
# (benchmarks: same recall as IVF-Flat); product codes need more.
_SQ_OVERFETCH = 2
_PQ_OVERFETCH = 4


def _ivf_params(selector: faiss.IDSelector, nprobe: int) -> faiss.SearchParametersIVF:
    params = faiss.SearchParametersIVF()
    params.sel = selector
    params.nprobe = nprobe
    return params


def rescore_overfetch(index: faiss.Index | None) -> int:
    """1 when `index` scores exactly (flat codes, or no index), else how many times k
    to fetch before rescoring exactly."""
    if index is None:
        return 1
    kind = faiss.downcast_index(index)
    if isinstance(kind, (faiss.IndexIVFFlat, faiss.IndexFlat)):
        return 1
    return _SQ_OVERFETCH if isinstance(kind, faiss.IndexIVFScalarQuantizer) else _PQ_OVERFETCH


class IVFLayout:
    """The coarse partition of an IVF index: centroids, list sizes, and each row's list."""

    def __init__(self, ivf: faiss.IndexIVF) -> None:
        nlist = int(ivf.nlist)
        self.nlist = nlist
        self.lists = np.arange(nlist, dtype=np.int64)
        self.centroids = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, nlist))
        invlists = ivf.invlists
        assert invlists is not None
        self.sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        self.assign = np.full(int(ivf.ntotal), -1, dtype=np.int32)
        for i in np.flatnonzero(self.sizes).tolist():
            ids = faiss.rev_swig_ptr(invlists.get_ids(i), int(self.sizes[i]))
            self.assign[np.asarray(ids, dtype=np.int64)] = i
        self.overfetch = rescore_overfetch(ivf)


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
        order = np.lexsort((np.arange(n), -np.asarray(popularity))).astype(np.int64)
        # Room for live rows after the trained ones: appending must not copy the array.
        self._popular_buf = np.empty(n + vectors.live.shape[0], dtype=np.int64)
        self._popular_buf[:n] = order
        self.popular_order = self._popular_buf[:n]
        self.popular_rank = np.full(vectors.live.shape[0] + n, n, dtype=np.int64)
        self.popular_rank[self.popular_order] = np.arange(n)
        self.n_index = int(index.ntotal)  # rows the index holds; later rows are live
        try:
            self._ivf: faiss.IndexIVF | None = faiss.extract_index_ivf(index)
        except RuntimeError:
            self._ivf = None
        # Probing lists ourselves needs the index to *be* the IVF (no wrapper).
        direct = self._ivf is not None and isinstance(faiss.downcast_index(index), faiss.IndexIVF)
        self.layout = IVFLayout(self._ivf) if direct and self._ivf is not None else None
        self._overfetch = self.layout.overfetch if self.layout else rescore_overfetch(self._ivf)
        self._exact_codes = self._overfetch == 1

    @property
    def n(self) -> int:
        return self.vectors.n

    def add(self, rows: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        """Make new rows searchable (rows must continue the row sequence). They are
        scored exactly next to the index, which stays read-only."""
        if rows.size == 0:
            return
        if int(rows[0]) != self.vectors.n:
            raise RuntimeError(f"live rows start at {int(rows[0])}, expected {self.vectors.n}")
        for row, vec in zip(rows.tolist(), vectors, strict=True):
            self.vectors.set_live(row, vec)
        end = self.popular_order.shape[0] + rows.shape[0]
        self._popular_buf[self.popular_order.shape[0] : end] = rows
        self.popular_order = self._popular_buf[:end]

    # Personalised and item-to-item search.
    def search(self, query: npt.NDArray[np.float32], flt: Compiled, k: int) -> Results:
        """Top-k items by query . embedding among those passing `flt`."""
        if flt.estimate == 0 or k == 0:
            return Results.of(
                np.empty(0, np.int64), np.empty(0, np.float32), Provenance.EXACT_SCAN, "empty"
            )
        if flt.estimate <= self.tuning.exact_scan_max_items:
            return self.exact(query, flt, k)
        q = np.ascontiguousarray(query, dtype=np.float32)
        found = self._ann(q, flt, k)
        if found is None:  # probing the lists that hold passing items would cost more
            return self.exact(query, flt, k)
        if found.ids.shape[0] >= k:
            return found
        # Short although many pass: the exact price check dropped most of what was
        # fetched (a narrow band inside wide price buckets) or the lists held fewer
        # passing items than estimated. Look 4x further before scanning them all
        # (one such scan of 500k items measured 0.6 s in the bench).
        found = self._ann(q, flt, k, boost=4)
        if found is not None and found.ids.shape[0] >= k:
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

    def partitions(self, flt: Compiled) -> Partitions | None:
        """The per-list attribute counts of `flt`'s filter index for this IVF, counted on
        first use (load's smoke query) and kept current by the filter index."""
        if self.layout is None or flt.source is None:
            return None
        parts = flt.source.partitions
        if parts is None or parts.assign is not self.layout.assign:
            parts = flt.source.attach_partitions(self.layout.assign, self.layout.nlist)
        return parts

    def probes(
        self, query: npt.NDArray[np.float32], flt: Compiled, boost: int = 1
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None:
        """(lists, centroid scores) to probe for this filter, best first; None when the
        filter's per-list counts are unknown."""
        layout = self.layout
        parts = self.partitions(flt)
        pe = flt.partition_estimates(parts) if parts is not None else None
        if layout is None or pe is None:
            return None
        if pe.total <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        # Passing items to scan: an unfiltered search scans ann_min_nprobe lists; a
        # filter passing a fraction s of the catalog needs fewer passing items for the
        # same recall (its top k are deeper neighbours, spread over more lists):
        # s ** (1/3) fits recall >= 0.95 from 100% down to 3% on the bench catalog.
        selectivity = min(1.0, flt.estimate / max(self.n, 1))
        target = self.tuning.ann_min_nprobe * self.n_index / layout.nlist * selectivity ** (1 / 3)
        spec = flt.spec
        if spec is not None and (
            spec.include_categories is not None or spec.require_category is not None
        ):
            target *= self.tuning.ann_category_factor
        # In the estimate's own (unscaled) units: scaling 4,000 estimates per request
        # would cost more than the arithmetic on one number.
        est = pe.unscaled
        target = min(target * boost * pe.total / max(flt.estimate, 1), pe.total)
        cs = layout.centroids @ query
        # Sort only the best-scoring lists that can reach the target (a few x its
        # expected count); sort them all only if those fall short. Most filters' items
        # sit in every list: then no gather of the lists that hold them.
        holding = pe.holding
        n_holding = layout.nlist if holding is None else holding.shape[0]
        guess = 4 * math.ceil(target * n_holding / pe.total) + 16
        order: npt.NDArray[np.integer[Any]] = layout.lists if holding is None else holding
        if guess < n_holding:
            held = cs if holding is None else cs[holding]
            top: npt.NDArray[np.integer[Any]] = np.argpartition(held, n_holding - guess)[-guess:]
            if holding is not None:
                top = holding[top]
            if float(est[top].sum()) >= target:
                order = top
        order = order[np.argsort(-cs[order], kind="stable")]
        m = int(np.searchsorted(np.cumsum(est[order]), target * (1 - 1e-9))) + 1
        lists = order[: min(m, order.shape[0])].astype(np.int64, copy=False)
        return lists, cs[lists].astype(np.float32)

    def _ann(
        self, query: npt.NDArray[np.float32], flt: Compiled, k: int, boost: int = 1
    ) -> Results | None:
        fetch = max(k, math.ceil(k * self.tuning.ann_overfetch)) * (2 * boost if boost > 1 else 1)
        fetch *= self._overfetch
        fetch = min(self.n_index, fetch)
        selector = faiss.IDSelectorBitmap(flt.bits.nbytes, faiss.swig_ptr(flt.bits.view(np.uint8)))
        chosen = self.probes(query, flt, boost)
        if chosen is not None and self._ivf is not None:
            lists, coarse = chosen
            if lists.shape[0] == 0:  # no indexed item passes: only live rows can
                return None
            assert self.layout is not None
            listed = float(self.layout.sizes[lists].sum())
            ann_ns = _NS_ANN_FIXED + _NS_PER_LIST * lists.shape[0] + _NS_PER_LISTED_ID * listed
            if _NS_PER_EXACT_ITEM * flt.estimate < ann_ns:
                return None
            scores = np.empty((1, fetch), dtype=np.float32)
            ids = np.empty((1, fetch), dtype=np.int64)
            keys = np.ascontiguousarray(lists.reshape(1, -1), dtype=np.int64)
            coarse = np.ascontiguousarray(coarse.reshape(1, -1))
            ivf: Any = self._ivf  # search_preassigned_c (with params) is not in faiss's stubs
            ivf.search_preassigned_c(
                1,
                faiss.swig_ptr(query),
                fetch,
                faiss.swig_ptr(keys),
                faiss.swig_ptr(coarse),
                faiss.swig_ptr(scores),
                faiss.swig_ptr(ids),
                False,
                _ivf_params(selector, int(lists.shape[0])),
            )
        else:
            params = faiss.SearchParameters()
            params.sel = selector
            if self._ivf is not None:
                selectivity = flt.estimate / self.n
                nprobe = math.ceil(self.tuning.ann_min_nprobe * boost / selectivity)
                nprobe = min(self._ivf.nlist, nprobe)
                params = _ivf_params(selector, nprobe)
            scores, ids = self.index.search(query.reshape(1, -1), fetch, params=params)
        ids64 = ids[0].astype(np.int64)
        keep = ids64 >= 0
        if flt.has_residual:
            keep[keep] = flt.residual(ids64[keep])
        found_ids, found_scores = ids64[keep], scores[0][keep]
        if not self._exact_codes and found_ids.size:
            found_scores = (self.vectors.take(found_ids) @ query).astype(np.float32)
        live_ids, live_scores = self._live(query, flt)
        if live_ids.size:
            found_ids = np.concatenate([found_ids, live_ids])
            found_scores = np.concatenate([found_scores, live_scores])
        if live_ids.size or not self._exact_codes:
            found_ids, found_scores = top_k(found_ids, found_scores, k)
        else:
            found_ids, found_scores = found_ids[:k], found_scores[:k]
        return Results.of(found_ids, found_scores, Provenance.ANN_RETRIEVAL, "ann")

    def _live(
        self, query: npt.NDArray[np.float32], flt: Compiled
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Rows added after the index was built that pass `flt`, scored exactly."""
        n = self.vectors.n
        if n <= self.n_index:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        first = self.n_index >> 6
        ids = to_ids(flt.bits[first : n_words(n)]) + first * 64
        ids = ids[(ids >= self.n_index) & (ids < n)]
        if flt.has_residual:
            ids = ids[flt.residual(ids)]
        return ids, (self.vectors.take(ids) @ query).astype(np.float32)

    # Cold start.
    def popular(self, segment: tuple[int, int], flt: Compiled, k: int) -> Results:
        """Segment bestsellers passing `flt`, then catalog bestsellers; scores 1/(1+rank).
        The arrays are read-only: requests with the same filters share them (any item
        change drops the filter index's cache, and with it these)."""
        key = ("popular", segment, k)
        cached: Results | None = flt.memo.get(key)
        if cached is not None:
            return cached
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
        for a in (picked, scores, prov):
            a.flags.writeable = False
        found = Results(picked, scores, prov, "popularity")
        if len(flt.memo) < _MEMO_MAX_ENTRIES:
            flt.memo[key] = found
        return found

    def _popular_fill(
        self, flt: Compiled, k: int, already: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        need = k - already.shape[0]
        if flt.estimate <= self.tuning.exact_scan_max_items:
            # Few pass: rank just those by catalog popularity.
            ids = flt.passing_ids()
            ids = ids[~np.isin(ids, already)]
            # Rank, ties (live rows) to the smaller id: a distinct key, so a partial
            # sort of the head gives the same order as a full stable sort.
            key = self.popular_rank[ids] * max(ids.shape[0], 1) + np.arange(ids.shape[0])
            if need < ids.shape[0]:
                head = np.argpartition(key, need - 1)[:need]
                ids, key = ids[head], key[head]
            return ids[np.argsort(key)][:need]
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
