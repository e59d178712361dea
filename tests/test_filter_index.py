"""FilterIndex kept live: bitmaps after item changes equal bitmaps built from scratch."""

from __future__ import annotations

import numpy as np

from server.domain.filters import FilterIndex, FilterSpec, pack

# Two roots (0, 1), each with two leaves (2, 3 under 0; 4, 5 under 1).
PARENT = np.array([-1, -1, 0, 0, 1, 1], dtype=np.int32)


def _index(category: list[int], capacity: int) -> FilterIndex:
    n = len(category)
    return FilterIndex(
        category=np.asarray(category, dtype=np.int32),
        category_parent=PARENT,
        brand=np.zeros(n, dtype=np.int32),
        n_brands=1,
        price=np.linspace(1.0, 100.0, n),
        in_stock=np.ones(n, dtype=bool),
        country_bits=pack(np.ones(n, dtype=bool))[None, :],
        capacity=capacity,
    )


def _passing(fi: FilterIndex, category: int) -> list[int]:
    flt = fi.compile(FilterSpec(include_categories=(category,), in_stock_only=False))
    ids: list[int] = flt.passing_ids().tolist()
    return ids


def test_live_category_changes_reach_the_category_bitmaps() -> None:
    fi = _index([2, 3, 4, 5], capacity=8)
    assert _passing(fi, 0) == [0, 1] and _passing(fi, 2) == [0]
    fi.update_item(4, alive=True, category=(-1, 3))  # a new item in leaf 3 (root 0)
    assert _passing(fi, 3) == [1, 4] and _passing(fi, 0) == [0, 1, 4]
    fi.update_item(0, alive=True, category=(2, 5))  # moved to the other root
    assert _passing(fi, 2) == [] and _passing(fi, 0) == [1, 4]
    assert _passing(fi, 5) == [0, 3] and _passing(fi, 1) == [0, 2, 3]


def test_compiled_filters_are_not_reused_across_changes() -> None:
    fi = _index([2, 3, 4, 5], capacity=8)
    spec = FilterSpec(country=0, in_stock_only=True)
    assert fi.compile(spec).estimate == 4
    fi.update_item(1, alive=True, in_stock=False)
    assert fi.compile(spec).estimate == 3
    excluded = fi.compile(FilterSpec(country=0, exclude_items=(0, 1, 7)))
    assert excluded.estimate == 2 and excluded.passing_ids().tolist() == [2, 3]
    assert fi.compile(spec).passing_ids().tolist() == [0, 2, 3]
