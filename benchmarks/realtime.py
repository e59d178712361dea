"""Scenarios of the real-time loop: event freshness (one process, and two replicas sharing
Redis), model reloads under load, and a 10k-item UpsertItems batch under load."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from benchmarks.loadgen import SERVICE, check_loopback
from benchmarks.servers import HOST, ServerProcess, free_port
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc


@dataclass
class Probe:
    """Latencies of a steady open-loop Recommend stream, with their send times."""

    sent_at: list[float] = field(default_factory=list)
    latency_us: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    def window(self, start: float, end: float) -> dict[str, float]:
        t = np.asarray(self.sent_at)
        lat = np.asarray(self.latency_us)
        sel = lat[(t >= start) & (t < end)] if t.size else lat
        if sel.size == 0:
            return {"count": 0, "p50_us": math.nan, "p99_us": math.nan, "max_us": math.nan}
        return {
            "count": int(sel.size),
            "p50_us": round(float(np.percentile(sel, 50)), 1),
            "p99_us": round(float(np.percentile(sel, 99)), 1),
            "max_us": round(float(sel.max()), 1),
        }


async def _probe_load(
    target: str, payloads: list[bytes], rate_qps: float, stop: asyncio.Event, probe: Probe
) -> None:
    """Open-loop Recommend at `rate_qps` until `stop`, latency from the intended send time."""
    check_loopback(target)
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(SERVICE + "Recommend")
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        i = 0

        async def one(payload: bytes, intended: float) -> None:
            try:
                await call(payload, timeout=10.0)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            probe.sent_at.append(intended)
            probe.latency_us.append((time.perf_counter() - intended) * 1e6)
            probe.codes[code] += 1

        while not stop.is_set():
            intended = start + i / rate_qps
            now = time.perf_counter()
            if intended > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), intended - now)
                continue
            task = asyncio.create_task(one(payloads[i % len(payloads)], intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            if len(tasks) > 5000:
                break
        if tasks:
            await asyncio.wait(tasks, timeout=15)


async def _under_load(
    target: str,
    payloads: list[bytes],
    rate_qps: float,
    action: Callable[[], Awaitable[list[tuple[float, float]]]],
    settle_s: float = 1.0,
) -> tuple[Probe, list[tuple[float, float]], tuple[float, float]]:
    """Run `action` (returning its (start, end) windows) while a probe load runs."""
    probe = Probe()
    stop = asyncio.Event()
    load = asyncio.create_task(_probe_load(target, payloads, rate_qps, stop, probe))
    await asyncio.sleep(settle_s)
    t0 = time.perf_counter()
    windows = await action()
    t1 = time.perf_counter()
    await asyncio.sleep(settle_s)
    stop.set()
    await load
    return probe, windows, (t0, t1)


def reload_under_load(
    target: str, payloads: list[bytes], rate_qps: float, times: int = 5
) -> dict[str, Any]:
    """ReloadModel `times` times in a row under a steady Recommend load: failed requests
    (must be 0) and the latency blip while reloading vs outside."""

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(target) as channel:
            reload = pb_grpc.RecommenderStub(channel).ReloadModel
            outcomes: list[str] = []

            async def action() -> list[tuple[float, float]]:
                windows = []
                for _ in range(times):
                    s = time.perf_counter()
                    try:
                        await reload(pb.ReloadModelRequest(), timeout=600)
                        outcomes.append("OK")
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append(exc.code().name)
                    windows.append((s, time.perf_counter()))
                    await asyncio.sleep(0.5)
                return windows

            probe, windows, _ = await _under_load(target, payloads, rate_qps, action)
        during = _merge_windows(probe, windows)
        outside = _outside(probe, windows)
        return {
            "reloads": times,
            "reload_outcomes": dict(Counter(outcomes)),
            "reload_s": [round(e - s, 3) for s, e in windows],
            "offered_qps": rate_qps,
            "requests": sum(probe.codes.values()),
            "failed_requests": sum(v for k, v in probe.codes.items() if k != "OK"),
            "codes": dict(probe.codes),
            "latency_during_reload": during,
            "latency_outside_reload": outside,
        }

    return asyncio.run(run())


def upsert_under_load(
    target: str,
    payloads: list[bytes],
    rate_qps: float,
    items: list[pb.CatalogItem],
) -> dict[str, Any]:
    """One UpsertItems batch of len(items) new items under a steady Recommend load."""

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel:
            upsert = pb_grpc.RecommenderStub(channel).UpsertItems
            result: dict[str, Any] = {}

            async def action() -> list[tuple[float, float]]:
                s = time.perf_counter()
                reply = await upsert(pb.UpsertItemsRequest(items=items), timeout=600)
                e = time.perf_counter()
                result.update(
                    created=reply.created, updated=reply.updated, rejected=len(reply.rejected)
                )
                return [(s, e)]

            probe, windows, _ = await _under_load(target, payloads, rate_qps, action)
        s, e = windows[0]
        return {
            "items": len(items),
            "batch_s": round(e - s, 3),
            **result,
            "offered_qps": rate_qps,
            "failed_requests": sum(v for k, v in probe.codes.items() if k != "OK"),
            "latency_during_upsert": probe.window(s, e + 0.05),
            "latency_outside_upsert": _outside(probe, windows),
        }

    return asyncio.run(run())


def _merge_windows(probe: Probe, windows: list[tuple[float, float]]) -> dict[str, float]:
    t = np.asarray(probe.sent_at)
    lat = np.asarray(probe.latency_us)
    mask = np.zeros(t.shape[0], dtype=bool)
    for s, e in windows:
        mask |= (t >= s) & (t < e + 0.05)
    return _stats(lat[mask])


def _outside(probe: Probe, windows: list[tuple[float, float]]) -> dict[str, float]:
    t = np.asarray(probe.sent_at)
    lat = np.asarray(probe.latency_us)
    mask = np.ones(t.shape[0], dtype=bool)
    for s, e in windows:
        mask &= ~((t >= s - 0.05) & (t < e + 0.5))
    return _stats(lat[mask])


def _stats(sel: np.ndarray[Any, Any]) -> dict[str, float]:
    if sel.size == 0:
        return {"count": 0, "p50_us": math.nan, "p99_us": math.nan, "max_us": math.nan}
    return {
        "count": int(sel.size),
        "p50_us": round(float(np.percentile(sel, 50)), 1),
        "p99_us": round(float(np.percentile(sel, 99)), 1),
        "max_us": round(float(sel.max()), 1),
    }


def send_events(target: str, requests: list[pb.TrackEventsRequest]) -> dict[str, Any]:
    """TrackEvents each request once; accepted and rejected counts and the time taken."""
    check_loopback(target)
    accepted = rejected = 0
    t0 = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        track = pb_grpc.RecommenderStub(channel).TrackEvents
        for req in requests:
            reply = track(req, timeout=30)
            accepted += reply.accepted
            rejected += len(reply.rejected)
    seconds = time.perf_counter() - t0
    return {
        "accepted": accepted,
        "rejected": rejected,
        "seconds": round(seconds, 2),
        "events_per_s": round(accepted / max(seconds, 1e-9)),
    }


def freshness(
    track_target: str,
    read_target: str,
    users: list[str],
    view_items: list[str],
    country: str,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """For each user: Recommend, track a VIEW of an item far from their taste on
    `track_target`, then Recommend on `read_target` until the list changes. Reports the
    delay from the TrackEvents acknowledgement to the first changed Recommend and how
    many reads that took (1 = the very next Recommend reflected the event)."""
    check_loopback(track_target)
    check_loopback(read_target)
    delays: list[float] = []
    reads: list[int] = []
    track_ms: list[float] = []
    missed = 0
    with (
        grpc.insecure_channel(track_target) as tch,
        grpc.insecure_channel(read_target) as rch,
    ):
        track = pb_grpc.RecommenderStub(tch).TrackEvents
        rec = pb_grpc.RecommenderStub(rch).Recommend
        for user, item in zip(users, view_items, strict=False):
            ctx = pb.RequestContext(
                user_id=user,
                session_id=f"fresh-{user}",
                country=country,
                device=pb.RequestContext.MOBILE,
            )
            req = pb.RecommendRequest(context=ctx, num_results=20)
            before = [i.item_id for i in rec(req, timeout=10).items]
            ts = timestamp_pb2.Timestamp()
            ts.GetCurrentTime()
            events = [
                pb.Event(type=pb.Event.VIEW, context=ctx, item_id=item, timestamp=ts)
                for _ in range(3)
            ]
            t0 = time.perf_counter()
            ack = track(pb.TrackEventsRequest(events=events), timeout=10)
            t1 = time.perf_counter()
            track_ms.append((t1 - t0) * 1e3)
            if ack.accepted != len(events):
                missed += 1
                continue
            n = 0
            while True:
                n += 1
                after = [i.item_id for i in rec(req, timeout=10).items]
                if after != before:
                    delays.append((time.perf_counter() - t1) * 1e3)
                    reads.append(n)
                    break
                if time.perf_counter() - t1 > timeout_s:
                    missed += 1
                    break
    return {
        "trials": len(users),
        "reflected": len(delays),
        "missed": missed,
        "next_read_reflected": sum(1 for r in reads if r == 1),
        "delay_ms": _ms_stats(delays),
        "reads_needed_max": max(reads) if reads else None,
        "track_events_ms": _ms_stats(track_ms),
    }


def _ms_stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan}
    arr = np.asarray(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "max": round(float(arr.max()), 3),
    }


class RedisServer:
    """A throwaway redis-server on a free loopback port (no persistence)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="endcap-bench-redis-"))
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def replicas_freshness(
    start: Callable[[dict[str, str]], ServerProcess],
    users: list[str],
    view_items: list[str],
    country: str,
) -> dict[str, Any]:
    """Two replicas sharing a Redis: track on one, read on the other."""
    try:
        redis = RedisServer()
    except (FileNotFoundError, TimeoutError) as exc:
        return {"skipped": str(exc)}
    env = {"ENDCAP_STATE_BACKEND": "redis", "ENDCAP_REDIS_URL": redis.url}
    servers: list[ServerProcess] = []
    try:
        servers = [start(env), start(env)]
        out = freshness(servers[0].target, servers[1].target, users, view_items, country)
        out["redis"] = redis.url
        return out
    finally:
        for s in servers:
            s.stop()
        redis.stop()
