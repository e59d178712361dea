"""Property: for any request, every item passes every filter and nothing is short.

Ground truth comes from the training Dataset with plain per-column checks,
independent of the server's bitmaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TrainedStore
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from training.data import Dataset

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass(frozen=True)
class Case:
    context: pb.RequestContext
    filters: pb.Filters
    num_results: int


def ancestors(ds: Dataset) -> list[set[str]]:
    out = []
    for leaf in range(len(ds.category_names)):
        names, c = set(), leaf
        while c >= 0:
            names.add(ds.category_names[c])
            c = int(ds.category_parent[c])
        out.append(names)
    return out


def truth(ds: Dataset, case: Case) -> npt.NDArray[np.bool_]:
    """Which items pass the case's filters, checked column by column."""
    f, ctx = case.filters, case.context
    ok = np.ones(ds.n_items, dtype=bool)
    if ctx.country:
        if ctx.country in ds.country_codes:
            ok &= ds.item_countries[:, ds.country_codes.index(ctx.country)]
        else:
            ok[:] = False
    if not f.HasField("in_stock_only") or f.in_stock_only:
        ok &= ds.item_in_stock
    rate = ds.currency_rates[ctx.currency or ds.base_currency]
    price = ds.item_price * rate
    if f.HasField("min_price"):
        ok &= price >= f.min_price
    if f.HasField("max_price"):
        ok &= price <= f.max_price
    anc = ancestors(ds)
    cats = [anc[c] for c in ds.item_category]
    if f.include_categories:
        ok &= np.array([bool(c & set(f.include_categories)) for c in cats])
    if f.exclude_categories:
        ok &= np.array([not (c & set(f.exclude_categories)) for c in cats])
    if f.brands:
        ok &= np.isin(np.array(ds.brand_names)[ds.item_brand], list(f.brands))
    if f.exclude_item_ids:
        ok &= ~np.isin(ds.item_ids, list(f.exclude_item_ids))
    return ok


@st.composite
def cases(draw: st.DrawFn, ds: Dataset) -> Case:
    countries = [*ds.country_codes, "ZZ", ""]
    currencies = sorted(ds.currency_rates)
    ctx = pb.RequestContext(
        country=draw(st.sampled_from(countries)),
        currency=draw(st.sampled_from([*currencies, ""])),
        device=draw(
            st.sampled_from(
                [
                    pb.RequestContext.DEVICE_UNSPECIFIED,
                    pb.RequestContext.MOBILE,
                    pb.RequestContext.TABLET,
                    pb.RequestContext.DESKTOP,
                ]
            )
        ),
    )
    if draw(st.booleans()):
        ctx.user_id = str(ds.user_ids[draw(st.integers(0, ds.n_users - 1))])
    flt = pb.Filters()
    rate = ds.currency_rates[ctx.currency or ds.base_currency]
    quantiles = np.quantile(ds.item_price * rate, [0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    if draw(st.booleans()):
        flt.max_price = float(draw(st.sampled_from(quantiles.tolist())))
    if draw(st.booleans()):
        lo = float(draw(st.sampled_from(quantiles.tolist())))
        if not flt.HasField("max_price") or lo <= flt.max_price:
            flt.min_price = lo
    if draw(st.integers(0, 3)) == 0:
        flt.in_stock_only = draw(st.booleans())
    names = list(ds.category_names)
    flt.include_categories.extend(draw(st.lists(st.sampled_from([*names, "no/such"]), max_size=3)))
    flt.exclude_categories.extend(draw(st.lists(st.sampled_from(names), max_size=2)))
    if draw(st.integers(0, 3)) == 0:
        flt.brands.extend(
            draw(st.lists(st.sampled_from(list(ds.brand_names)), min_size=1, max_size=8))
        )
    flt.exclude_item_ids.extend(
        str(ds.item_ids[i]) for i in draw(st.lists(st.integers(0, ds.n_items - 1), max_size=20))
    )
    return Case(ctx, flt, draw(st.sampled_from([1, 5, 20, 100, 500])))


def check(
    ds: Dataset, case: Case, items: list[pb.RecommendedItem], allowed: npt.NDArray[np.bool_]
) -> None:
    index = {str(item_id): i for i, item_id in enumerate(ds.item_ids)}
    ids = [it.item_id for it in items]
    assert len(ids) == len(set(ids)), "duplicate items"
    rows = np.array([index[i] for i in ids], dtype=np.int64)
    assert allowed[rows].all(), (
        f"items failing a filter: {[i for i, r in zip(ids, rows, strict=True) if not allowed[r]]}"
    )
    assert len(ids) == min(case.num_results, int(allowed.sum())), "short or long result"
    rate = ds.currency_rates[case.context.currency or ds.base_currency]
    for it, row in zip(items, rows, strict=True):
        assert it.price == pytest.approx(ds.item_price[row] * rate)
        assert it.in_stock == bool(ds.item_in_stock[row])


@pytest.fixture(scope="module")
def ds(trained: TrainedStore) -> Dataset:
    return trained.dataset


def test_recommend_respects_every_filter(stub: pb_grpc.RecommenderStub, ds: Dataset) -> None:
    @PROPERTY_SETTINGS
    @given(cases(ds))
    def run(case: Case) -> None:
        reply = stub.Recommend(
            pb.RecommendRequest(
                context=case.context, filters=case.filters, num_results=case.num_results
            )
        )
        check(ds, case, list(reply.items), truth(ds, case))

    run()


def test_similar_items_respects_every_filter(stub: pb_grpc.RecommenderStub, ds: Dataset) -> None:
    @PROPERTY_SETTINGS
    @given(cases(ds), st.lists(st.integers(0, ds.n_items - 1), min_size=1, max_size=4, unique=True))
    def run(case: Case, seeds: list[int]) -> None:
        seed_ids = [str(ds.item_ids[s]) for s in seeds]
        reply = stub.SimilarItems(
            pb.SimilarItemsRequest(
                seed_item_ids=seed_ids,
                context=case.context,
                filters=case.filters,
                num_results=case.num_results,
            )
        )
        allowed = truth(ds, case)
        allowed[seeds] = False
        check(ds, case, list(reply.items), allowed)

    run()


def test_rerank_respects_every_filter(stub: pb_grpc.RecommenderStub, ds: Dataset) -> None:
    @PROPERTY_SETTINGS
    @given(
        cases(ds), st.lists(st.integers(0, ds.n_items - 1), min_size=1, max_size=500, unique=True)
    )
    def run(case: Case, candidates: list[int]) -> None:
        cand_ids = [str(ds.item_ids[c]) for c in candidates]
        reply = stub.Rerank(
            pb.RerankRequest(
                candidate_item_ids=cand_ids,
                context=case.context,
                filters=case.filters,
                num_results=case.num_results,
            )
        )
        allowed = np.zeros(ds.n_items, dtype=bool)
        allowed[candidates] = truth(ds, case)[candidates]
        check(ds, case, list(reply.items), allowed)
        assert set(reply.filtered_item_ids) == {
            cand_ids[i] for i, c in enumerate(candidates) if not allowed[c]
        }

    run()
