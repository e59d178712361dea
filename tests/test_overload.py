"""Deadlines, the per-call time budget and admission control, over real gRPC."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc

Prov = pb.RecommendedItem.Provenance
CHEAP = {Prov.SEGMENT_POPULARITY, Prov.GLOBAL_POPULARITY}


def known_user(trained: TrainedStore) -> str:
    return str(trained.dataset.user_ids[0])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def hurried(trained: TrainedStore) -> Iterator[ServerThread]:
    """Every call is short of time: the server's own budget is below the fallback line."""
    thread = ServerThread(
        make_settings(trained.artifacts, request_budget_s=0.001, fallback_below_s=60.0)
    )
    yield thread
    thread.close()


def test_short_budget_answers_from_popularity_under_the_same_filters(
    hurried: ServerThread, stub: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ctx = pb.RequestContext(user_id=known_user(trained), country="DE", currency="EUR")
    flt = pb.Filters(max_price=40.0)
    request = pb.RecommendRequest(context=ctx, filters=flt, num_results=20)
    full = stub.Recommend(request)
    assert full.personalized and not {i.provenance for i in full.items} <= CHEAP
    before = sample("endcap_budget_fallbacks_total", method="Recommend")
    with grpc.insecure_channel(hurried.target) as channel:
        cheap = pb_grpc.RecommenderStub(channel).Recommend(request)
        seed = cheap.items[0].item_id
        with_seed = pb_grpc.RecommenderStub(channel).Recommend(
            pb.RecommendRequest(context=ctx, filters=flt, num_results=20, seed_item_ids=[seed])
        )
    assert len(cheap.items) == 20 and not cheap.personalized
    assert {i.provenance for i in cheap.items} <= CHEAP
    assert all(i.price <= 40.0 and i.in_stock for i in cheap.items)  # hard filters still hold
    assert seed not in {i.item_id for i in with_seed.items}  # seeds are never returned
    assert sample("endcap_budget_fallbacks_total", method="Recommend") == before + 2


def test_short_budget_similar_items(hurried: ServerThread, trained: TrainedStore) -> None:
    seeds = [str(i) for i in trained.dataset.item_ids[:2]]
    with grpc.insecure_channel(hurried.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        reply = stub.SimilarItems(pb.SimilarItemsRequest(seed_item_ids=seeds, num_results=10))
        assert len(reply.items) == 10
        assert {i.provenance for i in reply.items} <= CHEAP
        assert not set(seeds) & {i.item_id for i in reply.items}
        with pytest.raises(grpc.RpcError) as err:
            stub.SimilarItems(pb.SimilarItemsRequest(seed_item_ids=["no-such-item"]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        popular = stub.Popular(pb.PopularRequest(num_results=5))
        assert len(popular.items) == 5


def test_the_client_deadline_sets_the_budget(trained: TrainedStore) -> None:
    """No server cap: a call whose deadline leaves less than the fallback line gets the
    cheap answer; one with time to spare gets the full path."""
    thread = ServerThread(
        make_settings(trained.artifacts, request_budget_s=0.0, fallback_below_s=5.0)
    )
    try:
        ctx = pb.RequestContext(user_id=known_user(trained), country="DE")
        request = pb.RecommendRequest(context=ctx, num_results=10)
        with grpc.insecure_channel(thread.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            relaxed = stub.Recommend(request, timeout=60)
            hurried = stub.Recommend(request, timeout=3)
            no_deadline = stub.Recommend(request)
    finally:
        thread.close()
    assert relaxed.personalized and no_deadline.personalized
    assert not hurried.personalized
    assert {i.provenance for i in hurried.items} <= CHEAP


def _open_stream(stub: pb_grpc.RecommenderStub) -> tuple[queue.Queue[Any], grpc.Future[Any]]:
    """A StreamEvents call that stays open (in flight) until None is put on its queue."""
    feed: queue.Queue[Any] = queue.Queue()

    def batches() -> Iterator[pb.StreamEventsRequest]:
        while (batch := feed.get()) is not None:
            yield batch

    return feed, stub.StreamEvents.future(batches(), timeout=60)


def _wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def test_calls_beyond_max_in_flight_are_refused_fast(trained: TrainedStore) -> None:
    thread = ServerThread(make_settings(trained.artifacts, max_in_flight=2))
    try:
        with grpc.insecure_channel(thread.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            before = sample("endcap_shed_total", reason="in_flight")
            base = sample("endcap_in_flight_requests")
            streams = [_open_stream(stub) for _ in range(2)]
            _wait_for(lambda: sample("endcap_in_flight_requests") == base + 2)
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(pb.RecommendRequest(num_results=3), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in flight" in (err.value.details() or "")
            assert sample("endcap_shed_total", reason="in_flight") == before + 1
            # Health is never refused: orchestrators must not restart a busy server.
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="endcap.v1.Recommender"), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            item = str(trained.dataset.item_ids[0])
            view = pb.Event(
                type=pb.Event.VIEW, item_id=item, context=pb.RequestContext(session_id="s-1")
            )
            for feed, _ in streams:
                feed.put(pb.StreamEventsRequest(events=[view]))
                feed.put(None)
            assert [call.result().accepted for _, call in streams] == [1, 1]
            _wait_for(lambda: sample("endcap_in_flight_requests") == base)
            assert len(stub.Recommend(pb.RecommendRequest(num_results=3)).items) == 3
    finally:
        thread.close()


def test_budget_settings_are_checked() -> None:
    from server.infra.settings import Settings, SettingsError

    for name in ("ENDCAP_MAX_IN_FLIGHT", "ENDCAP_REQUEST_BUDGET_S", "ENDCAP_FALLBACK_BELOW_S"):
        with pytest.raises(SettingsError, match=name.removeprefix("ENDCAP_").lower()):
            Settings.from_env({name: "-1"})
    assert Settings.from_env({"ENDCAP_MAX_IN_FLIGHT": "0"}).max_in_flight == 0  # no bound


def test_fallback_results_are_unique_ranked_and_bounded(hurried: ServerThread) -> None:
    with grpc.insecure_channel(hurried.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for k in (1, 7, 500):
            items = stub.Recommend(pb.RecommendRequest(num_results=k)).items
            ids = [i.item_id for i in items]
            assert len(ids) == len(set(ids)) <= k
            assert np.all(np.diff([i.score for i in items]) <= 0)
