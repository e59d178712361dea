"""Per-category / per-brand caps: which candidates still fit next to the items already taken."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.domain.catalog import Catalog


@dataclass(frozen=True, slots=True)
class Caps:
    """At most `per_category` items per leaf category and `per_brand` per brand; 0 = no cap."""

    per_category: int = 0
    per_brand: int = 0

    def __bool__(self) -> bool:
        return bool(self.per_category or self.per_brand)


def admit(
    catalog: Catalog,
    taken: npt.NDArray[np.int64],
    candidates: npt.NDArray[np.int64],
    caps: Caps,
    n: int,
) -> npt.NDArray[np.int64]:
    """Indexes into `candidates` (in order, at most n) that keep every cap when added to
    `taken`. Rows in `taken` count toward the caps even if they already exceed one
    (pins are never dropped for a cap, but nothing joins them beyond it)."""
    if not caps:
        return np.arange(min(n, candidates.shape[0]), dtype=np.int64)
    used_c: dict[int, int] = {}
    used_b: dict[int, int] = {}
    for c, b in zip(catalog.category[taken].tolist(), catalog.brand[taken].tolist(), strict=True):
        used_c[c] = used_c.get(c, 0) + 1
        used_b[b] = used_b.get(b, 0) + 1
    keep: list[int] = []
    cats = catalog.category[candidates].tolist()
    brands = catalog.brand[candidates].tolist()
    for i, (c, b) in enumerate(zip(cats, brands, strict=True)):
        if len(keep) >= n:
            break
        if caps.per_category and used_c.get(c, 0) >= caps.per_category:
            continue
        if caps.per_brand and used_b.get(b, 0) >= caps.per_brand:
            continue
        used_c[c] = used_c.get(c, 0) + 1
        used_b[b] = used_b.get(b, 0) + 1
        keep.append(i)
    return np.asarray(keep, dtype=np.int64)
