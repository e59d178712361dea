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

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64 = np.uint64
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
    return ((bits[ids >> 6] >> (ids & 63).astype(U64)) & U64(1)).astype(bool)


def to_ids(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Ascending ids of the set bits; cost grows with the non-zero words only."""
    nz = np.flatnonzero(bits)
    if nz.size == 0:
        return np.empty(0, dtype=np.int64)
    unpacked = np.unpackbits(bits[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    rows, cols = np.nonzero(unpacked)
    return nz[rows].astype(np.int64) * 64 + cols


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


@dataclass(frozen=True, slots=True)
class Compiled:
    """A request's filters: a candidate bitmap plus the exact price residual."""

    bits: npt.NDArray[np.uint64]
    estimate: int  # popcount of bits: exact unless a price bound is set
    min_price: float | None  # request currency
    max_price: float | None
    rate: float
    prices: npt.NDArray[np.float64]  # the catalog's base-currency price column

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
        ids = to_ids(self.bits)
        return ids[self.residual(ids)] if self.has_residual else ids


class FilterIndex:
    """Per-attribute bitmaps for one catalog, built once at load (~0.2 s per 1M items)."""

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
    ) -> None:
        n = int(category.shape[0])
        self.n = n
        self.all_bits = pack(np.ones(n, dtype=bool))
        self.stock_bits = pack(np.asarray(in_stock))
        self.country_bits = country_bits
        self.price = np.asarray(price)
        self.category_bits = self._category_bits(np.asarray(category), category_parent)
        # Brands can number in the thousands: keep id lists, build bitmaps on demand.
        order = np.argsort(brand, kind="stable").astype(np.int64)
        self.brand_items = order
        self.brand_indptr = np.searchsorted(brand[order], np.arange(n_brands + 1)).astype(np.int64)
        # Cumulative price buckets: le_bits[j] = items priced <= edges[j].
        qs = np.linspace(0, 1, _PRICE_BUCKETS + 1)[1:]
        self.price_edges = np.unique(np.quantile(self.price, qs)) if n else np.zeros(0)
        price_order = np.argsort(self.price, kind="stable")
        ends = np.searchsorted(self.price[price_order], self.price_edges, side="right")
        self.price_le_bits = np.zeros((self.price_edges.shape[0], n_words(n)), dtype=U64)
        running = np.zeros(n, dtype=bool)
        start = 0
        for j, end in enumerate(ends):
            running[price_order[start:end]] = True
            self.price_le_bits[j] = pack(running)
            start = end

    def _category_bits(
        self, category: npt.NDArray[np.int32], parent: npt.NDArray[np.int32]
    ) -> npt.NDArray[np.uint64]:
        k = int(parent.shape[0])
        bits = np.zeros((k, n_words(self.n)), dtype=U64)
        order = np.argsort(category, kind="stable")
        bounds = np.searchsorted(category[order], np.arange(k + 1))
        for c in range(k):
            members = order[bounds[c] : bounds[c + 1]].astype(np.int64)
            if members.size:
                bits[c] = from_ids(members, self.n)
        # Children before parents is not guaranteed: walk each category's ancestors.
        for c in range(k):
            if not bits[c].any():
                continue
            p = int(parent[c])
            seen = 0
            while p >= 0 and seen <= k:
                bits[p] |= bits[c]
                p = int(parent[p])
                seen += 1
        return bits

    def compile(self, spec: FilterSpec) -> Compiled:
        bits = self.all_bits.copy()
        if spec.country is not None:
            if spec.country < 0:
                bits[:] = 0
            else:
                bits &= self.country_bits[spec.country]
        if spec.in_stock_only:
            bits &= self.stock_bits
        if spec.include_categories is not None:
            bits &= (
                np.bitwise_or.reduce(self.category_bits[list(spec.include_categories)], axis=0)
                if spec.include_categories
                else U64(0)
            )
        if spec.exclude_categories:
            bits &= ~np.bitwise_or.reduce(self.category_bits[list(spec.exclude_categories)], axis=0)
        if spec.brands is not None:
            if spec.brands:
                ids = np.concatenate(
                    [
                        self.brand_items[self.brand_indptr[b] : self.brand_indptr[b + 1]]
                        for b in spec.brands
                    ]
                )
                bits &= from_ids(ids, self.n)
            else:
                bits[:] = 0
        if spec.min_price is not None or spec.max_price is not None:
            # Widen by a relative epsilon so base-currency rounding never drops an item.
            lo = None if spec.min_price is None else spec.min_price / spec.rate * (1 - 1e-9)
            hi = None if spec.max_price is None else spec.max_price / spec.rate * (1 + 1e-9)
            bits &= self._price_superset(lo, hi)
        if spec.exclude_items:
            clear_ids(bits, np.asarray(spec.exclude_items, dtype=np.int64))
        return Compiled(
            bits=bits,
            estimate=count(bits),
            min_price=spec.min_price,
            max_price=spec.max_price,
            rate=spec.rate,
            prices=self.price,
        )

    def _price_superset(self, lo: float | None, hi: float | None) -> npt.NDArray[np.uint64]:
        edges = self.price_edges
        bits = self.all_bits.copy()
        if hi is not None:
            j = int(np.searchsorted(edges, hi, side="left"))
            if j < edges.shape[0]:
                bits &= self.price_le_bits[j]
        if lo is not None:
            i = int(np.searchsorted(edges, lo, side="left")) - 1
            if i >= 0:
                bits &= ~self.price_le_bits[i]
        return bits
