"""The served catalog: id lookup, item attributes and filter bitmaps over artifact arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from server.artifact import Artifact
from server.domain.errors import InvalidQuery
from server.domain.filters import FilterIndex, FilterSpec
from server.domain.query import Filters


class IdIndex:
    """String id -> row index by binary search over a sorted copy (no per-id Python objects)."""

    def __init__(self, ids: npt.NDArray[np.str_]) -> None:
        self._order = np.argsort(ids, kind="stable").astype(np.int64)
        self._sorted = np.asarray(ids)[self._order]

    def __len__(self) -> int:
        return int(self._sorted.shape[0])

    def lookup(self, ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Row index of each id, -1 where unknown."""
        if len(ids) == 0 or len(self) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        query = np.asarray(ids, dtype=self._sorted.dtype if len(ids) else None)
        pos = np.searchsorted(self._sorted, query)
        pos = np.minimum(pos, len(self) - 1)
        found = self._sorted[pos] == np.asarray(ids)
        return np.where(found, self._order[pos], -1)

    def get(self, one: str) -> int | None:
        row = int(self.lookup([one])[0])
        return None if row < 0 else row


class Catalog:
    """Item attributes and filters of one artifact. Read-only and shared by requests."""

    def __init__(self, artifact: Artifact) -> None:
        m = artifact.manifest
        self.item_ids: npt.NDArray[np.str_] = artifact["item_ids"]
        self.ids = IdIndex(self.item_ids)
        self.category = artifact["item_category"]
        self.brand = artifact["item_brand"]
        self.price = artifact["item_price"]
        self.in_stock = artifact["item_in_stock"]
        self.category_names = m.category_names
        self.brand_names = m.brand_names
        self.country_codes = m.country_codes
        self.base_currency = m.base_currency
        self.rates = m.currency_rates
        self._category_index = {name: i for i, name in enumerate(m.category_names)}
        self._brand_index = {name: i for i, name in enumerate(m.brand_names)}
        self._country_index = {code: i for i, code in enumerate(m.country_codes)}
        self.filters = FilterIndex(
            category=self.category,
            category_parent=artifact["category_parent"],
            brand=self.brand,
            n_brands=len(m.brand_names),
            price=self.price,
            in_stock=self.in_stock,
            country_bits=artifact["item_country_bits"],
        )

    def __len__(self) -> int:
        return len(self.ids)

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
        self, filters: Filters, country: str, rate: float, extra_exclude: Sequence[int] = ()
    ) -> FilterSpec:
        """Resolve names to indexes. Unknown categories/brands match nothing; unknown
        excluded ids exclude nothing; a country the catalog does not ship to passes nothing."""
        country_idx: int | None = None
        if country:
            row = self.country_row(country)
            country_idx = -1 if row is None else row
        excluded = self.ids.lookup(filters.exclude_item_ids)
        excluded = np.concatenate([excluded[excluded >= 0], np.asarray(extra_exclude, np.int64)])
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
            exclude_items=tuple(int(i) for i in np.unique(excluded)),
        )
