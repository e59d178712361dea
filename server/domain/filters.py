"""Hard filters as packed bitmaps: precomputed per attribute, ANDed per request.

An item bitmap is a uint64 array of w = ceil(n / 64) words; bit i of word j is
item 64*j + i (the little-endian layout faiss.IDSelectorBitmap reads as bytes).
Evaluating filters from raw columns costs ~1 ms at 1M items; ANDing these
costs microseconds (see shared/notes/filtered-retrieval.md).

Price is the one filter a bitmap holds only approximately: price buckets give a
superset, and `Compiled.residual` checks the exact converted price of the few
candidate ids that reach it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

U64 = np.uint64

# Values derived from a compiled filter, by any hashable key (a name, or a tuple).
Memo = dict[Hashable, Any]
# Word ranges [lo, hi) of a bitmap, ascending and disjoint.
Spans = tuple[tuple[int, int], ...]

_PRICE_BUCKETS = 128


def n_words(n: int) -> int:
    return (n + 63) // 64


def pack(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """Pack a bool mask (n,) into an item bitmap (w,)."""
    w = n_words(mask.shape[0])
    packed = np.packbits(mask, bitorder="little")
    out = np.zeros(w * 8, dtype=np.uint8)
    out[: packed.shape[0]] = packed
    return out.view(U64)


def from_ids(ids: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.uint64]:
    """Bitmap with the bits of `ids` set."""
    words = np.zeros(n_words(n), dtype=U64)
    np.bitwise_or.at(words, ids >> 6, np.left_shift(U64(1), (ids & 63).astype(U64)))
    return words


def clear_ids(bits: npt.NDArray[np.uint64], ids: npt.NDArray[np.int64]) -> None:
    """Clear the bits of `ids` in place."""
    np.bitwise_and.at(bits, ids >> 6, ~np.left_shift(U64(1), (ids & 63).astype(U64)))


def test_ids(bits: npt.NDArray[np.uint64], ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Whether each of `ids` has its bit set."""
    out: npt.NDArray[np.bool_] = ((bits[ids >> 6] >> (ids & 63).astype(U64)) & U64(1)).astype(bool)
    return out


# Set-bit positions of every byte value, for to_ids: _BYTE_BITS[_BYTE_START[v]:][:popcount(v)].
_BYTE_COUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)
_BYTE_START = np.concatenate([[0], np.cumsum(_BYTE_COUNT)[:-1]]).astype(np.int64)
_BYTE_BITS = np.array([j for v in range(256) for j in range(8) if v >> j & 1], dtype=np.int64)


_UNPACK_MAX_WORDS = 4096


def to_ids(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Ascending ids of the set bits.

    A span of up to _UNPACK_MAX_WORDS words (a category's) is unpacked bit by bit:
    4-10x faster than sparse_ids for a 300-word span at any density, still ahead at
    3,000 words. A whole 1M catalog's bitmap goes through sparse_ids, whose cost grows
    with the non-zero bytes only (4x faster than unpacking at 0.1% density, 1.6x at
    1%, even at 10%).
    """
    return unpacked_ids(bits) if bits.shape[0] <= _UNPACK_MAX_WORDS else sparse_ids(bits)


def unpacked_ids(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    unpacked = np.unpackbits(bits.view(np.uint8), bitorder="little").view(np.bool_)
    return np.flatnonzero(unpacked)


def sparse_ids(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Non-zero words, then their non-zero bytes, then each byte's set bits from a
    256-entry table. `x != 0` before flatnonzero: numpy's bool path is ~4x faster than
    its integer one (why unpacked_ids views its 0/1 bytes as bools)."""
    nz_words = np.flatnonzero(bits != 0)
    if nz_words.size == 0:
        return np.empty(0, dtype=np.int64)
    as_bytes = bits[nz_words].view(np.uint8)
    nz_bytes = np.flatnonzero(as_bytes != 0)
    values = as_bytes[nz_bytes]
    first_bit = (nz_words[nz_bytes >> 3].astype(np.int64) << 6) + ((nz_bytes & 7) << 3)
    per_byte = _BYTE_COUNT[values]
    if int(per_byte.sum()) == values.shape[0]:  # sparse: one bit per byte, no expansion
        sparse: npt.NDArray[np.int64] = first_bit + _BYTE_BITS[_BYTE_START[values]]
        return sparse
    owner = np.repeat(np.arange(values.shape[0]), per_byte)
    rank = np.arange(owner.shape[0]) - (np.cumsum(per_byte) - per_byte)[owner]
    out: npt.NDArray[np.int64] = first_bit[owner] + _BYTE_BITS[_BYTE_START[values][owner] + rank]
    return out


def count(bits: npt.NDArray[np.uint64]) -> int:
    return int(np.bitwise_count(bits).sum())


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """Filters resolved to catalog indexes. None = open.

    Prices are in the request currency; `rate` converts base-currency prices
    into it, and the exact check compares converted prices, the ones returned.
    """

    country: int | None = None  # index into country codes; -1 = a country nothing ships to
    min_price: float | None = None
    max_price: float | None = None
    rate: float = 1.0
    include_categories: tuple[int, ...] | None = None  # None = all; () = none exists
    exclude_categories: tuple[int, ...] = ()
    brands: tuple[int, ...] | None = None  # None = all; () = none exists
    in_stock_only: bool = True
    exclude_items: tuple[int, ...] = ()
    require_category: int | None = None  # ANDed (a strategy's same-category constraint)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A request's filters: a candidate bitmap plus the exact price residual."""

    bits: npt.NDArray[np.uint64]
    estimate: int  # popcount of bits: exact unless a price bound is set
    min_price: float | None  # request currency
    max_price: float | None
    rate: float
    prices: npt.NDArray[np.float64]  # the catalog's base-currency price column
    spec: FilterSpec | None = None  # what was compiled, for per-partition estimates
    source: FilterIndex | None = None
    # Word ranges [lo, hi) outside which every bit is 0 (None: anywhere).
    spans: Spans | None = None
    # Derived values, computed on first use: `memo` for these bits, `shared` for every
    # request with the same filters bar excluded items (the filter index's cache entry).
    memo: Memo = field(default_factory=dict, compare=False, repr=False)
    shared: Memo = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_residual(self) -> bool:
        return self.min_price is not None or self.max_price is not None

    def residual(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Exact price check for ids already known to pass `bits`."""
        keep = np.ones(ids.shape[0], dtype=bool)
        converted = self.prices[ids] * self.rate
        if self.min_price is not None:
            keep &= converted >= self.min_price
        if self.max_price is not None:
            keep &= converted <= self.max_price
        return keep

    def passes(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Exact membership of arbitrary ids."""
        ok = test_ids(self.bits, ids)
        if self.has_residual:
            ok &= self.residual(ids)
        return ok

    def passing_ids(self) -> npt.NDArray[np.int64]:
        """Ascending ids of the passing items (read-only: may be shared by requests)."""
        ids: npt.NDArray[np.int64] | None = self.memo.get("ids")
        if ids is None:
            ids = (
                to_ids(self.bits)
                if self.spans is None
                else _concat([to_ids(self.bits[lo:hi]) + (lo << 6) for lo, hi in self.spans])
            )
            if self.has_residual:
                ids = ids[self.residual(ids)]
            ids.flags.writeable = False
            if ids.shape[0] <= _MEMO_MAX_IDS:
                self.memo["ids"] = ids
        return ids

    def partition_estimates(self, partitions: Partitions) -> PartitionEstimate | None:
        """The per-partition estimates before rescaling to this filter's count, and what
        list choice derives from them; None if unknown."""
        if self.spec is None or self.source is None or self.source.partitions is not partitions:
            return None
        # Excluded items do not enter the estimate: share it across such requests.
        pe: PartitionEstimate | None = self.shared.get("partition_estimate")
        if pe is None or pe.partitions is not partitions:
            unscaled, total = partitions.unscaled_estimate(self.spec, self.source)
            holding = np.flatnonzero(unscaled > 0).astype(np.int32)
            every = holding.shape[0] == unscaled.shape[0]
            pe = PartitionEstimate(partitions, unscaled, total, None if every else holding)
            self.shared["partition_estimate"] = pe
        return pe


@dataclass(frozen=True, slots=True)
class PartitionEstimate:
    """A filter's expected passing items per partition, before rescaling to its exact
    count (`Compiled.estimate`), with the partitions expected to hold any. Kept with the
    compiled filter: every request with the same filters bar exclusions reuses it."""

    partitions: Partitions
    unscaled: npt.NDArray[np.float64]
    total: float  # unscaled.sum()
    # Ascending partitions with unscaled > 0; None when every partition has some (most
    # filters but category ones): not kept, 16 KB per cached filter at 4,000 lists.
    holding: npt.NDArray[np.int32] | None

    def expected(self, estimate: int) -> npt.NDArray[np.float64]:
        """Expected passing items per partition for a filter passing `estimate` items."""
        return self.unscaled * (estimate / self.total) if self.total > 0 else self.unscaled.copy()


def _concat(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


_MEMO_MAX_IDS = 16_384  # passing ids kept with a compiled filter (exact-scan sized)
# Compiled filters kept for repeated requests: their bitmaps' words plus an allowance
# for what requests memoise with them (passing ids, bestsellers, list estimates). At
# 1M items: ~50 filters over the whole catalog, ~230 over one leaf category's span.
_COMPILED_CACHE_BYTES = 8 << 20
_MEMO_ALLOWANCE_BYTES = 32 << 10


@dataclass(frozen=True, slots=True)
class _Kept:
    """A compiled filter kept for reuse. A filter whose spans cover under half the
    catalog keeps only their words (a leaf category's 350 of 15,625 at 1M items) and
    is expanded into a fresh bitmap on reuse; a broader one keeps its bitmap, shared
    read-only by every request that reuses it."""

    words: npt.NDArray[np.uint64]  # the spans' words back to back, or the whole bitmap
    whole: bool
    estimate: int
    shared: Memo
    spans: Spans

    @classmethod
    def of(cls, bits: npt.NDArray[np.uint64], estimate: int, spans: Spans) -> _Kept:
        if 2 * sum(hi - lo for lo, hi in spans) >= bits.shape[0]:
            bits.flags.writeable = False  # shared by every request with these filters
            return cls(bits, True, estimate, {}, spans)
        words = np.concatenate([bits[lo:hi] for lo, hi in spans]) if spans else bits[:0]
        return cls(words, False, estimate, {}, spans)

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes) + _MEMO_ALLOWANCE_BYTES

    def bitmap(self, n_words: int) -> npt.NDArray[np.uint64]:
        """The whole bitmap: the kept one (shared), or a fresh one from the words."""
        if self.whole:
            return self.words
        bits = np.zeros(n_words, dtype=U64)
        start = 0
        for lo, hi in self.spans:
            bits[lo:hi] = self.words[start : start + hi - lo]
            start += hi - lo
        return bits


def _set(bits: npt.NDArray[np.uint64], row: int, on: bool) -> None:
    """Set or clear one item's bit in a bitmap (or in every row of a 2-d stack)."""
    mask = U64(1) << U64(row & 63)
    if on:
        bits[..., row >> 6] |= mask
    else:
        bits[..., row >> 6] &= ~mask


_NO_SPAN = (1 << 62, 0)  # empty: the identity of _hull, the zero of _meet


def _no_spans(k: int) -> npt.NDArray[np.int64]:
    """(k, 2) empty spans."""
    return np.tile(np.array(_NO_SPAN, dtype=np.int64), (k, 1))


def _hull(a: Any, b: Any) -> npt.NDArray[np.int64]:
    """The smallest word span covering spans a and b."""
    return np.array([min(int(a[0]), int(b[0])), max(int(a[1]), int(b[1]))], dtype=np.int64)


def _hull_all(spans: npt.NDArray[np.int64]) -> tuple[int, int]:
    """The hull of (m, 2) spans; empty when m is 0."""
    return (int(spans[:, 0].min()), int(spans[:, 1].max())) if spans.size else _NO_SPAN


def _meet(a: tuple[int, int], b: Any) -> tuple[int, int]:
    return max(a[0], int(b[0])), min(a[1], int(b[1]))


def _merge(spans: list[tuple[int, int]]) -> Spans:
    """Non-empty spans, sorted, overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(sp for sp in spans if sp[1] > sp[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


class FilterIndex:
    """Per-attribute bitmaps for one catalog, built once at load (~0.2 s per 1M items)
    and kept current by the live catalog (`update_item`).

    Bitmaps are sized for `capacity` items so live additions need no reallocation;
    `alive_bits` marks the rows that exist (not yet added or deleted rows are 0).
    """

    def __init__(
        self,
        *,
        category: npt.NDArray[np.int32],
        category_parent: npt.NDArray[np.int32],
        brand: npt.NDArray[np.int32],
        n_brands: int,
        price: npt.NDArray[np.float64],
        in_stock: npt.NDArray[np.bool_],
        country_bits: npt.NDArray[np.uint64],
        capacity: int | None = None,
        live_price: npt.NDArray[np.float64] | None = None,
    ) -> None:
        """`live_price` is the catalog's (capacity-sized, mutable) price column that
        exact price checks read; it defaults to `price`."""
        n = int(category.shape[0])
        cap = max(n, capacity or n)
        w = n_words(cap)
        self.n = n
        self.capacity = cap
        self.parent = np.asarray(category_parent)
        self.category_col = np.full(cap, -1, dtype=np.int32)  # current leaf of each row
        self.category_col[:n] = category
        self.partitions: Partitions | None = None
        alive = np.zeros(cap, dtype=bool)
        alive[:n] = True
        self.alive_bits = pack(alive)
        stock = np.zeros(cap, dtype=bool)
        stock[:n] = in_stock
        self.stock_bits = pack(stock)
        self.country_bits = np.zeros((country_bits.shape[0], w), dtype=U64)
        self.country_bits[:, : country_bits.shape[1]] = country_bits
        self.category_bits = self._category_bits(np.asarray(category), w)
        # Word spans: the [lo, hi) words of each category's and brand's trained rows
        # (rows < n). Catalogs exported in category order (Dataset.clustered) keep a
        # category in a few hundred words of 1M items' 15,625, and compile ANDs only
        # those. Rows added live sit in the tail, which every compile covers.
        self.end_row = n  # rows >= n that were ever added end before this
        self.category_span = self._spans(np.asarray(category), k=int(self.parent.shape[0]))
        for c in np.flatnonzero(self.category_span[:, 1] > 0).tolist():
            for a in self.ancestors(c)[1:]:
                self.category_span[a] = _hull(self.category_span[a], self.category_span[c])
        self.brand_span = self._spans(np.asarray(brand), k=n_brands)
        # Brands can number in the thousands: keep id lists, build bitmaps on demand.
        # Live changes go to `brand_extra` (new brand -> rows) and `brand_moved`
        # (rows whose base-list entry is stale).
        order = np.argsort(brand, kind="stable").astype(np.int64)
        self.brand_items = order
        self.brand_indptr = np.searchsorted(brand[order], np.arange(n_brands + 1)).astype(np.int64)
        self.brand_extra: dict[int, set[int]] = {}
        self.brand_moved = np.zeros(w, dtype=U64)
        # Built brand bitmaps, least recently used first, bounded to ~32 MB.
        self._brand_cache: OrderedDict[int, npt.NDArray[np.uint64]] = OrderedDict()
        self._brand_cache_size = max(4, (32 << 20) // max(w * 8, 1))
        # Compiled filters by spec without excluded items, least recently used first,
        # within _COMPILED_CACHE_BYTES; any item change clears them.
        self._compiled: OrderedDict[FilterSpec, _Kept] = OrderedDict()
        self._compiled_bytes = 0
        # Cumulative price buckets: le_bits[j] = items priced <= edges[j]; items
        # above the last edge (live price rises) sit in no bucket.
        price = np.asarray(price)
        self.price = price if live_price is None else live_price
        qs = np.linspace(0, 1, _PRICE_BUCKETS + 1)[1:]
        self.price_edges = np.unique(np.quantile(price, qs)) if n else np.zeros(0)
        price_order = np.argsort(price, kind="stable")
        ends = np.searchsorted(price[price_order], self.price_edges, side="right")
        self.price_le_bits = np.zeros((self.price_edges.shape[0], w), dtype=U64)
        running = np.zeros(cap, dtype=bool)
        start = 0
        for j, end in enumerate(ends):
            running[price_order[start:end]] = True
            self.price_le_bits[j] = pack(running)
            start = end

    @staticmethod
    def _spans(values: npt.NDArray[np.int32], k: int) -> npt.NDArray[np.int64]:
        """(k, 2) word spans [lo, hi) of the rows holding each value 0..k-1 (negative
        values hold no row)."""
        spans = _no_spans(k)
        rows = np.flatnonzero(values >= 0)
        if rows.size:
            v = values[rows].astype(np.int64)
            seen, first = np.unique(v, return_index=True)
            _, last = np.unique(v[::-1], return_index=True)
            spans[seen, 0] = rows[first] >> 6
            spans[seen, 1] = (rows[rows.size - 1 - last] >> 6) + 1
        return spans

    def _widen(self, spans: npt.NDArray[np.int64], key: int, row: int) -> None:
        """Make span `key` cover trained row `row` (live rows are in the tail)."""
        if row < self.n:
            spans[key] = _hull(spans[key], (row >> 6, (row >> 6) + 1))

    def ancestors(self, category: int) -> list[int]:
        """The category and its ancestors, leaf first."""
        chain: list[int] = []
        c = category
        while c >= 0 and len(chain) <= self.parent.shape[0]:
            chain.append(c)
            c = int(self.parent[c])
        return chain

    def _category_bits(self, category: npt.NDArray[np.int32], w: int) -> npt.NDArray[np.uint64]:
        k = int(self.parent.shape[0])
        bits = np.zeros((k, w), dtype=U64)
        order = np.argsort(category, kind="stable")
        bounds = np.searchsorted(category[order], np.arange(k + 1))
        for c in range(k):
            members = order[bounds[c] : bounds[c + 1]].astype(np.int64)
            if members.size:
                leaf = from_ids(members, w * 64)
                for a in self.ancestors(c):
                    bits[a] |= leaf
        return bits

    def _price_bucket(self, price: float) -> int:
        """First j with price <= edges[j] (len(edges) if above every edge)."""
        return int(np.searchsorted(self.price_edges, price, side="left"))

    def update_item(
        self,
        row: int,
        *,
        alive: bool,
        category: tuple[int, int] | None = None,  # (old or -1, new)
        brand: tuple[int, int] | None = None,  # (old or -1, new)
        price: tuple[float | None, float] | None = None,  # (old or None, new)
        in_stock: bool | None = None,
        countries: npt.NDArray[np.bool_] | None = None,  # (c,) availability
    ) -> None:
        """Apply one item's changed attributes to every bitmap (live catalog)."""
        self._compiled.clear()
        self._compiled_bytes = 0
        self.end_row = max(self.end_row, row + 1)
        if self.partitions is not None:
            self.partitions.update(self, row, category, price, in_stock, countries)
        if category is not None:
            self.category_col[row] = category[1]
            old, new = category
            # Index rows and word together: category_bits[ancestors] alone is a copy.
            mask = U64(1) << U64(row & 63)
            if old >= 0:
                self.category_bits[self.ancestors(old), row >> 6] &= ~mask
            self.category_bits[self.ancestors(new), row >> 6] |= mask
            for a in self.ancestors(new):
                self._widen(self.category_span, a, row)
        if brand is not None:
            old, new = brand
            # A moved row changes both brands' bitmaps (and brand_moved, read by all).
            self._brand_cache.clear()
            if old >= 0:
                self.brand_extra.get(old, set()).discard(row)
            if row < self.n:
                _set(self.brand_moved, row, True)
            self.brand_extra.setdefault(new, set()).add(row)
            if new >= self.brand_span.shape[0]:  # a brand added live
                grow = _no_spans(new + 1 - len(self.brand_span))
                self.brand_span = np.vstack([self.brand_span, grow])
            self._widen(self.brand_span, new, row)
        if price is not None:
            old_price, new_price = price
            if old_price is not None:
                _set(self.price_le_bits[self._price_bucket(old_price) :], row, False)
            _set(self.price_le_bits[self._price_bucket(new_price) :], row, True)
        if in_stock is not None:
            _set(self.stock_bits, row, in_stock)
        if countries is not None:  # every country's bit of this row in one operation
            mask = U64(1) << U64(row & 63)
            column = self.country_bits[:, row >> 6]
            self.country_bits[:, row >> 6] = np.where(countries, column | mask, column & ~mask)
        _set(self.alive_bits, row, alive)

    def _brand_bitmap(self, brand: int) -> npt.NDArray[np.uint64]:
        """One brand's bitmap, from its id list; the most recently used are cached
        (~0.2 ms to build for a 10k-item brand at 1M items, us to reuse)."""
        cached = self._brand_cache.get(brand)
        if cached is not None:
            self._brand_cache.move_to_end(brand)
            return cached
        n_bits = self.alive_bits.shape[0] * 64
        if brand < self.brand_indptr.shape[0] - 1:
            ids = self.brand_items[self.brand_indptr[brand] : self.brand_indptr[brand + 1]]
            bits = from_ids(ids, n_bits)
            bits &= ~self.brand_moved
        else:
            bits = np.zeros_like(self.alive_bits)
        extra = self.brand_extra.get(brand)
        if extra:
            bits |= from_ids(np.fromiter(extra, dtype=np.int64, count=len(extra)), n_bits)
        self._brand_cache[brand] = bits
        if len(self._brand_cache) > self._brand_cache_size:
            self._brand_cache.popitem(last=False)
        return bits

    def compile(self, spec: FilterSpec) -> Compiled:
        """The request's bitmap: repeated filters (the same country, stock, categories,
        brands and prices) reuse what was compiled last time (_Kept), then clear their
        excluded items (in a copy if the bitmap is shared)."""
        base = dataclasses.replace(spec, exclude_items=()) if spec.exclude_items else spec
        kept = self._compiled.get(base)
        if kept is None:
            spans = self._window(base)
            bits = np.zeros_like(self.alive_bits)
            for lo, hi in spans:
                bits[lo:hi] = self._bits(base, slice(lo, hi))
            kept = _Kept.of(bits, sum(count(bits[lo:hi]) for lo, hi in spans), spans)
            self._keep(base, kept)
        else:
            self._compiled.move_to_end(base)
            bits = kept.bitmap(self.alive_bits.shape[0])
        estimate, shared, spans = kept.estimate, kept.shared, kept.spans
        memo = shared
        if spec.exclude_items:
            excluded = np.unique(np.asarray(spec.exclude_items, dtype=np.int64))
            estimate -= int(test_ids(bits, excluded).sum())
            if kept.whole:  # the cache's bitmap: this request's exclusions go in a copy
                bits = bits.copy()
            clear_ids(bits, excluded)
            memo = {}
        bits.flags.writeable = False  # requests with these filters may share it
        return Compiled(
            bits=bits,
            estimate=estimate,
            min_price=spec.min_price,
            max_price=spec.max_price,
            rate=spec.rate,
            prices=self.price,
            spec=spec,
            source=self,
            spans=spans,
            memo=memo,
            shared=shared,
        )

    def _keep(self, base: FilterSpec, kept: _Kept) -> None:
        self._compiled[base] = kept
        self._compiled_bytes += kept.nbytes
        while self._compiled_bytes > _COMPILED_CACHE_BYTES and len(self._compiled) > 1:
            _, old = self._compiled.popitem(last=False)
            self._compiled_bytes -= old.nbytes

    def _window(self, spec: FilterSpec) -> Spans:
        """The word spans that can hold rows passing `spec`: trained rows inside every
        category and brand span it requires, and the live tail."""
        span = (0, n_words(self.n))
        if spec.include_categories is not None:  # in any of them: the hull of their spans
            span = _meet(span, _hull_all(self.category_span[list(spec.include_categories)]))
        if spec.require_category is not None:
            span = _meet(span, self.category_span[spec.require_category])
        if spec.brands is not None:
            known = [b for b in spec.brands if b < self.brand_span.shape[0]]
            span = _meet(span, _hull_all(self.brand_span[known]))
        tail = (self.n >> 6, n_words(self.end_row)) if self.end_row > self.n else (0, 0)
        return _merge([span, tail])

    def _bits(self, spec: FilterSpec, words: slice) -> npt.NDArray[np.uint64]:
        """AND the attribute bitmaps of `spec` (excluded items aside) over `words`."""
        bits = self.alive_bits[words].copy()
        if spec.country is not None:
            if spec.country < 0:
                bits[:] = 0
            else:
                bits &= self.country_bits[spec.country, words]
        if spec.in_stock_only:
            bits &= self.stock_bits[words]
        if spec.include_categories is not None:
            cats = list(spec.include_categories)
            bits &= (
                np.bitwise_or.reduce(self.category_bits[cats, words], axis=0) if cats else U64(0)
            )
        if spec.require_category is not None:
            bits &= self.category_bits[spec.require_category, words]
        if spec.exclude_categories:
            cats = list(spec.exclude_categories)
            bits &= ~np.bitwise_or.reduce(self.category_bits[cats, words], axis=0)
        if spec.brands is not None:
            if spec.brands:
                bits &= np.bitwise_or.reduce([self._brand_bitmap(b)[words] for b in spec.brands])
            else:
                bits[:] = 0
        if spec.min_price is not None or spec.max_price is not None:
            bits &= self._price_superset(*self._price_bounds(spec), words)
        return bits

    def attach_partitions(self, assign: npt.NDArray[np.int32], n_parts: int) -> Partitions:
        """Count attribute values per partition (e.g. IVF list) of rows 0..len(assign)-1,
        kept current from here on by `update_item`. Replaces earlier partitions."""
        self.partitions = Partitions(self, assign, n_parts)
        return self.partitions

    def _price_bounds(self, spec: FilterSpec) -> tuple[float | None, float | None]:
        """The price bounds in base currency, widened so rounding never drops an item."""
        lo = None if spec.min_price is None else spec.min_price / spec.rate * (1 - 1e-9)
        hi = None if spec.max_price is None else spec.max_price / spec.rate * (1 + 1e-9)
        return lo, hi

    def _price_superset(
        self, lo: float | None, hi: float | None, words: slice
    ) -> npt.NDArray[np.uint64]:
        edges = self.price_edges
        bits = self.alive_bits[words].copy()
        if hi is not None:
            j = int(np.searchsorted(edges, hi, side="left"))
            if j < edges.shape[0]:
                bits &= self.price_le_bits[j, words]
        if lo is not None:
            i = int(np.searchsorted(edges, lo, side="left")) - 1
            if i >= 0:
                bits &= ~self.price_le_bits[i, words]
        return bits


class Partitions:
    """How many items of each attribute value sit in each partition (IVF list) of a search
    index: (values, partitions) count tables for categories (with their ancestors),
    countries, stock and cumulative price buckets.

    `estimate` multiplies the per-partition pass rates of a request's filters
    (independence between attributes within a partition, rescaled to the exact
    catalog-wide count), so a filtered search can probe the partitions where
    passing items actually are instead of assuming they are spread evenly.
    Brand filters use the brand id lists; excluded ids are ignored.
    """

    def __init__(self, fi: FilterIndex, assign: npt.NDArray[np.int32], n_parts: int) -> None:
        rows = int(assign.shape[0])
        p = n_parts
        self.assign = np.ascontiguousarray(assign, dtype=np.int32)
        self.n_rows = rows
        self.n_parts = p
        a64 = self.assign.astype(np.int64)
        self.size = np.bincount(a64, minlength=p).astype(np.int32)
        n_cat = int(fi.parent.shape[0])
        cat = fi.category_col[:rows].astype(np.int64)
        known = cat >= 0
        leaf = np.bincount(cat[known] * p + a64[known], minlength=n_cat * p).reshape(n_cat, p)
        self.category = np.zeros((n_cat, p), dtype=np.int32)
        for c in np.flatnonzero(leaf.any(axis=1)).tolist():
            self.category[fi.ancestors(c)] += leaf[c].astype(np.int32)
        self.country = (
            np.stack([self._per_part(fi.country_bits[c]) for c in range(fi.country_bits.shape[0])])
            if fi.country_bits.shape[0]
            else np.zeros((0, p), dtype=np.int32)
        )
        self.stock = self._per_part(fi.stock_bits)
        n_edges = int(fi.price_edges.shape[0])
        bucket = np.searchsorted(fi.price_edges, fi.price[:rows], side="left").astype(np.int64)
        per_bucket = np.bincount(bucket * p + a64, minlength=(n_edges + 1) * p)
        self.price_le = np.cumsum(per_bucket.reshape(n_edges + 1, p), axis=0)[:n_edges].astype(
            np.int32
        )

    def _per_part(self, bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.int32]:
        ids = to_ids(bits)
        ids = ids[ids < self.n_rows]
        return np.bincount(self.assign[ids], minlength=self.n_parts).astype(np.int32)

    def update(
        self,
        fi: FilterIndex,
        row: int,
        category: tuple[int, int] | None,
        price: tuple[float | None, float] | None,
        in_stock: bool | None,
        countries: npt.NDArray[np.bool_] | None,
    ) -> None:
        """Move one row's counts to its new attribute values (before `fi` changes)."""
        if row >= self.n_rows:
            return
        part = int(self.assign[row])
        if category is not None:
            old, new = category
            if old >= 0:
                self.category[fi.ancestors(old), part] -= 1
            self.category[fi.ancestors(new), part] += 1
        if price is not None:
            old_price, new_price = price
            if old_price is not None:
                self.price_le[fi._price_bucket(old_price) :, part] -= 1
            self.price_le[fi._price_bucket(new_price) :, part] += 1
        word, bit = row >> 6, U64(row & 63)
        if in_stock is not None:
            was = bool((fi.stock_bits[word] >> bit) & U64(1))
            self.stock[part] += int(in_stock) - int(was)
        if countries is not None:
            was_in = ((fi.country_bits[:, word] >> bit) & U64(1)).astype(np.int32)
            self.country[:, part] += countries.astype(np.int32) - was_in

    def estimate(self, spec: FilterSpec, total: int, fi: FilterIndex) -> npt.NDArray[np.float64]:
        """(n_parts,) expected passing items per partition, summing to `total`."""
        est, got = self.unscaled_estimate(spec, fi)
        return est * (total / got) if got > 0 else est

    def unscaled_estimate(
        self, spec: FilterSpec, fi: FilterIndex
    ) -> tuple[npt.NDArray[np.float64], float]:
        """(per-partition pass estimates before rescaling, their sum)."""
        size = self.size.astype(np.float64)
        safe = np.maximum(size, 1.0)
        est = size.copy()
        if spec.country is not None:
            if spec.country < 0:
                return np.zeros_like(est), 0.0
            est *= self.country[spec.country] / safe
        if spec.in_stock_only:
            est *= self.stock / safe
        if spec.include_categories is not None:
            if not spec.include_categories:
                return np.zeros_like(est), 0.0
            inc = self.category[list(spec.include_categories)].sum(axis=0)
            est *= np.minimum(inc, size) / safe
        if spec.require_category is not None:
            est *= self.category[spec.require_category] / safe
        if spec.exclude_categories:
            exc = self.category[list(spec.exclude_categories)].sum(axis=0)
            est *= 1.0 - np.minimum(exc, size) / safe
        if spec.min_price is not None or spec.max_price is not None:
            lo, hi = fi._price_bounds(spec)
            edges = fi.price_edges
            upper = size
            if hi is not None:
                j = int(np.searchsorted(edges, hi, side="left"))
                if j < edges.shape[0]:
                    upper = self.price_le[j].astype(np.float64)
            lower = np.zeros_like(size)
            if lo is not None:
                i = int(np.searchsorted(edges, lo, side="left")) - 1
                if i >= 0:
                    lower = self.price_le[i].astype(np.float64)
            est *= np.maximum(upper - lower, 0.0) / safe
        if spec.brands is not None:
            picked = [
                fi.brand_items[fi.brand_indptr[b] : fi.brand_indptr[b + 1]]
                for b in spec.brands
                if b < fi.brand_indptr.shape[0] - 1
            ]
            ids = np.concatenate(picked) if picked else np.empty(0, np.int64)
            ids = ids[ids < self.n_rows]
            in_brand = np.bincount(self.assign[ids], minlength=self.n_parts)
            est *= in_brand / safe
        return est, float(est.sum())
