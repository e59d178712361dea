"""Shared state in a real redis-server: the store itself, two replicas sharing it, and
degrading to local state while Redis is down, recovering when it returns."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import grpc
import pytest
import redis
from test_cli import free_port

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.domain.query import StateEvent
from server.state.redis_store import RedisStore
from server.state.store import LONG_TAU_S

REDIS = shutil.which("redis-server")
if REDIS is None and os.environ.get("CI"):
    raise RuntimeError("redis-server is required in CI (.ci/run installs it)")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


class RedisServer:
    """A throwaway redis-server on a loopback port, stoppable and restartable."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def de_item(trained: TrainedStore, nth: int) -> str:
    ds = trained.dataset
    ok = ds.item_countries[:, ds.country_codes.index("DE")] & ds.item_in_stock
    return str(ds.item_ids[ok][nth])


def test_store_round_trip(redis_server: RedisServer) -> None:
    async def run() -> None:
        store = RedisStore(redis_server.url, prefix="t1:", recent_items=3)
        now = time.time()
        events = [
            StateEvent("u:a", 1, f"i{i}", now + i, segments=("DE|mobile|*",)) for i in range(5)
        ]
        events += [
            StateEvent("u:a", 2, "i9", now + 6, segments=("DE|mobile|*",)),
            StateEvent("u:a", 4, "i8", now + 7, value=12.5, segments=("DE|mobile|*",)),
        ]
        await store.apply(events)
        profile = await store.profile("u:a")
        assert [i for i, _ in profile.recent] == ["i8", "i9", "i4"]
        assert profile.cart == ("i9",) and profile.purchased == ("i8",)
        assert profile.orders == 1 and profile.monetary == pytest.approx(12.5)
        top = await store.top("DE|mobile|*", 2, trending=False)
        assert [i for i, _ in top] == ["i8", "i9"]  # purchase 5 > cart 3 > view 1
        assert await store.forget("u:a") >= 5
        after = await store.profile("u:a")
        assert after.empty and after.forgotten
        await store.close()

    asyncio.run(run())


def test_memory_and_redis_rank_popularity_alike(redis_server: RedisServer) -> None:
    """Bestsellers and trending (the short horizon's 4n most active, ranked by their rise
    over the long horizon) are the same lists in either backend."""
    from server.state.store import MemoryStore

    seg = ("DE|*|*",)
    now = time.time()
    # 300 items with distinct histories: a long tail from yesterday, a burst this hour.
    events = [
        StateEvent("u:x", 1, f"i{i}", now - 86_400 + 97 * i, segments=seg)
        for i in range(300)
        for _ in range(1 + i % 7)
    ]
    events += [
        StateEvent("u:y", 2, f"i{(13 * j) % 300}", now - 3_000 + 11 * j, segments=seg)
        for j in range(200)
    ]

    async def run() -> None:
        redis_store = RedisStore(redis_server.url, prefix="t-rank:")
        memory = MemoryStore()
        for store in (redis_store, memory):
            await store.apply(events)
        for trending in (False, True):
            for n in (5, 60):
                a = await memory.top(seg[0], n, trending)
                b = await redis_store.top(seg[0], n, trending)
                assert [k for k, _ in a] == [k for k, _ in b], (trending, n)
                # Read a moment apart: a 1-hour horizon decays ~3e-7 per millisecond.
                assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4)
        await redis_store.close()

    asyncio.run(run())


def test_redis_counts_decay_at_any_date_and_across_epoch_moves(
    redis_server: RedisServer,
) -> None:
    far = 1_767_225_600.0 + 400 * 86_400.0  # 400 days after 2026-01-01
    seg = ("FR|*|*",)
    r = redis.Redis.from_url(redis_server.url)
    # Sums an older endcap left against its fixed epoch: dropped, not mixed in.
    r.zadd("t-decay:pop:FR|*|*:s", {"stale": 1e200})
    r.zadd("t-decay:pop:FR|*|*:l", {"stale": 1e40})

    def views(item: str, n: int, ts: float, kind: int = 1) -> list[StateEvent]:
        return [StateEvent("u:z", kind, item, ts, segments=seg) for _ in range(n)]

    async def run() -> None:
        store = RedisStore(redis_server.url, prefix="t-decay:")
        await store.apply(views("old", 10, far - 5 * 3_600.0) + views("new", 3, far))
        with mock.patch("server.state.redis_store.time.time", return_value=far):
            trending = await store.top(seg[0], 2, trending=True)
            assert [k for k, _ in trending] == ["new", "old"]
            best = dict(await store.top(seg[0], 3, trending=False))
        assert "stale" not in best
        assert best["old"] == pytest.approx(10 * math.exp(-5 * 3_600.0 / LONG_TAU_S), rel=1e-9)
        later = far + 30 * 3_600.0
        await store.apply(views("newest", 1, later, kind=4))  # a purchase weighs 5
        assert float(r.get("t-decay:pop:FR|*|*:epoch") or 0) == later
        with mock.patch("server.state.redis_store.time.time", return_value=later):
            got = dict(await store.top(seg[0], 3, trending=False))
        assert got["old"] == pytest.approx(10 * math.exp(-35 * 3_600.0 / LONG_TAU_S), rel=1e-9)
        assert got["new"] == pytest.approx(3 * math.exp(-30 * 3_600.0 / LONG_TAU_S), rel=1e-9)
        assert got["newest"] == pytest.approx(5.0, rel=1e-9)
        await store.close()

    asyncio.run(run())
    r.close()


def test_replicas_share_state(redis_server: RedisServer, trained: TrainedStore) -> None:
    settings = make_settings(trained.artifacts, state_backend="redis", redis_url=redis_server.url)
    a, b = ServerThread(settings), ServerThread(settings)
    try:
        item = de_item(trained, 11)
        ctx = pb.RequestContext(session_id="s-shared", country="DE")
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.RecommenderStub(ca), pb_grpc.RecommenderStub(cb)
            assert not stub_b.Recommend(pb.RecommendRequest(context=ctx)).personalized
            stub_a.TrackEvents(
                pb.TrackEventsRequest(
                    events=[pb.Event(type=pb.Event.VIEW, item_id=item, context=ctx)]
                )
            )
            recent = stub_b.RecentlyViewed(pb.RecentlyViewedRequest(context=ctx))
            assert [i.item_id for i in recent.items] == [item]
            assert stub_b.Recommend(pb.RecommendRequest(context=ctx)).personalized
    finally:
        a.close()
        b.close()


def test_redis_outage_degrades_then_recovers(
    redis_server: RedisServer, trained: TrainedStore
) -> None:
    settings = make_settings(trained.artifacts, state_backend="redis", redis_url=redis_server.url)
    srv = ServerThread(settings)
    gauge = srv.running.metrics.state_degraded
    try:
        item = de_item(trained, 12)
        ctx = pb.RequestContext(session_id="s-outage", country="DE")
        track = pb.TrackEventsRequest(
            events=[pb.Event(type=pb.Event.VIEW, item_id=item, context=ctx)]
        )
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            redis_server.stop()
            # Down: every call still succeeds, from local state.
            assert stub.TrackEvents(track).accepted == 1
            assert stub.Recommend(pb.RecommendRequest(context=ctx)).personalized
            assert gauge._value.get() == 1
            redis_server.start()
            deadline = time.monotonic() + 15
            while gauge._value.get() == 1:
                assert time.monotonic() < deadline, "never recovered"
                stub.Recommend(pb.RecommendRequest(context=ctx))
                time.sleep(0.1)
            assert stub.TrackEvents(track).accepted == 1
            recent = stub.RecentlyViewed(pb.RecentlyViewedRequest(context=ctx))
            assert [i.item_id for i in recent.items] == [item]  # written to Redis after recovery
    finally:
        srv.close()
