"""Graceful shutdown of `endcap serve`: on SIGTERM health flips to NOT_SERVING, new calls
are refused, a call in flight finishes, and every acknowledged event is in the log."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli import ROOT, free_port, wait_serving

from conftest import TrainedStore
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.state.eventlog import read_events

SERVICE = "endcap.v1.Recommender"


def test_sigterm_drains_in_flight_calls_and_flushes_the_event_log(
    trained: TrainedStore, tmp_path: Path
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_dir = tmp_path / "events"
    env = os.environ | {"ENDCAP_EVENT_LOG": str(log_dir), "ENDCAP_GRACE_S": "30"}
    out = (tmp_path / "server.log").open("w+")
    cmd = [sys.executable, "-m", "endcap.cli", "serve", "--artifacts", str(trained.artifacts)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(target)
        items = [str(i) for i in trained.dataset.item_ids[:50]]

        def batch(n: int) -> pb.StreamEventsRequest:
            ctx = pb.RequestContext(session_id=f"drain-{n}", country="DE")
            return pb.StreamEventsRequest(
                events=[pb.Event(type=pb.Event.VIEW, item_id=i, context=ctx) for i in items]
            )

        with grpc.insecure_channel(target) as channel:
            statuses: queue.Queue[int] = queue.Queue()
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=60
            )

            def follow() -> None:
                try:
                    for update in watch:
                        statuses.put(update.status)
                except grpc.RpcError:
                    pass

            threading.Thread(target=follow, daemon=True).start()
            assert statuses.get(timeout=30) == health_pb2.HealthCheckResponse.SERVING

            feed: queue.Queue[pb.StreamEventsRequest | None] = queue.Queue()

            def batches() -> Iterator[pb.StreamEventsRequest]:
                while (b := feed.get()) is not None:
                    yield b

            stream = pb_grpc.RecommenderStub(channel).StreamEvents.future(batches(), timeout=60)
            feed.put(batch(1))
            # SIGTERM only once the server has the stream (its first batch is in the
            # log): a call that has not reached the server yet is refused, not drained.
            deadline = time.monotonic() + 30
            while len(read_events(log_dir)[0]) < len(items):
                assert time.monotonic() < deadline, "the first batch never reached the log"
                time.sleep(0.01)

            proc.send_signal(signal.SIGTERM)
            assert statuses.get(timeout=30) == health_pb2.HealthCheckResponse.NOT_SERVING

            # New calls are refused (once the server stops listening) ...
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, "new calls were still accepted"
                with grpc.insecure_channel(target) as fresh:
                    try:
                        pb_grpc.RecommenderStub(fresh).Recommend(
                            pb.RecommendRequest(num_results=1), timeout=5
                        )
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        break
            # ... while the call in flight goes on and completes.
            feed.put(batch(2))
            feed.put(None)
            reply = stream.result(timeout=30)
        assert reply.accepted == 2 * len(items) and reply.rejected_count == 0
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.seek(0)
        text = out.read()
        out.close()
    assert "shutting down" in text, text
    logged, _ = read_events(log_dir)
    sessions = [r.event.context.session_id for r in logged]
    assert sessions.count("drain-1") == sessions.count("drain-2") == len(items)
