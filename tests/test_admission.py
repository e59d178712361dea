"""Queue-delay shedding: the CoDel rule on synthetic clocks, and a saturated real server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.transport.admission import QueueDelay

KEY = ("ipv4:127.0.0.1:5000", "/endcap.v1.Recommender/Recommend")


def test_delay_is_read_from_the_deadline_against_the_freshest_call() -> None:
    q = QueueDelay(target_s=0.02, interval_s=0.1)
    assert q.delay(KEY, 0.250, now=0.0) == 0.0  # the first call is the reference
    assert q.delay(KEY, 0.200, now=0.01) == pytest.approx(0.050)
    assert q.delay(("other", KEY[1]), 0.100, now=0.02) == 0.0  # its own reference
    assert q.delay(KEY, 0.300, now=0.03) == 0.0  # a fresher call raises the reference
    assert q.delay(KEY, 0.250, now=0.04) == pytest.approx(0.050)


def test_a_burst_is_not_a_queue_and_fresh_calls_are_never_refused() -> None:
    q = QueueDelay(target_s=0.02, interval_s=0.1)
    # First interval: every call waited 50 ms, but nothing is refused yet.
    assert not any(q.refuse(0.05, now=t / 100) for t in range(10))
    # The queue stood for the whole interval: calls that waited are refused...
    assert q.refuse(0.05, now=0.10)
    # ... calls that did not wait are answered.
    assert not q.refuse(0.001, now=0.11)
    # An interval where most calls did not wait ends it.
    for t in range(12, 20):
        q.refuse(0.001, now=t / 100)
    assert not q.refuse(0.05, now=0.21)


def test_a_few_calls_or_an_idle_interval_show_no_standing_queue() -> None:
    few = QueueDelay(target_s=0.02, interval_s=0.1)
    for t in range(4):  # every call waited, but four calls are not a queue
        few.refuse(0.05, now=t / 40)
    assert not few.refuse(0.05, now=0.10)
    idle = QueueDelay(target_s=0.02, interval_s=0.1)
    for t in range(10):
        idle.refuse(0.05, now=t / 100)
    # Nothing arrived for a whole interval: whatever queued before has drained.
    assert not idle.refuse(0.05, now=0.25)


@pytest.fixture(scope="module")
def queueing(trained: TrainedStore) -> Iterator[ServerThread]:
    """A server that refuses calls queued over 1 ms once a queue stands for 10 ms."""
    thread = ServerThread(
        make_settings(
            trained.artifacts, queue_target_s=0.001, queue_interval_s=0.01, max_in_flight=0
        )
    )
    yield thread
    thread.close()


def test_a_saturated_server_sheds_queued_calls_and_stays_healthy(
    queueing: ServerThread, trained: TrainedStore
) -> None:
    def shed() -> float:
        return REGISTRY.get_sample_value("endcap_shed_total", {"reason": "queue"}) or 0.0

    before = shed()
    items = [str(i) for i in trained.dataset.item_ids[:300]]
    heavy = pb.RerankRequest(
        context=pb.RequestContext(user_id=str(trained.dataset.user_ids[0])),
        candidate_item_ids=items,
        num_results=50,
    )
    view = pb.Event(
        type=pb.Event.VIEW,
        item_id=items[0],
        context=pb.RequestContext(session_id="queued-shopper"),
    )
    codes: set[grpc.StatusCode] = set()
    event_codes: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(queueing.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        # Far more calls at once than the loop answers: gRPC queues them, and each
        # round stands long enough to be a queue. Bounded: at most 20 rounds.
        for _ in range(20):
            futures, events = [], []
            for i in range(200):
                futures.append(stub.Rerank.future(heavy, timeout=60))
                if i % 10 == 0:  # events queue as long, but are never refused for it
                    track = pb.TrackEventsRequest(events=[view])
                    events.append(stub.TrackEvents.future(track, timeout=60))
            codes |= {f.code() for f in futures}
            event_codes |= {f.code() for f in events}
            if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
                break
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert event_codes == {grpc.StatusCode.OK}
        assert shed() > before
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="endcap.v1.Recommender"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A call that did not queue is answered, whatever state the shedder is in.
        assert len(stub.Recommend(pb.RecommendRequest(num_results=3), timeout=30).items) == 3


def test_queue_settings_are_checked() -> None:
    from server.infra.settings import Settings, SettingsError

    for name in ("ENDCAP_QUEUE_TARGET_S", "ENDCAP_QUEUE_INTERVAL_S"):
        with pytest.raises(SettingsError, match=name.removeprefix("ENDCAP_").lower()):
            Settings.from_env({name: "-1"})
    assert Settings.from_env({"ENDCAP_QUEUE_TARGET_S": "0"}).queue_target_s == 0  # off
