"""The nginx front of deploy/nginx: a real nginx proxying to the real server on loopback.
Calls pass through unchanged; read calls beyond its in-flight bound get RESOURCE_EXHAUSTED
at once; health and events are never shed."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.servers import ServerProcess, start_nginx_front
from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
DE = pb.RequestContext(country="DE", currency="EUR", user_id="u-front")


def front_for(server: ServerThread, max_in_flight: int) -> Iterator[ServerProcess]:
    front = start_nginx_front(server.target, max_in_flight)
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture
def roomy_front(server: ServerThread) -> Iterator[ServerProcess]:
    yield from front_for(server, 64)


@pytest.fixture
def tight_front(server: ServerThread) -> Iterator[ServerProcess]:
    yield from front_for(server, 1)


def test_calls_pass_through_unchanged(
    roomy_front: ServerProcess, stub: pb_grpc.RecommenderStub
) -> None:
    with grpc.insecure_channel(roomy_front.target) as ch:
        via = pb_grpc.RecommenderStub(ch)
        request = pb.RecommendRequest(context=DE, num_results=10)
        direct = [i.item_id for i in stub.Recommend(request).items]
        assert [i.item_id for i in via.Recommend(request).items] == direct
        # The server's own errors come back as they are.
        with pytest.raises(grpc.RpcError) as err:
            via.Recommend(pb.RecommendRequest(context=DE, num_results=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_results" in (err.value.details() or "")


def test_a_long_event_stream_passes_whole(
    roomy_front: ServerProcess, trained: TrainedStore
) -> None:
    """A gRPC stream is one HTTP request to nginx: its body must not meet nginx's 1 MB
    default, which would cut a StreamEvents stream after about 10k events."""
    item = str(trained.dataset.item_ids[1])
    batches = [
        pb.StreamEventsRequest(
            events=[
                pb.Event(
                    type=pb.Event.Type.VIEW,
                    item_id=item,
                    context=pb.RequestContext(session_id=f"s-front-{b}-{i}", country="DE"),
                )
                for i in range(1000)
            ]
        )
        for b in range(40)
    ]
    assert sum(b.ByteSize() for b in batches) > 1_500_000
    with grpc.insecure_channel(roomy_front.target) as ch:
        reply = pb_grpc.RecommenderStub(ch).StreamEvents(iter(batches), timeout=60)
    assert reply.accepted == 40_000 and reply.rejected_count == 0


def test_api_keys_pass_through(trained: TrainedStore, tmp_path: Path) -> None:
    """The manifests' pods check API keys behind the front: nginx must forward the
    key headers, and endcap's refusals must reach the client as they are."""
    keys = tmp_path / "api-keys"
    keys.write_text("k-front-read-0123456 read\n")
    server = ServerThread(make_settings(trained.artifacts, api_keys_file=str(keys)))
    front = start_nginx_front(server.target, 64)
    request = pb.RecommendRequest(context=DE, num_results=3)
    try:
        with grpc.insecure_channel(front.target) as ch:
            via = pb_grpc.RecommenderStub(ch)
            for metadata in (
                (("authorization", "Bearer k-front-read-0123456"),),
                (("x-api-key", "k-front-read-0123456"),),
            ):
                assert len(via.Recommend(request, metadata=metadata).items) == 3
            with pytest.raises(grpc.RpcError) as err:
                via.Recommend(request)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                via.DeleteItems(
                    pb.DeleteItemsRequest(item_ids=["x"]),
                    metadata=(("x-api-key", "k-front-read-0123456"),),
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        front.stop()
        server.close()


def test_reads_beyond_the_bound_are_shed_and_events_are_not(tight_front: ServerProcess) -> None:
    with grpc.insecure_channel(tight_front.target) as ch:
        via = pb_grpc.RecommenderStub(ch)
        request = pb.RecommendRequest(context=DE, num_results=20)
        via.Recommend(request)  # connection up
        # 48 concurrent streams on one connection against a bound of one in flight.
        futures = [via.Recommend.future(request, timeout=10) for _ in range(48)]
        codes: Counter[str] = Counter()
        messages: set[str | None] = set()
        for f in futures:
            exc = f.exception()
            if exc is None:
                codes["OK"] += 1
                continue
            assert isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call)
            codes[exc.code().name] += 1
            messages.add(exc.details())
        assert codes["OK"] >= 1 and codes["RESOURCE_EXHAUSTED"] >= 1, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert messages == {"endcap at capacity: retry with backoff"}
        # Events and health go through whatever the read load.
        event = pb.Event(
            type=pb.Event.Type.VIEW,
            item_id=via.Recommend(request).items[0].item_id,
            context=DE,
        )
        events = [via.TrackEvents.future(pb.TrackEventsRequest(events=[event])) for _ in range(8)]
        reads = [via.Recommend.future(request, timeout=10) for _ in range(24)]
        assert all(f.exception() is None for f in events)
        for f in reads:
            f.exception()
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
