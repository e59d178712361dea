"""FilterIndex kept live: bitmaps after item changes equal bitmaps built from scratch."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _passing(fi: FilterIndex, category: int | None = None, brand: int | None = None) -> list[int]:
    spec = FilterSpec(
        include_categories=None if category is None else (category,),
        brands=None if brand is None else (brand,),
        in_stock_only=False,
    )
    flt = fi.compile(spec)
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


def test_rows_moved_outside_a_span_are_still_found() -> None:
    """In a catalog in category order, each leaf and brand holds a narrow word span;
    a row moved into a leaf or brand far from it must still pass that filter."""
    n = 64 * 40
    leaf = np.repeat(np.array([2, 3, 4, 5], dtype=np.int32), n // 4)
    brand = np.repeat(np.array([0, 1], dtype=np.int32), n // 2)
    fi = FilterIndex(
        category=leaf,
        category_parent=PARENT,
        brand=brand,
        n_brands=2,
        price=np.ones(n),
        in_stock=np.ones(n, dtype=bool),
        country_bits=pack(np.ones(n, dtype=bool))[None, :],
        capacity=n + 64,
    )
    assert fi.category_span[2].tolist() == [0, 10] and fi.category_span[0].tolist() == [0, 20]
    fi.update_item(n - 1, alive=True, category=(5, 2), brand=(1, 0))
    fi.update_item(0, alive=True, brand=(0, 7))  # a brand added live
    fi.update_item(n + 3, alive=True, category=(-1, 4), brand=(-1, 1))
    assert _passing(fi, 2)[-1] == n - 1 and _passing(fi, 0)[-1] == n - 1
    assert _passing(fi, brand=0)[-1] == n - 1 and _passing(fi, brand=7) == [0]
    assert _passing(fi, brand=1)[-1] == n + 3


def test_narrow_filters_are_kept_as_their_spans_words() -> None:
    """A reused filter costs the cache its spans' words, not a catalog-wide bitmap."""
    n = 64 * 40
    fi = _index(np.repeat([2, 3, 4, 5], n // 4).tolist(), capacity=n)
    leaf, everything = FilterSpec(include_categories=(3,)), FilterSpec(country=0)
    first = {spec: fi.compile(spec) for spec in (leaf, everything)}
    kept = {spec: fi._compiled[spec] for spec in (leaf, everything)}
    assert not kept[leaf].whole and kept[leaf].words.shape == (10,)  # leaf 3: words 10-19
    assert kept[everything].whole and kept[everything].words is first[everything].bits
    for spec in (leaf, everything):
        again = fi.compile(spec)
        np.testing.assert_array_equal(again.bits, first[spec].bits)
        assert again.passing_ids().tolist() == first[spec].passing_ids().tolist()
    assert fi.compile(leaf).passing_ids().tolist() == list(range(640, 1280))


@st.composite
def _catalogs(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str, int, int]], FilterSpec]:
    """A catalog (rows in category order or not), live changes, and a filter spec."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(rng.integers(1, 1500))  # not drawn: hypothesis favours small n, all in one word
    leaf = rng.integers(2, 6, size=n)
    brand = rng.integers(0, 2, size=n)
    sort = draw(st.sampled_from(["none", "category", "brand"]))
    if sort != "none":  # exported in category (or brand) order: spans are narrow
        order = np.lexsort((brand, leaf) if sort == "category" else (leaf, brand))
        leaf, brand = leaf[order], brand[order]
    cols = {
        "leaf": leaf.astype(np.int32),
        "brand": brand.astype(np.int32),
        "price": rng.uniform(1.0, 100.0, size=n),
        "stock": rng.random(n) < 0.8,
        "ships": rng.random((2, n)) < 0.7,
        "capacity": n + 80,
    }
    rows = st.integers(0, n + 79)
    changes = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["leaf", "brand", "stock", "delete"]), rows, st.integers(0, 7)
            ),
            max_size=12,
        )
    )
    spec = FilterSpec(
        country=draw(st.none() | st.integers(-1, 1)),
        min_price=draw(st.none() | st.floats(1.0, 100.0)),
        max_price=draw(st.none() | st.floats(1.0, 100.0)),
        include_categories=draw(st.none() | st.lists(st.integers(0, 5), max_size=3).map(tuple)),
        exclude_categories=tuple(draw(st.lists(st.integers(0, 5), max_size=2))),
        brands=draw(st.none() | st.lists(st.integers(0, 3), max_size=2).map(tuple)),
        in_stock_only=draw(st.booleans()),
        require_category=draw(st.none() | st.integers(0, 5)),
        exclude_items=tuple(sorted(set(draw(st.lists(rows, max_size=4))))),
    )
    return cols, changes, spec


@settings(max_examples=400, deadline=None)
@given(_catalogs())
def test_compiled_ids_equal_a_check_of_every_row(case: Any) -> None:
    cols, changes, spec = case
    n, cap = len(cols["leaf"]), cols["capacity"]
    # The truth, kept column by column next to the index (the price column is shared,
    # as the catalog shares its live one).
    alive = np.arange(cap) < n
    leaf = np.concatenate([cols["leaf"], np.full(cap - n, -1)])
    brand = np.concatenate([cols["brand"], np.full(cap - n, -1)])
    price = np.concatenate([cols["price"], np.zeros(cap - n)])
    fi = FilterIndex(
        category=cols["leaf"],
        category_parent=PARENT,
        brand=cols["brand"],
        n_brands=2,
        price=cols["price"],
        in_stock=cols["stock"],
        country_bits=np.stack([pack(c) for c in cols["ships"]]),
        capacity=cap,
        live_price=price,
    )
    stock = np.concatenate([cols["stock"], np.zeros(cap - n, bool)])
    ships = np.concatenate([cols["ships"], np.zeros((2, cap - n), bool)], axis=1)
    fi.compile(spec)  # cached before the changes: must not be reused after them
    for what, row, value in changes:
        if not alive[row] and what != "delete":  # a live addition: every attribute at once
            # A deleted row keeps its attributes; the catalog re-adds its id at that row.
            known = leaf[row] >= 0
            old = (int(leaf[row]), int(brand[row]), float(price[row])) if known else (-1, -1, None)
            alive[row], leaf[row], brand[row], price[row], stock[row] = True, 2, 0, 50.0, True
            ships[:, row] = True
            fi.update_item(
                row,
                alive=True,
                category=(old[0], 2),
                brand=(old[1], 0),
                price=(old[2], 50.0),
                in_stock=True,
                countries=np.ones(2, dtype=bool),
            )
        elif what == "leaf":
            fi.update_item(row, alive=True, category=(int(leaf[row]), 2 + value % 4))
            leaf[row] = 2 + value % 4
        elif what == "brand":
            fi.update_item(row, alive=True, brand=(int(brand[row]), value))
            brand[row] = value
        elif what == "stock":
            fi.update_item(row, alive=True, in_stock=bool(value % 2))
            stock[row] = bool(value % 2)
        elif alive[row]:
            fi.update_item(row, alive=False)
            alive[row] = False
    ok = alive.copy()
    if spec.country is not None:
        ok &= ships[spec.country] if spec.country >= 0 else False
    if spec.in_stock_only:
        ok &= stock
    root = np.where(leaf >= 0, PARENT[np.maximum(leaf, 0)], -1)

    def in_cat(cats: list[int]) -> npt.NDArray[np.bool_]:
        return np.isin(leaf, cats) | np.isin(root, cats)

    if spec.include_categories is not None:
        ok &= in_cat(list(spec.include_categories))
    if spec.require_category is not None:
        ok &= in_cat([spec.require_category])
    if spec.exclude_categories:
        ok &= ~in_cat(list(spec.exclude_categories))
    if spec.brands is not None:
        ok &= np.isin(brand, list(spec.brands))
    if spec.min_price is not None:
        ok &= price >= spec.min_price
    if spec.max_price is not None:
        ok &= price <= spec.max_price
    unexcluded = ok.copy()
    ok[list(spec.exclude_items)] = False
    flt = fi.compile(spec)
    assert flt.passing_ids().tolist() == np.flatnonzero(ok).tolist()
    assert flt.passes(np.arange(cap)).tolist() == ok.tolist()
    again = fi.compile(spec)  # reused: rebuilt from the words kept (narrow) or shared (broad)
    np.testing.assert_array_equal(again.bits, flt.bits)
    assert again.estimate == flt.estimate and again.spans == flt.spans
    # What was kept must not carry the exclusions of the requests that reused it.
    base = fi.compile(dataclasses.replace(spec, exclude_items=()))
    assert base.passes(np.arange(cap)).tolist() == unexcluded.tolist()
