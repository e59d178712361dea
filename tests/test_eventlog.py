"""The durable event log: framing, torn tails, group commit, tombstones, compaction, and
zero acknowledged events lost when the server is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from test_cli import ROOT, free_port, wait_serving

from conftest import TrainedStore
from endcap.v1 import eventlog_pb2
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.state.eventlog import EventLog, read_events, segments


def event(i: int, user: str = "u1") -> pb.Event:
    return pb.Event(
        type=pb.Event.VIEW,
        item_id=f"i{i}",
        event_id=f"e{i}",
        context=pb.RequestContext(user_id=user),
    )


def write(log: EventLog, batches: list[list[pb.Event]], now_ms: int = 1000) -> None:
    async def run() -> None:
        await asyncio.gather(*(log.append_events(b, now_ms) for b in batches))

    asyncio.run(run())


def test_round_trip_with_group_commit_and_rotation(tmp_path: Path) -> None:
    log = EventLog(tmp_path, fsync="always", segment_bytes=2_000)
    write(log, [[event(10 * b + i) for i in range(10)] for b in range(20)])
    log.close()
    records, stats = read_events(tmp_path)
    assert stats.events == 200 and stats.torn_bytes == 0
    assert sorted(r.event.event_id for r in records) == sorted(f"e{i}" for i in range(200))
    assert len(segments(tmp_path)) > 1


def test_torn_tail_is_ignored_then_truncated(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    write(log, [[event(i) for i in range(5)]])
    log.close()
    tail = segments(tmp_path)[-1]
    with tail.open("ab") as fh:
        fh.write(b"\x40\x00\x00\x00\x12\x34")  # a header cut short by a crash
    records, stats = read_events(tmp_path)
    assert stats.events == 5 and stats.torn_bytes == 6
    reopened = EventLog(tmp_path)
    write(reopened, [[event(9)]])
    reopened.close()
    records, stats = read_events(tmp_path)
    assert [r.event.event_id for r in records][-1] == "e9"
    assert stats.events == 6 and stats.torn_bytes == 0


def test_corrupt_frame_stops_the_read(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    write(log, [[event(i)] for i in range(3)])
    log.close()
    tail = segments(tmp_path)[-1]
    data = bytearray(tail.read_bytes())
    data[-3] ^= 0xFF  # flip a payload byte of the last frame: its CRC no longer matches
    tail.write_bytes(bytes(data))
    _, stats = read_events(tmp_path)
    assert stats.events == 2 and stats.torn_bytes > 0


def test_forget_tombstones_then_compaction_removes(tmp_path: Path) -> None:
    log = EventLog(tmp_path, segment_bytes=1_000)
    write(
        log,
        [[event(i, "gone") for i in range(10)], [event(100 + i, "stays") for i in range(10)]],
        now_ms=1000,
    )

    async def forget() -> int:
        return await log.forget("gone", "", 2000)

    assert asyncio.run(forget()) == 10
    write(log, [[event(200, "gone")]], now_ms=3000)  # after the tombstone: a new shopper
    write(log, [[event(300 + i, "stays") for i in range(20)]], now_ms=4000)  # rotate past it
    records, stats = read_events(tmp_path)
    assert stats.dead_events == 10
    assert {r.event.event_id for r in records if r.event.context.user_id == "gone"} == {"e200"}
    removed = log.compact()
    log.close()
    assert removed == 10
    raw = [
        r
        for path in segments(tmp_path)
        for r in _all_records(path)
        if r.WhichOneof("record") == "event" and r.event.context.user_id == "gone"
    ]
    assert [r.event.event_id for r in raw] == ["e200"]


def _all_records(path: Path) -> list[eventlog_pb2.LogRecord]:
    from server.state.eventlog import _frames

    return [r for _, r in _frames(path) if r is not None]


def test_no_acknowledged_event_is_lost_on_sigkill(trained: TrainedStore, tmp_path: Path) -> None:
    log_dir = tmp_path / "events"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "endcap.cli", "serve", "--artifacts", str(trained.artifacts),
         "--port", str(port), "--metrics-port", "0"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "ENDCAP_EVENT_LOG": str(log_dir), "ENDCAP_FSYNC": "always"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    items = [str(i) for i in trained.dataset.item_ids[:50]]
    acked: list[str] = []
    enough = threading.Event()

    def produce() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for b in range(10_000):
                batch = [
                    pb.Event(type=pb.Event.VIEW, item_id=items[i % 50], event_id=f"b{b}-{i}",
                             context=pb.RequestContext(session_id=f"s{b % 7}"))
                    for i in range(20)
                ]  # fmt: skip
                try:
                    reply = stub.TrackEvents(pb.TrackEventsRequest(events=batch), timeout=10)
                except grpc.RpcError:
                    return
                assert reply.accepted == 20
                acked.extend(e.event_id for e in batch)
                if len(acked) >= 2_000:
                    enough.set()

    try:
        wait_serving(f"127.0.0.1:{port}")
        producer = threading.Thread(target=produce)
        producer.start()
        assert enough.wait(timeout=120), "producer too slow"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        producer.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    records, _ = read_events(log_dir)
    logged = {r.event.event_id for r in records}
    missing = [e for e in acked if e not in logged]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged events lost"
    assert len(acked) >= 2_000
