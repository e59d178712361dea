"""Live catalog changes shared by replicas through a real redis-server stream: a change
on one replica reaches the others, a late replica replays them before SERVING, racing
writers converge, and an outage refuses writes (nothing diverges) and then recovers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np
import pytest
from test_redis import REDIS, RedisServer

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.domain.catalog import ItemUpdate
from server.state.catalog_feed import CatalogFeed, Change, decode, encode

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
DE = pb.RequestContext(country="DE", currency="EUR")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-feed"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, trained: TrainedStore) -> Iterator[list[ServerThread]]:
    settings = make_settings(trained.artifacts, state_backend="redis", redis_url=redis_server.url)
    threads = [ServerThread(settings), ServerThread(settings)]
    yield threads
    for t in threads:
        t.close()


def stub(replica: ServerThread) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(grpc.insecure_channel(replica.target))


def eventually(check: Callable[[], bool], what: str) -> None:
    """Replicas apply the stream asynchronously (milliseconds): poll, bounded."""
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def brand_items(s: pb_grpc.RecommenderStub, brand: str, ctx: pb.RequestContext = DE) -> list[str]:
    reply = s.Recommend(pb.RecommendRequest(context=ctx, filters=pb.Filters(brands=[brand])))
    return [i.item_id for i in reply.items]


def test_changes_round_trip_through_the_wire_format() -> None:
    changes: list[Change] = [
        ("upsert", ItemUpdate("a", "Shoes", "X", 9.5, "EUR", ("DE", "FR"), None)),
        ("upsert", ItemUpdate("b", in_stock=False)),
        ("delete", "c"),
    ]
    assert decode(encode(changes)) == changes
    with pytest.raises(ValueError, match="format"):
        decode(b'{"v": 99, "changes": []}')


def test_a_change_that_fails_to_apply_fails_its_writer_and_the_feed_goes_on(
    redis_server: RedisServer,
) -> None:
    """A bug applying one batch answers that batch's writer with the error; the
    follower keeps applying later batches instead of dying silently."""
    seen: list[str] = []

    async def apply(changes: Sequence[Change]) -> int:
        item = changes[0][1]
        if item == "poison":
            raise RuntimeError("cannot apply")
        seen.append(str(item))
        return len(changes)

    async def run() -> None:
        feed = CatalogFeed(redis_server.url, stream="endcap:catalog:poison", block_ms=50)
        await feed.catch_up(apply)
        feed.follow(apply)
        try:
            with pytest.raises(RuntimeError, match="cannot apply"):
                await asyncio.wait_for(feed.publish([("delete", "poison")]), 5)
            assert await asyncio.wait_for(feed.publish([("delete", "after")]), 5) == 1
            assert seen == ["after"] and feed.applied == 2
        finally:
            await feed.close()

    asyncio.run(run())


def test_a_change_on_one_replica_reaches_the_others(
    replicas: list[ServerThread], trained: TrainedStore
) -> None:
    a, b = (stub(r) for r in replicas)
    ds = trained.dataset
    category = ds.category_names[int(ds.item_category[0])]
    new = pb.CatalogItem(
        item_id="feed-1", category=category, brand="FeedBrand", price=20.0, currency="EUR",
        countries=["DE"],
    )  # fmt: skip
    reply = a.UpsertItems(pb.UpsertItemsRequest(items=[new]))
    assert (reply.created, reply.updated) == (1, 0)
    assert brand_items(a, "FeedBrand") == ["feed-1"]  # the writer: at once
    eventually(lambda: brand_items(b, "FeedBrand") == ["feed-1"], "new item on replica b")
    # Stock flips on b; a honours it too.
    b.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="feed-1", in_stock=False)]))
    assert brand_items(b, "FeedBrand") == []
    eventually(lambda: brand_items(a, "FeedBrand") == [], "out of stock on replica a")
    deleted = a.DeleteItems(pb.DeleteItemsRequest(item_ids=["feed-1", "never-was"]))
    assert deleted.deleted == 1 and list(deleted.unknown_item_ids) == ["never-was"]
    eventually(
        lambda: (
            list(b.Rerank(pb.RerankRequest(candidate_item_ids=["feed-1"])).unknown_item_ids)
            == ["feed-1"]
        ),
        "deleted on replica b",
    )


def test_a_late_replica_replays_the_stream_before_serving(
    replicas: list[ServerThread], redis_server: RedisServer, trained: TrainedStore
) -> None:
    a = stub(replicas[0])
    victim = str(trained.dataset.item_ids[5])
    a.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id=victim, in_stock=False)]))
    late = ServerThread(
        make_settings(trained.artifacts, state_backend="redis", redis_url=redis_server.url)
    )
    try:
        reply = stub(late).Rerank(pb.RerankRequest(candidate_item_ids=[victim]))
        assert list(reply.filtered_item_ids) == [victim]  # out of stock from its first call
    finally:
        late.close()
        a.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id=victim, in_stock=True)]))


def test_racing_writers_converge(replicas: list[ServerThread], trained: TrainedStore) -> None:
    """Each replica applies the stream in its order, its own writes included, so after
    both writes both hold the later one in stream order."""
    a, b = (stub(r) for r in replicas)
    ds = trained.dataset
    sold_in_de = ds.item_countries[:, ds.country_codes.index("DE")] & ds.item_in_stock
    item = str(ds.item_ids[np.flatnonzero(sold_in_de)[7]])
    rate_ctx = pb.RequestContext(country="DE", currency="EUR")

    def price(s: pb_grpc.RecommenderStub) -> float:
        reply = s.Rerank(pb.RerankRequest(context=rate_ctx, candidate_item_ids=[item]))
        return reply.items[0].price if reply.items else -1.0

    futures = [
        s.UpsertItems.future(
            pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id=item, price=p, currency="EUR")])
        )
        for s, p in ((a, 11.0), (b, 22.0), (a, 33.0), (b, 44.0))
    ]
    for f in futures:
        f.result()
    eventually(lambda: price(a) == price(b), "both replicas hold one price")
    assert price(a) in (11.0, 22.0, 33.0, 44.0)


def test_redis_down_refuses_changes_then_recovers(
    replicas: list[ServerThread], redis_server: RedisServer, trained: TrainedStore
) -> None:
    a, b = (stub(r) for r in replicas)
    item = str(trained.dataset.item_ids[9])
    change = pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id=item, in_stock=False)])
    behind = replicas[1].running.metrics.catalog_feed_behind
    redis_server.stop()
    try:
        with pytest.raises(grpc.RpcError) as err:
            a.UpsertItems(change)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not applied" in (err.value.details() or "")
        rerank = a.Rerank(pb.RerankRequest(candidate_item_ids=[item]))
        assert [i.item_id for i in rerank.items] == [item]  # refused means not applied here
        assert len(b.Recommend(pb.RecommendRequest(context=DE)).items) == 10  # reads still work
        eventually(lambda: behind._value.get() == 1, "replica b reports it is behind")
    finally:
        redis_server.start()
    # The stream's history went with the throwaway server; writes work again and
    # both replicas follow the new stream.
    deadline = time.monotonic() + 15
    while True:
        try:
            a.UpsertItems(change, timeout=5)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "writes never recovered"
            time.sleep(0.1)
    eventually(
        lambda: (
            list(b.Rerank(pb.RerankRequest(candidate_item_ids=[item])).filtered_item_ids) == [item]
        ),
        "replica b applies changes after the outage",
    )
    assert behind._value.get() == 0
