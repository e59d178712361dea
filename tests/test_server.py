"""The real server over loopback gRPC: semantics, errors, health, reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from conftest import TrainedStore
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc

Device = pb.RequestContext.Device
Prov = pb.RecommendedItem.Provenance


def known_user(trained: TrainedStore, country: str) -> str:
    ds = trained.dataset
    c = ds.country_codes.index(country)
    return str(ds.user_ids[np.flatnonzero(ds.user_country == c)[0]])


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "endcap.v1.Recommender"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"endcap.v1.Recommender", "grpc.health.v1.Health"} <= names
    described = list(
        stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="endcap.v1.Recommender"
                    )
                ]
            )
        )
    )
    assert described[0].file_descriptor_response.file_descriptor_proto


def test_recommend_known_user_is_personalised(
    stub: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    user = known_user(trained, "DE")
    ctx = pb.RequestContext(user_id=user, country="DE", currency="EUR", device=Device.MOBILE)
    first = stub.Recommend(pb.RecommendRequest(context=ctx, num_results=20))
    second = stub.Recommend(pb.RecommendRequest(context=ctx, num_results=20))
    assert first.personalized
    assert len(first.items) == 20
    assert first.model_version and first.currency == "EUR"
    assert first.recommendation_id != second.recommendation_id
    assert [i.item_id for i in first.items] == [i.item_id for i in second.items]
    scores = [i.score for i in first.items]
    assert scores == sorted(scores, reverse=True)
    assert {i.provenance for i in first.items} <= {Prov.ANN_RETRIEVAL, Prov.EXACT_SCAN}


def test_default_num_results_is_ten(stub: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    reply = stub.Recommend(
        pb.RecommendRequest(context=pb.RequestContext(user_id=known_user(trained, "US")))
    )
    assert len(reply.items) == 10


def test_cold_start_gets_segment_bestsellers(stub: pb_grpc.RecommenderStub) -> None:
    reply = stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(session_id="s-new", country="DE", device=Device.MOBILE),
            num_results=15,
        )
    )
    assert not reply.personalized
    assert len(reply.items) == 15
    assert {i.provenance for i in reply.items} <= {Prov.SEGMENT_POPULARITY, Prov.GLOBAL_POPULARITY}
    assert reply.items[0].provenance == Prov.SEGMENT_POPULARITY


def test_context_changes_ranking(stub: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    user = known_user(trained, "US")
    mobile = stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(user_id=user, device=Device.MOBILE), num_results=20
        )
    )
    desktop = stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(user_id=user, device=Device.DESKTOP), num_results=20
        )
    )
    assert [i.item_id for i in mobile.items] != [i.item_id for i in desktop.items]
    de = stub.Recommend(
        pb.RecommendRequest(context=pb.RequestContext(country="DE"), num_results=20)
    )
    us = stub.Recommend(
        pb.RecommendRequest(context=pb.RequestContext(country="US"), num_results=20)
    )
    assert [i.item_id for i in de.items] != [i.item_id for i in us.items]


def test_similar_items_excludes_seeds(stub: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    seeds = [str(s) for s in trained.dataset.item_ids[:3]]
    reply = stub.SimilarItems(pb.SimilarItemsRequest(seed_item_ids=seeds, num_results=30))
    returned = [i.item_id for i in reply.items]
    assert len(returned) == 30
    assert not set(returned) & set(seeds)
    assert len(set(returned)) == len(returned)


def test_similar_items_unknown_seed_is_not_found(
    stub: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.SimilarItems(
            pb.SimilarItemsRequest(seed_item_ids=[str(trained.dataset.item_ids[0]), "no-such-item"])
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-item" in (err.value.details() or "")


def test_rerank_reports_unknown_and_filtered(
    stub: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    out_of_stock = [str(i) for i in ds.item_ids[~ds.item_in_stock][:3]]
    in_stock = [str(i) for i in ds.item_ids[ds.item_in_stock][:20]]
    candidates = in_stock + out_of_stock + ["ghost-1", "ghost-2"]
    reply = stub.Rerank(
        pb.RerankRequest(
            candidate_item_ids=candidates,
            context=pb.RequestContext(user_id=known_user(trained, "US")),
        )
    )
    assert list(reply.unknown_item_ids) == ["ghost-1", "ghost-2"]
    assert set(reply.filtered_item_ids) == set(out_of_stock)
    assert sorted(i.item_id for i in reply.items) == sorted(in_stock)
    assert all(i.provenance == Prov.RERANKED_CANDIDATE for i in reply.items)
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)
    top5 = stub.Rerank(pb.RerankRequest(candidate_item_ids=candidates, num_results=5))
    assert len(top5.items) == 5


def test_rerank_keeps_out_of_stock_when_asked(
    stub: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    out_of_stock = [str(i) for i in ds.item_ids[~ds.item_in_stock][:3]]
    reply = stub.Rerank(
        pb.RerankRequest(candidate_item_ids=out_of_stock, filters=pb.Filters(in_stock_only=False))
    )
    assert sorted(i.item_id for i in reply.items) == sorted(out_of_stock)
    assert not any(i.in_stock for i in reply.items)


INVALID = [
    (pb.RecommendRequest(num_results=501), "num_results"),
    (pb.RecommendRequest(num_results=-1), "num_results"),
    (pb.RecommendRequest(filters=pb.Filters(min_price=10, max_price=5)), "filters.min_price"),
    (pb.RecommendRequest(filters=pb.Filters(max_price=-1)), "filters.max_price"),
    (pb.RecommendRequest(filters=pb.Filters(min_price=float("nan"))), "filters.min_price"),
    (pb.RecommendRequest(context=pb.RequestContext(device=42)), "context.device"),  # type: ignore[arg-type]
    (pb.RecommendRequest(context=pb.RequestContext(placement=42)), "context.placement"),  # type: ignore[arg-type]
    (pb.RecommendRequest(context=pb.RequestContext(country="Germany")), "context.country"),
    (pb.RecommendRequest(context=pb.RequestContext(country="D1")), "context.country"),
    (pb.RecommendRequest(context=pb.RequestContext(currency="EURO")), "context.currency"),
    (pb.RecommendRequest(context=pb.RequestContext(currency="XYZ")), "context.currency"),
    (pb.RecommendRequest(context=pb.RequestContext(user_id="u" * 129)), "context.user_id"),
    (pb.RecommendRequest(filters=pb.Filters(brands=[""])), "filters.brands[0]"),
    (
        pb.RecommendRequest(filters=pb.Filters(exclude_item_ids=["x"] * 1001)),
        "filters.exclude_item_ids",
    ),
]


@pytest.mark.parametrize(("request_", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_recommend_names_the_field(
    stub: pb_grpc.RecommenderStub, request_: pb.RecommendRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)
    status = rpc_status.from_call(err.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violations)
    assert violations.field_violations[0].field == field


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.RerankRequest(), "candidate_item_ids"),
        (pb.RerankRequest(candidate_item_ids=[f"i{i}" for i in range(501)]), "candidate_item_ids"),
        (pb.RerankRequest(candidate_item_ids=["a", "b", "a"]), "candidate_item_ids[2]"),
        (pb.RerankRequest(candidate_item_ids=["a"], num_results=1000), "num_results"),
    ],
)
def test_invalid_rerank_names_the_field(
    stub: pb_grpc.RecommenderStub, request_: pb.RerankRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SimilarItemsRequest(), "seed_item_ids"),
        (pb.SimilarItemsRequest(seed_item_ids=[f"i{i}" for i in range(51)]), "seed_item_ids"),
        (
            pb.SimilarItemsRequest(
                seed_item_ids=["a"], num_results=0, context=pb.RequestContext(country="xx1")
            ),
            "context.country",
        ),
    ],
)
def test_invalid_similar_names_the_field(
    stub: pb_grpc.RecommenderStub, request_: pb.SimilarItemsRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.SimilarItems(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)


def test_unknown_country_ships_nothing(stub: pb_grpc.RecommenderStub) -> None:
    reply = stub.Recommend(pb.RecommendRequest(context=pb.RequestContext(country="ZZ")))
    assert len(reply.items) == 0


def test_unknown_category_and_brand_match_nothing(stub: pb_grpc.RecommenderStub) -> None:
    assert not stub.Recommend(
        pb.RecommendRequest(filters=pb.Filters(include_categories=["no/such"]))
    ).items
    assert not stub.Recommend(pb.RecommendRequest(filters=pb.Filters(brands=["NoSuchBrand"]))).items
