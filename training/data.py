"""The in-memory dataset every loader produces and every trainer consumes."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Event types, in increasing order of intent.
VIEW, ADD_TO_CART, PURCHASE = 0, 1, 2
EVENT_TYPE_NAMES = ("view", "add_to_cart", "purchase")
# Device codes follow RequestContext.Device in the proto.
DEVICE_UNSPECIFIED, MOBILE, TABLET, DESKTOP = 0, 1, 2, 3
DEVICE_NAMES = ("unspecified", "mobile", "tablet", "desktop")


@dataclass(frozen=True)
class Dataset:
    """A store's catalog, shoppers and interaction log, columnar.

    Items (n):
        item_ids         str (n,)    the shop's item ids, unique
        item_category    int32 (n,)  leaf category index into category_names
        item_brand       int32 (n,)  index into brand_names
        item_price       float64 (n,) price in base_currency, > 0
        item_in_stock    bool (n,)
        item_countries   bool (n, c) item is sold/shipped to country_codes[j]
        item_tags        uint64 (n,) merchandising tags, bit j = tag_names[j] (optional)
    category_parent      int32 (k,)  parent category index, -1 for roots
    currency_rates       units of each currency per 1 base_currency unit
                         (includes base_currency itself at 1.0)
    Users (u):
        user_ids         str (u,)
        user_country     int16 (u,)  home country index
        user_device      int8 (u,)   usual device (DEVICE_* code, 1..3)
    Events (e), sorted by timestamp:
        ev_user int32, ev_item int32, ev_ts int64 (unix seconds),
        ev_type int8 (VIEW/ADD_TO_CART/PURCHASE), ev_device int8 (DEVICE_*),
        ev_country int16 (country index)
    """

    name: str
    item_ids: npt.NDArray[np.str_]
    item_category: npt.NDArray[np.int32]
    item_brand: npt.NDArray[np.int32]
    item_price: npt.NDArray[np.float64]
    item_in_stock: npt.NDArray[np.bool_]
    item_countries: npt.NDArray[np.bool_]
    category_names: tuple[str, ...]
    category_parent: npt.NDArray[np.int32]
    brand_names: tuple[str, ...]
    country_codes: tuple[str, ...]
    base_currency: str
    currency_rates: dict[str, float]
    user_ids: npt.NDArray[np.str_]
    user_country: npt.NDArray[np.int16]
    user_device: npt.NDArray[np.int8]
    ev_user: npt.NDArray[np.int32]
    ev_item: npt.NDArray[np.int32]
    ev_ts: npt.NDArray[np.int64]
    ev_type: npt.NDArray[np.int8]
    ev_device: npt.NDArray[np.int8]
    ev_country: npt.NDArray[np.int16]
    # Merchandising tags: bit j of item_tags[i] = item i has tag_names[j] (at most 64).
    item_tags: npt.NDArray[np.uint64] | None = None
    tag_names: tuple[str, ...] = ()

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_events(self) -> int:
        return int(self.ev_user.shape[0])

    def fingerprint(self) -> str:
        """sha256 over ids and events: identifies the training data in the manifest."""
        digest = hashlib.sha256()
        for arr in (self.item_ids, self.user_ids, self.ev_user, self.ev_item, self.ev_ts):
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()[:16]

    def clustered(self) -> Dataset:
        """The same store with items in category order (depth first through the
        category tree, then brand, then item id).

        Rows of a category, and of its every ancestor, are then contiguous: the
        server's category filters read a few hundred words of each bitmap instead
        of the whole catalog, and an exact scan of the passing items reads
        neighbouring rows. Returns self when the order is already that.
        """
        n = self.n_items
        rank = category_ranks(self.category_parent)
        order = np.lexsort((self.item_ids, self.item_brand, rank[self.item_category]))
        return self if (order == np.arange(n)).all() else self.reordered(order)

    def reordered(self, order: npt.NDArray[np.int64]) -> Dataset:
        """The same store with item row i holding what row order[i] held; events
        follow their items."""
        n = self.n_items
        new_row = np.empty(n, dtype=np.int32)
        new_row[order] = np.arange(n, dtype=np.int32)
        return dataclasses.replace(
            self,
            item_ids=self.item_ids[order],
            item_category=self.item_category[order],
            item_brand=self.item_brand[order],
            item_price=self.item_price[order],
            item_in_stock=self.item_in_stock[order],
            item_countries=self.item_countries[order],
            item_tags=None if self.item_tags is None else self.item_tags[order],
            ev_item=new_row[self.ev_item],
        )


def category_ranks(parent: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
    """Each category's position in a depth-first walk of the tree (children in index
    order), so every subtree holds consecutive ranks."""
    k = int(parent.shape[0])
    children: list[list[int]] = [[] for _ in range(k)]
    roots: list[int] = []
    for c, p in enumerate(parent.tolist()):
        (children[p] if 0 <= p < k else roots).append(c)
    rank = np.full(k, -1, dtype=np.int64)
    stack, seen = roots[::-1], 0
    while stack:
        c = stack.pop()
        rank[c] = seen
        seen += 1
        stack.extend(children[c][::-1])
    unreached = rank < 0  # only in a parent cycle: after the tree, in index order
    rank[unreached] = seen + np.arange(int(unreached.sum()))
    return rank
