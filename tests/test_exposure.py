"""Exposure caps over real gRPC, with the memory store and a real redis-server: an item
shown N times without engagement is demoted; a click brings it back; state is bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from test_redis import REDIS, RedisServer

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.domain.query import StateEvent
from server.domain.strategy import load
from server.state.redis_store import RedisStore
from server.state.store import CLICK, EXPOSURE_ITEMS, IMPRESSION, MemoryStore, StateStore

C = pb.RequestContext
E = pb.Event


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(
    request: pytest.FixtureRequest,
    trained: TrainedStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two replicas of the server sharing state (Redis) or one serving twice (memory)."""
    if request.param == "memory":
        srv = ServerThread(make_settings(trained.artifacts))
        yield srv, srv
        srv.close()
        return
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path_factory.mktemp("redis-exposure"))
    # A generous timeout: a loaded test box must not degrade a replica to local state.
    settings = make_settings(
        trained.artifacts, state_backend="redis", redis_url=redis.url, redis_timeout_s=2.0
    )
    a, b = ServerThread(settings), ServerThread(settings)
    yield a, b
    a.close()
    b.close()
    redis.stop()


def _show(stub: pb_grpc.RecommenderStub, ctx: C, reply: pb.RecommendResponse, item: str) -> None:
    stub.TrackEvents(
        pb.TrackEventsRequest(
            events=[
                pb.Event(
                    type=E.RECOMMENDATION_IMPRESSION,
                    item_id=item,
                    recommendation_id=reply.recommendation_id,
                    context=ctx,
                )
            ]
        )
    )


def test_shown_without_engagement_is_demoted_until_clicked(
    backend: tuple[ServerThread, ServerThread], trained: TrainedStore
) -> None:
    writer_ch = grpc.insecure_channel(backend[0].target)
    reader_ch = grpc.insecure_channel(backend[1].target)
    writer, reader = pb_grpc.RecommenderStub(writer_ch), pb_grpc.RecommenderStub(reader_ch)
    try:
        user = str(trained.dataset.user_ids[7])
        ctx = C(user_id=user, country="DE", placement=C.HOME)
        assert load().strategies["home"].exposure_cap == 3
        first = reader.Recommend(pb.RecommendRequest(context=ctx, num_results=10))
        top = first.items[0].item_id
        for _ in range(2):
            _show(writer, ctx, first, top)
        again = reader.Recommend(pb.RecommendRequest(context=ctx, num_results=10))
        assert again.items[0].item_id == top  # 2 < 3 impressions: untouched
        _show(writer, ctx, first, top)
        capped = reader.Recommend(pb.RecommendRequest(context=ctx, num_results=10))
        ids = [i.item_id for i in capped.items]
        assert len(ids) == 10 and top not in ids
        scores = [i.score for i in capped.items]
        assert scores == sorted(scores, reverse=True)
        # A looser cap on the request wins over the strategy's.
        loose = reader.Recommend(
            pb.RecommendRequest(context=ctx, num_results=10, diversity=pb.Diversity(exposure_cap=5))
        )
        assert loose.items[0].item_id == top
        # Engaging resets the count.
        writer.TrackEvents(
            pb.TrackEventsRequest(
                events=[
                    pb.Event(
                        type=E.RECOMMENDATION_CLICK,
                        item_id=top,
                        recommendation_id=first.recommendation_id,
                        context=ctx,
                    )
                ]
            )
        )
        back = reader.Recommend(pb.RecommendRequest(context=ctx, num_results=10))
        assert back.items[0].item_id == top
    finally:
        writer_ch.close()
        reader_ch.close()


def test_strategy_without_cap_ignores_impressions(
    backend: tuple[ServerThread, ServerThread], trained: TrainedStore
) -> None:
    with grpc.insecure_channel(backend[0].target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        ctx = C(user_id=str(trained.dataset.user_ids[8]), country="DE", placement=C.HOME)
        first = stub.Recommend(pb.RecommendRequest(context=ctx, strategy="default"))
        top = first.items[0].item_id
        for _ in range(5):
            _show(stub, ctx, first, top)
        assert load().strategies["default"].exposure_cap == 0
        same = stub.Recommend(pb.RecommendRequest(context=ctx, strategy="default"))
        assert same.items[0].item_id == top
        capped = stub.Recommend(
            pb.RecommendRequest(
                context=ctx, strategy="default", diversity=pb.Diversity(exposure_cap=5)
            )
        )
        assert top not in [i.item_id for i in capped.items]


def test_bad_exposure_cap_is_invalid(backend: tuple[ServerThread, ServerThread]) -> None:
    with grpc.insecure_channel(backend[0].target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(pb.RecommendRequest(diversity=pb.Diversity(exposure_cap=-1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("diversity.exposure_cap")


async def _bounded_and_forgotten(store: StateStore) -> tuple[int, int, float]:
    key, now = "u:heavy-browser", time.time()
    # item-0 twice first, then more distinct items than the bound keeps.
    events = [StateEvent(key=key, kind=IMPRESSION, item_id="item-0", ts_s=now)] * 2
    events += [
        StateEvent(key=key, kind=IMPRESSION, item_id=f"item-{i}", ts_s=now)
        for i in range(1, 3 * EXPOSURE_ITEMS)
    ]
    events += [StateEvent(key=key, kind=CLICK, item_id="item-1", ts_s=now)]
    await store.apply(events)
    profile = await store.profile(key)
    counts = dict(profile.exposures)
    kept = len(counts)
    assert round(counts.get("item-0", 0.0)) == 2 and "item-1" not in counts
    await store.forget(key)
    after = len((await store.profile(key)).exposures)
    return kept, after, counts["item-0"]


def test_memory_exposures_are_bounded_and_forgotten() -> None:
    kept, after, _ = asyncio.run(_bounded_and_forgotten(MemoryStore()))
    assert kept <= 2 * EXPOSURE_ITEMS and after == 0


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
def test_redis_exposures_are_bounded_ttld_and_forgotten(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    redis = RedisServer(tmp_path_factory.mktemp("redis-bounded"))
    try:

        async def run() -> tuple[int, int, float]:
            store = RedisStore(redis.url, ttl_s=3600, timeout_s=1.0)
            try:
                await store.apply(
                    [StateEvent(key="u:ttl", kind=IMPRESSION, item_id="a", ts_s=time.time())]
                )
                ttl = int(await store.client.ttl(store._seen("u:ttl")))
                kept, after, _ = await _bounded_and_forgotten(store)
                assert 0 < ttl <= 3600
                return kept, after, ttl
            finally:
                await store.close()

        kept, after, _ = asyncio.run(run())
        assert kept <= 2 * EXPOSURE_ITEMS and after == 0
    finally:
        redis.stop()


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_strategy_file_rejects_a_bad_exposure_cap(value: object) -> None:
    from server.domain.strategy import StrategyConfigError, defaults_raw, parse

    with pytest.raises(StrategyConfigError, match=r"strategy\.home\.exposure_cap"):
        parse({"strategy": {"home": {"exposure_cap": value}}}, defaults_raw())
    assert (
        parse({"strategy": {"home": {"exposure_cap": 0}}}, defaults_raw())
        .strategies["home"]
        .exposure_cap
        == 0
    )
