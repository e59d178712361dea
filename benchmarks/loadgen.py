"""A bounded gRPC load generator: open loop (fixed arrival rate) and closed loop (N callers).

Open loop measures latency from each request's *intended* send time, so a slow
server cannot hide its tail by slowing the sender (coordinated omission); the
gap between intended and actual send is reported as `send_lag` so client-side
scheduling delay is visible. Requests are pre-serialised bytes sent through
generic stubs: the client never builds or parses messages while measuring.
Every run is bounded by its duration and an in-flight cap, and only dials
loopback targets.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

SERVICE = "/endcap.v1.Recommender/"
MAX_LATENCY_US = 120_000_000
CALL_TIMEOUT_S = 10.0


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def check_loopback(target: str) -> None:
    """Refuse anything but a loopback host:port: this tool must never load a remote server."""
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load targets must be loopback (127.0.0.1, ::1, localhost), got {target!r}")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One bounded load run against `targets` (spread over `channels` connections)."""

    targets: tuple[str, ...]
    requests: tuple[tuple[str, bytes], ...]  # (method, serialised request), used round-robin
    duration_s: float
    mode: str = "closed"  # closed | open
    concurrency: int = 1  # closed loop: callers
    rate_qps: float = 0.0  # open loop: arrivals per second
    channels: int = 1
    max_inflight: int = 2000  # open loop: past this, arrivals are dropped and counted
    offset: int = 0  # where in `requests` to start (different per client process)
    warmup_s: float = 0.0  # run this long first, unrecorded
    # Open loop: yield instead of sleeping this close to a due send. asyncio sleeps
    # in whole milliseconds and a loaded host wakes the process late: without this
    # the echo floor at 100 req/s measured 2.7 ms p50 against 0.8 ms closed loop.
    spin_s: float = 0.0015
    # The serving processes (same host): their CPU time over the measured window is
    # reported per call, so a handler's cost shows beside the echo floor's.
    server_pids: tuple[int, ...] = ()


@dataclass
class LoadOutcome:
    """What one or more client processes measured (histograms in microseconds)."""

    latency: HdrHistogram = field(default_factory=new_histogram)
    service: HdrHistogram = field(default_factory=new_histogram)
    send_lag: HdrHistogram = field(default_factory=new_histogram)
    codes: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    dropped: int = 0
    elapsed_s: float = 0.0
    server_cpu_s: float = 0.0  # CPU the serving processes used in the measured window

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {c: n for c, n in self.codes.items() if c != "OK"}

    @property
    def qps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def merge(self, other: LoadOutcome) -> None:
        self.latency.add(other.latency)
        self.service.add(other.service)
        self.send_lag.add(other.send_lag)
        self.codes.update(other.codes)
        self.sent += other.sent
        self.dropped += other.dropped
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        # Client processes measure the same window: keep one reading, not their sum.
        self.server_cpu_s = max(self.server_cpu_s, other.server_cpu_s)

    def encode(self) -> dict[str, Any]:
        return {
            "latency": self.latency.encode(),
            "service": self.service.encode(),
            "send_lag": self.send_lag.encode(),
            "codes": dict(self.codes),
            "sent": self.sent,
            "dropped": self.dropped,
            "elapsed_s": self.elapsed_s,
            "server_cpu_s": self.server_cpu_s,
        }

    @classmethod
    def decode(cls, raw: dict[str, Any]) -> LoadOutcome:
        out = cls()
        for name in ("latency", "service", "send_lag"):
            if raw[name]:
                getattr(out, name).add(HdrHistogram.decode(raw[name]))
        out.codes.update(raw["codes"])
        out.sent = int(raw["sent"])
        out.dropped = int(raw["dropped"])
        out.elapsed_s = float(raw["elapsed_s"])
        out.server_cpu_s = float(raw["server_cpu_s"])
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "dropped": self.dropped,
            "errors": self.errors,
            "achieved_qps": round(self.qps, 1),
            "latency_us": percentiles(self.latency),
            "service_us": percentiles(self.service),
            "send_lag_us": percentiles(self.send_lag),
        } | self.server_cpu()

    def server_cpu(self) -> dict[str, Any]:
        """The serving processes' CPU per completed call and in cores, when measured."""
        if self.server_cpu_s <= 0 or self.ok == 0 or self.elapsed_s <= 0:
            return {}
        return {
            "server_cpu_us_per_call": round(self.server_cpu_s / self.ok * 1e6, 1),
            "server_cpu_cores": round(self.server_cpu_s / self.elapsed_s, 3),
        }


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by `pids` (those still running)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def percentiles(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {k: math.nan for k in ("p50", "p90", "p99", "p999", "max", "mean")}
    return {
        "p50": float(h.get_value_at_percentile(50)),
        "p90": float(h.get_value_at_percentile(90)),
        "p99": float(h.get_value_at_percentile(99)),
        "p999": float(h.get_value_at_percentile(99.9)),
        "max": float(h.get_max_value()),
        "mean": round(float(h.get_mean_value()), 1),
    }


def _channel_options(i: int) -> list[tuple[str, Any]]:
    # A local subchannel pool gives each channel its own TCP connection, so
    # SO_REUSEPORT workers each get a share of the connections.
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.primary_user_agent", f"endcap-bench/{i}"),
    ]


async def _run(spec: LoadSpec) -> LoadOutcome:
    for t in spec.targets:
        check_loopback(t)
    channels = [
        grpc.aio.insecure_channel(spec.targets[i % len(spec.targets)], options=_channel_options(i))
        for i in range(max(spec.channels, 1))
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout=30)
        stubs: dict[str, list[Any]] = {
            m: [ch.unary_unary(SERVICE + m) for ch in channels]
            for m in {m for m, _ in spec.requests}
        }
        if spec.warmup_s > 0:
            await _dispatch(spec, stubs, spec.warmup_s, LoadOutcome())
        out = LoadOutcome()
        cpu = cpu_seconds(spec.server_pids)
        await _dispatch(spec, stubs, spec.duration_s, out)
        if spec.server_pids:
            out.server_cpu_s = cpu_seconds(spec.server_pids) - cpu
        return out
    finally:
        for ch in channels:
            await ch.close()


async def _dispatch(
    spec: LoadSpec,
    stubs: dict[str, list[Any]],
    duration_s: float,
    out: LoadOutcome,
) -> None:
    if spec.mode == "open":
        await _open_loop(spec, stubs, duration_s, out)
    else:
        await _closed_loop(spec, stubs, duration_s, out)


async def _call(stub: Any, payload: bytes) -> str:
    try:
        await stub(payload, timeout=CALL_TIMEOUT_S)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)


async def _closed_loop(
    spec: LoadSpec, stubs: dict[str, list[Any]], duration_s: float, out: LoadOutcome
) -> None:
    reqs = spec.requests
    n = len(reqs)
    start = time.perf_counter()
    end = start + duration_s

    async def caller(w: int) -> None:
        i = spec.offset + w * 7919
        while True:
            method, payload = reqs[i % n]
            stub = stubs[method][(w + i) % len(stubs[method])]
            i += 1
            t0 = time.perf_counter()
            if t0 >= end:
                return
            code = await _call(stub, payload)
            us = max(1, int((time.perf_counter() - t0) * 1e6))
            out.latency.record_value(min(us, MAX_LATENCY_US))
            out.service.record_value(min(us, MAX_LATENCY_US))
            out.codes[code] += 1
            out.sent += 1

    await asyncio.gather(*(caller(w) for w in range(max(spec.concurrency, 1))))
    out.elapsed_s = time.perf_counter() - start


async def _open_loop(
    spec: LoadSpec, stubs: dict[str, list[Any]], duration_s: float, out: LoadOutcome
) -> None:
    reqs = spec.requests
    n = len(reqs)
    interval = 1.0 / spec.rate_qps
    spin_s = spec.spin_s
    total = max(1, int(duration_s * spec.rate_qps))
    inflight: set[asyncio.Task[None]] = set()

    async def one(i: int, intended: float) -> None:
        method, payload = reqs[(spec.offset + i) % n]
        stub = stubs[method][i % len(stubs[method])]
        sent = time.perf_counter()
        out.send_lag.record_value(max(1, min(int((sent - intended) * 1e6), MAX_LATENCY_US)))
        code = await _call(stub, payload)
        done = time.perf_counter()
        out.latency.record_value(max(1, min(int((done - intended) * 1e6), MAX_LATENCY_US)))
        out.service.record_value(max(1, min(int((done - sent) * 1e6), MAX_LATENCY_US)))
        out.codes[code] += 1

    start = time.perf_counter() + 0.01
    i = 0
    while i < total:
        now = time.perf_counter()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now - spin_s if due - now > spin_s else 0)
            continue
        # Send everything that is due (the event loop wakes up at most ~1 ms late).
        while i < total and start + i * interval <= now:
            if len(inflight) >= spec.max_inflight:
                out.dropped += 1
                out.codes["CLIENT_DROPPED"] += 1
            else:
                task = asyncio.create_task(one(i, start + i * interval))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            out.sent += 1
            i += 1
    if inflight:
        await asyncio.wait(inflight, timeout=CALL_TIMEOUT_S + 1)
    out.elapsed_s = time.perf_counter() - start


def run_spec(spec: LoadSpec) -> dict[str, Any]:
    """Entry point of a client process: run, return the encoded outcome."""
    return asyncio.run(_run(spec)).encode()


class LoadClient:
    """Runs load specs in `procs` client processes (spawned once, reused)."""

    def __init__(self, procs: int = 1) -> None:
        import multiprocessing

        self.procs = max(1, procs)
        self._pool = ProcessPoolExecutor(
            self.procs, mp_context=multiprocessing.get_context("spawn")
        )

    def run(self, spec: LoadSpec, procs: int | None = None) -> LoadOutcome:
        """Split concurrency / rate over the client processes and merge their outcomes."""
        k = max(1, min(procs or self.procs, self.procs))
        parts = []
        for p in range(k):
            conc = spec.concurrency // k + (1 if p < spec.concurrency % k else 0)
            if spec.mode == "closed" and conc == 0:
                continue
            parts.append(
                LoadSpec(
                    targets=spec.targets,
                    requests=spec.requests,
                    duration_s=spec.duration_s,
                    mode=spec.mode,
                    concurrency=conc,
                    rate_qps=spec.rate_qps / k,
                    channels=max(1, spec.channels // k),
                    max_inflight=max(1, spec.max_inflight // k),
                    offset=spec.offset + p * 104729,
                    warmup_s=spec.warmup_s,
                    spin_s=spec.spin_s,
                    server_pids=spec.server_pids,
                )
            )
        futures = [self._pool.submit(run_spec, part) for part in parts]
        out = LoadOutcome()
        for f in futures:
            out.merge(LoadOutcome.decode(f.result(timeout=spec.duration_s + spec.warmup_s + 120)))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def encode_bytes(items: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(b).decode() for b in items]
