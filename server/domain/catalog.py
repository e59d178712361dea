"""The served catalog: id lookup, item attributes and filter bitmaps, kept live.

Artifact columns are copied into arrays sized for `capacity` items so that
UpsertItems can add rows and change attributes in place; every change is
reflected in the filter bitmaps before the next request runs. Mutation happens
only on the event loop thread, the same thread that serves requests.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np
import numpy.typing as npt

from server.artifact import MAX_TAGS, Artifact
from server.domain.errors import InvalidQuery
from server.domain.filters import FilterIndex, FilterSpec
from server.domain.query import Filters

_A = TypeVar("_A", bound=np.generic)
_BUILD_CHUNK = 8_192  # ids per C call at load (each holds the GIL ~2 ms)
SMALL_ID_INDEX = 100_000  # up to this many ids, a dict (fastest per id; ~100 B per id)
_RECENT_IDS = 50_000  # rows of recently looked-up ids kept by a large IdIndex (~5 MB)
_RECENT_BATCH = 200  # lookups of up to this many ids (live lists, seeds) go through them
_BUCKET_SLOTS = 8  # a large IdIndex's bucket: 8 int64 slots, one 64-byte cache line
_BUCKET_FILL = 4  # ids per bucket on average (~0.7% spill from full buckets at 1M)
_EMPTY = -1  # no slot is -1: rows are below 2**31
_ROW_BITS = 0xFFFFFFFF


def compact_ids(ids: npt.NDArray[np.str_]) -> npt.NDArray[np.str_ | np.bytes_]:
    """ASCII ids as bytes, a quarter of numpy's 4 bytes per character (42 -> 11 MB at
    1M items); other ids unchanged. Numeric casts of the code points: no Python objects,
    and numpy releases the GIL (a reload runs this beside the serving loop)."""
    ids = np.asarray(ids)
    width = max(ids.dtype.itemsize // 4, 1)
    codes = np.ascontiguousarray(ids).view(np.uint32).reshape(ids.shape[0], width)
    if codes.size and int(codes.max()) >= 128:
        return ids
    out: npt.NDArray[np.bytes_] = codes.astype(np.uint8).reshape(-1).view(f"S{width}")
    return out


@overload
def plain(a: npt.NDArray[_A]) -> npt.NDArray[_A]: ...
@overload
def plain(a: None) -> None: ...
def plain(a: npt.NDArray[Any] | None) -> npt.NDArray[Any] | None:
    """A memory-mapped array as a plain ndarray over the same pages (no copy): np.memmap's
    __getitem__ and __array_finalize__ cost ~10-40 us per index on this host."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


def release(array: npt.NDArray[Any]) -> None:
    """Drop a memory-mapped array's pages from this process (they stay in the page cache
    and fault back in if read again): for columns copied at load."""
    mm = getattr(array, "_mmap", None)
    if isinstance(array, np.memmap) and isinstance(mm, mmap.mmap):
        mm.madvise(mmap.MADV_DONTNEED)


class IdIndex:
    """String id -> row. Small indexes (shoppers) are a dict; large ones (a 1M-item
    catalog) a table of 8-slot hash buckets, searched in numpy and verified against the
    ids themselves: no per-id Python objects, no second copy of the ids (16 bytes per
    id), and a 500-id lookup reads one 64-byte bucket per id instead of binary-searching
    a sorted array (~10 cache misses per id: 330 of 600-720 us after an idle gap; the
    whole lookup now takes 350-410 us). Rows added live go to a dict."""

    def __init__(self, ids: npt.NDArray[np.str_ | np.bytes_], small: int = SMALL_ID_INDEX) -> None:
        """`ids` are str, or ASCII ids as bytes (`compact_ids`)."""
        ids = np.asarray(ids)
        self._ids = plain(ids)
        self._bytes = ids.dtype.kind == "S"
        self._n = int(ids.shape[0])
        self._live: dict[str, int] = {}
        self._small: dict[str, int] | None = None
        # Rows of ids looked up lately (live bestseller and trending lists ask for the
        # same ids on every request): a row never changes once assigned, so entries
        # never go stale. Cleared when full.
        self._recent: dict[str, int] = {}
        if self._n <= small:
            self._small = {v: i for i, v in enumerate(ids.astype(str).tolist())}
            return
        # Python's str hash (per process, cached on each str): ~0.2 s for 1M ids at load,
        # in chunks so a reload in a pool thread lets the event loop take the GIL between
        # them (one C call over 1M ids held it for ~0.25 s). Chunks alone were not
        # enough: this thread took the GIL back chunk after chunk and a 1 ms ticker on
        # another thread waited 40-77 ms at a time; sleep(0) hands it over (0 waits
        # over 15 ms since).
        hashes = np.empty(self._n, dtype=np.int64)
        for start in range(0, self._n, _BUILD_CHUNK):
            part = self._ids[start : start + _BUILD_CHUNK].tolist()
            hashes[start : start + len(part)] = np.fromiter(map(hash, part), np.int64, len(part))
            time.sleep(0)
        # CPython hashes an ASCII str and its bytes alike, so a request's ids (already
        # hashed by validation, the hash cached on each str) need no encoding.
        self._encode = self._bytes and hash(self._ids[0].decode()) != int(hashes[0])
        # ~4 ids per bucket of 8 slots; a slot holds the hash's high 32 bits over the row.
        n_buckets = 1
        while n_buckets * _BUCKET_FILL < self._n:
            n_buckets <<= 1
        self._mask = n_buckets - 1
        bucket = (hashes & self._mask).astype(np.int32)
        order = np.argsort(bucket, kind="stable")
        counts = np.bincount(bucket, minlength=n_buckets)
        starts = np.cumsum(counts) - counts
        table = np.full(n_buckets * _BUCKET_SLOTS, _EMPTY, dtype=np.int64)
        # In chunks of the bucket order: fewer and smaller temporaries than one pass (the
        # loading thread's malloc arena kept ~14 MB more), and the GIL handed over.
        spill = []
        for start in range(0, self._n, _BUILD_CHUNK * 8):
            rows = order[start : start + _BUILD_CHUNK * 8]
            b = bucket[rows]
            slot = np.arange(start, start + rows.shape[0]) - starts[b]
            fits = slot < _BUCKET_SLOTS
            placed = rows[fits]
            table[b[fits] * _BUCKET_SLOTS + slot[fits]] = (hashes[placed] >> 32 << 32) | placed
            spill.append(rows[~fits])
            time.sleep(0)
        self._table = table.reshape(n_buckets, _BUCKET_SLOTS)
        # Ids of full buckets (~0.7% at 1M): a dict, read only when a bucket is full.
        spilled = np.concatenate(spill)
        self._overflow: dict[Any, int] = dict(
            zip(self._ids[spilled].tolist(), spilled.tolist(), strict=True)
        )
        width = ids.dtype.itemsize if self._bytes else ids.dtype.itemsize // 4
        # One character wider than the stored ids: a longer request id cannot be cut
        # down to a stored one and compare equal.
        self._wanted = np.dtype(f"{ids.dtype.kind}{width + 1}")

    def __len__(self) -> int:
        return self._n + len(self._live)

    def lookup(self, ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Row of each id, -1 where unknown."""
        m = len(ids)
        if m == 0:
            return np.empty(0, dtype=np.int64)
        if self._small is not None:
            small, live = self._small, self._live
            return np.fromiter(
                (small.get(i, live.get(i, -1)) for i in ids), dtype=np.int64, count=m
            )
        if m > _RECENT_BATCH:  # a search page's candidates: rarely all seen lately
            return self._hashed(ids, m)
        recent = self._recent
        known = [recent.get(i, -1) for i in ids]
        if -1 not in known:
            return np.asarray(known, dtype=np.int64)
        rows = self._hashed(ids, m)
        if len(recent) + m > _RECENT_IDS:
            recent.clear()
        for i, row in zip(ids, rows.tolist(), strict=True):
            if row >= 0:
                recent[i] = row
        return rows

    def _hashed(self, ids: Sequence[str], m: int) -> npt.NDArray[np.int64]:
        try:
            wanted = np.array(ids, dtype=self._wanted)
        except UnicodeEncodeError:  # not ASCII, so not in this index: maybe a live row
            return np.fromiter((self._row(i) for i in ids), dtype=np.int64, count=m)
        keys: Any = [i.encode() for i in ids] if self._encode else ids
        hq = np.fromiter(map(hash, keys), dtype=np.int64, count=m)
        slots = self._table[hq & self._mask]
        hit, at = np.nonzero((slots >> 32) == (hq >> 32)[:, None])
        rows = np.full(m, -1, dtype=np.int64)
        rows[hit] = slots[hit, at] & _ROW_BITS
        matched = rows >= 0
        rows = np.where(matched & (self._ids[rows] == wanted), rows, -1)
        # Rare: a full bucket (the id may have spilled) or a 32-bit hash match that was
        # another id. Then rows added live: a dict read per id still unknown.
        retry = (rows < 0) & (matched | (slots[:, -1] != _EMPTY))
        for i in np.flatnonzero(retry).tolist():
            rows[i] = self._row(ids[i])
        if self._live:
            for i in np.flatnonzero(rows < 0).tolist():
                rows[i] = self._live.get(ids[i], -1)
        return rows

    def _row(self, one: str) -> int:
        found = self.get(one)
        return -1 if found is None else found

    def get(self, one: str) -> int | None:
        if self._small is not None:
            row = self._small.get(one)
            return self._live.get(one) if row is None else row
        # One id (UpsertItems, events): scalar steps, not lookup()'s ~10 array calls.
        key: Any = one.encode() if self._bytes else one
        h = hash(key)
        slots = self._table[h & self._mask].tolist()
        for entry in slots:
            if entry == _EMPTY:
                break
            row = entry & _ROW_BITS
            if entry >> 32 == h >> 32 and self._ids[row] == key:
                return int(row)
        else:
            row = self._overflow.get(key)
            if row is not None:
                return row
        return self._live.get(one)

    def add(self, item_id: str, row: int) -> None:
        self._live[item_id] = row


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """An item as UpsertItems describes it; None = unchanged (existing items)."""

    item_id: str
    category: str = ""
    brand: str = ""
    price: float | None = None  # in `currency`
    currency: str = ""
    countries: tuple[str, ...] = ()
    in_stock: bool | None = None
    tags: tuple[str, ...] | None = None  # None = unchanged; () = none


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    item_id: str
    field: str
    reason: str


class Catalog:
    """Item attributes and filters of one artifact plus live changes."""

    def __init__(self, artifact: Artifact, capacity: int | None = None) -> None:
        m = artifact.manifest
        n = m.n_items
        cap = max(n, capacity or n)
        self.n_base = n
        self.n = n  # rows in use (base + live additions)
        self.capacity = cap
        self.base_ids = compact_ids(artifact["item_ids"])
        if self.base_ids is not artifact["item_ids"]:
            release(artifact["item_ids"])
        self.live_ids: list[str] = []
        self.ids = IdIndex(self.base_ids)
        self.category: npt.NDArray[np.int32] = _grow(artifact["item_category"], cap)
        self.brand: npt.NDArray[np.int32] = _grow(artifact["item_brand"], cap)
        self.price: npt.NDArray[np.float64] = _grow(artifact["item_price"], cap)
        self.in_stock: npt.NDArray[np.bool_] = _grow(artifact["item_in_stock"], cap)
        self.alive = _grow(np.ones(n, dtype=bool), cap)
        # Merchandising tags: bit j of an item's word is tag_names[j] (MAX_TAGS at most).
        tags = artifact.arrays.get("item_tags")
        self.tags: npt.NDArray[np.uint64] = _grow(
            np.zeros(n, dtype=np.uint64) if tags is None else tags, cap
        )
        self.tag_names: list[str] = list(m.tag_names)
        self._tag_index = {name: j for j, name in enumerate(self.tag_names)}
        self.category_names = m.category_names
        self.brand_names: list[str] = list(m.brand_names)
        self.country_codes = m.country_codes
        self.base_currency = m.base_currency
        self.rates = m.currency_rates
        self._category_index = {name: i for i, name in enumerate(m.category_names)}
        self._brand_index = {name: i for i, name in enumerate(m.brand_names)}
        self._country_index = {code: i for i, code in enumerate(m.country_codes)}
        self.filters = FilterIndex(
            category=artifact["item_category"],
            category_parent=artifact["category_parent"],
            brand=artifact["item_brand"],
            n_brands=len(m.brand_names),
            price=artifact["item_price"],
            in_stock=artifact["item_in_stock"],
            country_bits=artifact["item_country_bits"],
            capacity=cap,
            live_price=self.price,
        )

    def __len__(self) -> int:
        return int(self.alive[: self.n].sum())

    def item_ids(self, rows: npt.NDArray[np.int64]) -> list[str]:
        if not self.live_ids or rows.size == 0 or int(rows.max()) < self.n_base:
            return self._base_ids(rows)
        if self.n_base == 0:
            return [self.live_ids[r] for r in rows.tolist()]
        out = self._base_ids(np.minimum(rows, self.n_base - 1))
        for i in np.flatnonzero(rows >= self.n_base).tolist():
            out[i] = self.live_ids[int(rows[i]) - self.n_base]
        return out

    def _base_ids(self, rows: npt.NDArray[np.int64]) -> list[str]:
        got: list[Any] = self.base_ids[rows].tolist()
        return [b.decode() for b in got] if self.base_ids.dtype.kind == "S" else got

    def lookup(self, ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Row of each id, -1 where unknown or deleted."""
        rows = self.ids.lookup(ids)
        if rows.size:
            rows[rows >= 0] = np.where(self.alive[rows[rows >= 0]], rows[rows >= 0], -1)
        return rows

    def category_row(self, name: str) -> int | None:
        return self._category_index.get(name)

    def tag_bit(self, name: str) -> int | None:
        """The bit of a merchandising tag in `tags`; None if no item has had it."""
        return self._tag_index.get(name)

    def country_row(self, country: str) -> int | None:
        """Index of a country code; None if the catalog does not know it."""
        return self._country_index.get(country)

    def currency(self, code: str) -> tuple[str, float]:
        """(currency, units per base unit) for a request currency ("" = base)."""
        if not code:
            return self.base_currency, 1.0
        rate = self.rates.get(code)
        if rate is None:
            known = ", ".join(sorted(self.rates))
            raise InvalidQuery(
                "context.currency", f"no exchange rate for {code!r} (known: {known})"
            )
        return code, rate

    def filter_spec(
        self,
        filters: Filters,
        country: str,
        rate: float,
        extra_exclude: Sequence[int] | npt.NDArray[np.int64] = (),
    ) -> FilterSpec:
        """Resolve names to indexes. Unknown categories/brands match nothing; unknown
        excluded ids exclude nothing; a country the catalog does not ship to passes nothing."""
        country_idx: int | None = None
        if country:
            row = self.country_row(country)
            country_idx = -1 if row is None else row
        excluded: tuple[int, ...] = ()
        if filters.exclude_item_ids or len(extra_exclude):
            rows = self.lookup(filters.exclude_item_ids)
            rows = np.concatenate([rows[rows >= 0], np.asarray(extra_exclude, np.int64)])
            excluded = tuple(np.unique(rows).tolist())
        include = None
        if filters.include_categories:
            include = tuple(
                self._category_index[c]
                for c in filters.include_categories
                if c in self._category_index
            )
        brands = None
        if filters.brands:
            brands = tuple(self._brand_index[b] for b in filters.brands if b in self._brand_index)
        return FilterSpec(
            country=country_idx,
            min_price=filters.min_price,
            max_price=filters.max_price,
            rate=rate,
            include_categories=include,
            exclude_categories=tuple(
                self._category_index[c]
                for c in filters.exclude_categories
                if c in self._category_index
            ),
            brands=brands,
            in_stock_only=filters.in_stock_only,
            exclude_items=excluded,
        )

    # Live catalog.
    def check(self, index: int, item: ItemUpdate, exists: bool) -> Rejected | None:
        """Why this update cannot apply, or None."""
        if item.category and item.category not in self._category_index:
            return Rejected(index, item.item_id, "category", f"unknown category {item.category!r}")
        if not exists and not item.category:
            return Rejected(index, item.item_id, "category", "required for a new item")
        if not exists and item.price is None:
            return Rejected(index, item.item_id, "price", "required for a new item")
        if item.currency and item.currency not in self.rates:
            return Rejected(
                index, item.item_id, "currency", f"no exchange rate for {item.currency!r}"
            )
        unknown = [c for c in item.countries if c not in self._country_index]
        if unknown:
            return Rejected(index, item.item_id, "countries", f"unknown countries {unknown}")
        new_tags = {t for t in item.tags or () if t not in self._tag_index}
        if len(self.tag_names) + len(new_tags) > MAX_TAGS:
            return Rejected(
                index,
                item.item_id,
                "tags",
                f"a catalog holds at most {MAX_TAGS} distinct tags "
                f"({len(self.tag_names)} in use, {len(new_tags)} new)",
            )
        if not exists and self.n >= self.capacity:
            return Rejected(
                index, item.item_id, "item_id", "live catalog capacity reached; retrain"
            )
        return None

    def upsert(self, item: ItemUpdate) -> tuple[int, bool]:
        """Apply a checked update; returns (row, created)."""
        row = self.ids.get(item.item_id)
        created = row is None
        if row is None:
            row = self.n
            self.n += 1
            self.live_ids.append(item.item_id)
            self.ids.add(item.item_id, row)
        old_cat = -1 if created else int(self.category[row])
        old_brand = -1 if created else int(self.brand[row])
        old_price = None if created else float(self.price[row])
        category = brand = None
        if item.category:
            new = self._category_index[item.category]
            if new != old_cat:
                category = (old_cat, new)
                self.category[row] = new
        if item.brand:
            new_brand = self._brand_index.get(item.brand)
            if new_brand is None:
                new_brand = len(self.brand_names)
                self.brand_names.append(item.brand)
                self._brand_index[item.brand] = new_brand
            if new_brand != old_brand:
                brand = (old_brand, new_brand)
                self.brand[row] = new_brand
        price = None
        if item.price is not None:
            base = item.price / self.rates[item.currency or self.base_currency]
            price = (old_price, base)
            self.price[row] = base
        in_stock = True if created and item.in_stock is None else item.in_stock
        if in_stock is not None:
            self.in_stock[row] = in_stock
        countries = None
        if item.countries or created:
            countries = np.zeros(len(self.country_codes), dtype=bool)
            countries[[self._country_index[c] for c in item.countries]] = True
        if item.tags is not None:
            word = 0
            for tag in item.tags:
                bit = self._tag_index.get(tag)
                if bit is None:
                    bit = self._tag_index[tag] = len(self.tag_names)
                    self.tag_names.append(tag)
                word |= 1 << bit
            self.tags[row] = word
        self.alive[row] = True
        self.filters.update_item(
            row,
            alive=True,
            category=category,
            brand=brand,
            price=price,
            in_stock=in_stock,
            countries=countries,
        )
        return row, created

    def delete(self, row: int) -> None:
        self.alive[row] = False
        self.filters.update_item(row, alive=False)


_Scalar = TypeVar("_Scalar", bound=np.generic)


def _grow(column: npt.NDArray[_Scalar], capacity: int) -> npt.NDArray[_Scalar]:
    """An in-memory copy of `column` with room for `capacity` rows."""
    out = np.zeros((capacity, *column.shape[1:]), dtype=column.dtype)
    out[: column.shape[0]] = column
    return out
