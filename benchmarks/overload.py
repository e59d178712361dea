"""Overload: drive `endcap serve` at ~3x its sustainable load on loopback, show it degrades.

    python -m benchmarks.overload [--artifacts DIR] [--factor 3] [--duration-s 15]
                                  [--max-in-flight 64] [--queue-target-ms 20]
                                  [--redis-url redis://127.0.0.1:6379/0]
                                  [--front nginx --front-max-in-flight 4]

Starts the server as a process of its own, then runs, each for --duration-s:

1. capacity: closed loop (callers waiting for each answer) on a server that never
   sheds (ENDCAP_QUEUE_TARGET_S=0): answers per second;
then, on a fresh server with --queue-target-ms (the default shedding):
2. unloaded: open loop at a quarter of capacity: the baseline p50/p99;
3. nominal: open loop at capacity: what shedding costs when there is no overload;
4. overload: open loop at --factor x capacity: p50/p99 of admitted calls, the
   shed rate (RESOURCE_EXHAUSTED), anything else that failed, the server's RSS;
5. recovery: unloaded again, then health.

With --front nginx, phases 2-5 go through nginx (deploy/nginx), which sheds
read calls beyond --front-max-in-flight before they reach the server. nginx is
pinned to the server's CPUs, as a sidecar shares its pod's CPU with the server
(on the load CPU it starved the load generator, which then measured itself).

Open-loop latency counts from each call's intended send time, so a slow server
cannot hide its tail by slowing the sender; the sender's own lag is reported.
Load comes from --workers processes (pre-serialised requests, generic stubs).
Prints a table and writes JSON with the machine and parameters (--json).
Without --artifacts it trains a small synthetic store first (needs the
`train` extra). Bounded: every phase stops after --duration-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.servers import (
    Sampler,
    ServerProcess,
    start_endcap,
    start_nginx_front,
    wait_serving,
)

SERVICE = "/endcap.v1.Recommender/"


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    mode: str  # closed | open
    offered_qps: float  # open loop: total arrival rate
    sent: int
    sent_qps: float
    codes: dict[str, int]
    ok_qps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_send_lag_ms: float
    shed_rate: float
    rss_peak_mb: float


def _requests(artifacts: Path, mix: str = "light", n: int = 512) -> list[tuple[str, bytes]]:
    """A mix: known shoppers' Recommend (personal: search), new visitors (popularity),
    SimilarItems (search), all with filters. "heavy" makes every other call a Rerank of
    300 candidates, so capacity is low enough for one load CPU to offer 3x of it."""
    from endcap.v1 import recommender_pb2 as pb
    from server.artifact import load_artifact

    art = load_artifact(artifacts, verify_checksums=False)
    users = [str(u) for u in art["user_ids"][:2000]]
    items = [str(i) for i in art["item_ids"][:2000]]
    rng = np.random.default_rng(0)
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        ctx = pb.RequestContext(country="DE", currency="EUR")
        if mix == "heavy" and i % 2:
            ctx.user_id = users[int(rng.integers(len(users)))]
            picked = rng.choice(len(items), size=300, replace=False)
            rerank = pb.RerankRequest(
                context=ctx, candidate_item_ids=[items[int(j)] for j in picked], num_results=20
            )
            out.append(("Rerank", rerank.SerializeToString()))
            continue
        ctx.device = pb.RequestContext.Device.ValueType(1 + i % 3)
        flt = pb.Filters(max_price=float(rng.choice([30, 100, 1000])))
        if i % 10 < 6:
            ctx.user_id = users[int(rng.integers(len(users)))]
            req = pb.RecommendRequest(context=ctx, filters=flt, num_results=10)
            out.append(("Recommend", req.SerializeToString()))
        elif i % 10 < 8:
            ctx.session_id = f"new-visitor-{i}"
            req = pb.RecommendRequest(context=ctx, filters=flt, num_results=10)
            out.append(("Recommend", req.SerializeToString()))
        else:
            seeds = [items[int(rng.integers(len(items)))]]
            sim = pb.SimilarItemsRequest(context=ctx, seed_item_ids=seeds, num_results=10)
            out.append(("SimilarItems", sim.SerializeToString()))
    return out


# Load, in worker processes.
async def _load(
    target: str,
    requests: list[tuple[str, bytes]],
    mode: str,
    rate_qps: float,
    callers: int,
    duration_s: float,
    deadline_s: float,
) -> tuple[list[float], list[str], float, int]:
    """(latencies_s, codes, max send lag s, sent) of one worker."""
    channel = grpc.aio.insecure_channel(target)
    calls: dict[str, Any] = {m: channel.unary_unary(SERVICE + m) for m, _ in requests}
    latencies: list[float] = []
    codes: list[str] = []
    lag = 0.0
    loop = asyncio.get_running_loop()

    async def one(i: int, intended: float) -> None:
        method, body = requests[i % len(requests)]
        try:
            await calls[method](body, timeout=deadline_s)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        latencies.append(loop.time() - intended)
        codes.append(code)

    start = loop.time()
    end = start + duration_s
    sent = 0
    if mode == "closed":

        async def caller(k: int) -> None:
            nonlocal sent
            i = k
            while loop.time() < end:
                sent += 1
                await one(i, loop.time())
                i += callers

        await asyncio.gather(*(caller(k) for k in range(callers)))
    else:
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate_qps
        while True:
            now = loop.time()
            if now >= end:
                break
            due = int((now - start) / interval) + 1
            while sent < due:
                intended = start + sent * interval
                lag = max(lag, now - intended)
                task = asyncio.ensure_future(one(sent, intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.0005)
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s + 5)
    await channel.close()
    return latencies, codes, lag, sent


def _worker(args: tuple[Any, ...]) -> tuple[list[float], list[str], float, int]:
    return asyncio.run(_load(*args))


def _pin(cpus: set[int]) -> None:
    """Keep this process (and the threads it starts) on `cpus`; no-op where unsupported."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _cpu_split(spec: str) -> tuple[set[int], set[int]]:
    """(server cpus, client cpus): "auto" gives the server CPU 0 and the load the rest, so
    the load generator cannot take the server's CPU as it offers more; "" = no pinning."""
    if not spec or not hasattr(os, "sched_getaffinity"):
        return set(), set()
    available = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        if len(available) < 2:
            return set(), set()
        return {available[0]}, set(available[1:])
    server, _, client = spec.partition(":")
    return {int(c) for c in server.split(",")}, {int(c) for c in client.split(",")}


# The server process.
def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _train(out: Path) -> Path:
    from training.pipeline import train_and_export
    from training.synthetic import StoreConfig
    from training.train import TrainConfig

    store = StoreConfig(n_items=20_000, n_users=5_000, n_events=200_000, seed=1)
    return train_and_export(out, store, TrainConfig(dim=32, epochs=1, seed=1), progress=False)


def _start_server(
    artifacts: Path, args: argparse.Namespace, log_dir: Path, queue_target_s: float, cpus: set[int]
) -> ServerProcess:
    env = {
        "ENDCAP_MAX_IN_FLIGHT": str(args.max_in_flight),
        "ENDCAP_QUEUE_TARGET_S": str(queue_target_s),
    }
    if args.redis_url:  # shared state: handlers wait on Redis, so calls overlap
        env |= {"ENDCAP_STATE_BACKEND": "redis", "ENDCAP_REDIS_URL": args.redis_url}
    return start_endcap(artifacts, env=env, log_dir=log_dir, cpus=cpus, timeout_s=120)


def _still_serving(server: ServerProcess, target: str) -> bool:
    """The server process is alive and `target` (it, or the front) reports SERVING."""
    try:
        wait_serving(target, 10, server.proc)
    except (RuntimeError, TimeoutError):
        return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="endcap-overload-"))
    artifacts = args.artifacts or _train(tmp / "artifacts")
    requests = _requests(artifacts, args.mix)
    ctx = multiprocessing.get_context("spawn")
    phases: list[Phase] = []
    server_cpus, client_cpus = _cpu_split(args.cpus)
    with ctx.Pool(args.workers, initializer=_pin, initargs=(client_cpus,)) as pool:

        def phase(server: ServerProcess, target: str, name: str, mode: str, rate: float) -> Phase:
            duration_s = 2.0 if name == "warmup" else args.duration_s
            per = (target, requests, mode, rate / args.workers, args.callers, duration_s)
            with Sampler(lambda: _rss_mb(server.pid), 0.1) as rss:
                results = pool.map(_worker, [(*per, args.deadline_ms / 1000)] * args.workers)
            lat = np.concatenate([np.asarray(r[0]) for r in results]) * 1000
            codes = np.concatenate([np.asarray(r[1]) for r in results])
            sent = sum(r[3] for r in results)
            ok = lat[codes == "OK"] if lat.size else lat
            counts = Counter(codes.tolist())
            pct = np.percentile(ok, [50, 99, 99.9]) if ok.size else np.zeros(3)
            p = Phase(
                name=name,
                mode=mode,
                offered_qps=round(rate, 1),
                sent=sent,
                sent_qps=round(sent / duration_s, 1),
                codes=dict(counts),
                ok_qps=round(counts.get("OK", 0) / duration_s, 1),
                p50_ms=round(float(pct[0]), 3),
                p99_ms=round(float(pct[1]), 3),
                p999_ms=round(float(pct[2]), 3),
                max_send_lag_ms=round(max(r[2] for r in results) * 1000, 3),
                shed_rate=round(counts.get("RESOURCE_EXHAUSTED", 0) / max(sent, 1), 4),
                rss_peak_mb=round(max((mb for _, mb in rss.samples), default=0.0), 1),
            )
            if name != "warmup":
                phases.append(p)
            _print(p)
            return p

        # Capacity, on a server that never sheds: the most it can answer.
        server = _start_server(artifacts, args, tmp, 0.0, server_cpus)
        target = server.target
        try:
            phase(server, target, "warmup", "closed", 0)
            capacity = phase(server, target, "capacity", "closed", 0).ok_qps
        finally:
            server.stop(30)
        # Everything else on a server with the shedding under test.
        server = _start_server(artifacts, args, tmp, args.queue_target_ms / 1000, server_cpus)
        target = server.target
        front = None
        try:
            if args.front:
                front = start_nginx_front(target, args.front_max_in_flight, cpus=server_cpus)
                target = front.target
            rss_idle = _rss_mb(server.pid)
            phase(server, target, "warmup", "open", capacity / 4)
            phase(server, target, "unloaded", "open", capacity / 4)
            phase(server, target, "nominal", "open", capacity)
            phase(server, target, "overload", "open", capacity * args.factor)
            phase(server, target, "recovery", "open", capacity / 4)
            alive = _still_serving(server, target)
            rss_after = _rss_mb(server.pid)
        finally:
            if front is not None:
                front.stop()
            exit_code = server.stop(30)
    by = {p.name: p for p in phases}
    summary = {
        "front": f"{args.front} (max {args.front_max_in_flight} reads in flight)"
        if args.front
        else "none",
        "server_stayed_up": alive,
        "clean_exit_on_sigterm": exit_code == 0,
        "capacity_qps": by["capacity"].ok_qps,
        "overload_offered_qps": by["overload"].offered_qps,
        "unloaded_p50_ms": by["unloaded"].p50_ms,
        "unloaded_p99_ms": by["unloaded"].p99_ms,
        "nominal_ok_qps": by["nominal"].ok_qps,
        "nominal_p99_ms": by["nominal"].p99_ms,
        "nominal_shed_rate": by["nominal"].shed_rate,
        "overload_ok_qps": by["overload"].ok_qps,
        "overload_admitted_p50_ms": by["overload"].p50_ms,
        "overload_admitted_p99_ms": by["overload"].p99_ms,
        "overload_shed_rate": by["overload"].shed_rate,
        "overload_other_errors": sum(
            n for c, n in by["overload"].codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")
        ),
        "recovery_p99_ms": by["recovery"].p99_ms,
        "recovery_shed_rate": by["recovery"].shed_rate,
        "rss_idle_mb": round(rss_idle, 1),
        "rss_peak_mb": max(p.rss_peak_mb for p in phases),
        "rss_after_mb": round(rss_after, 1),
    }
    return {
        "benchmark": "overload",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "params": {k: str(v) for k, v in vars(args).items()},
        "phases": [asdict(p) for p in phases],
        "summary": summary,
    }


def _print(p: Phase) -> None:
    codes = ", ".join(f"{c} {n}" for c, n in sorted(p.codes.items()))
    print(
        f"{p.name:>9}: offered {p.offered_qps:>8.0f}/s sent {p.sent_qps:>8.0f}/s "
        f"ok {p.ok_qps:>8.0f}/s  p50 {p.p50_ms:7.2f} ms  p99 {p.p99_ms:7.2f} ms  "
        f"shed {p.shed_rate:6.1%}  rss {p.rss_peak_mb:6.0f} MB  lag {p.max_send_lag_ms:.1f} ms"
        f"  [{codes}]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__)
    parser.add_argument("--artifacts", type=Path, help="artifact root (default: train one)")
    parser.add_argument("--factor", type=float, default=3.0, help="overload x capacity")
    parser.add_argument("--duration-s", type=float, default=15.0, help="per phase")
    parser.add_argument("--workers", type=int, default=2, help="load processes")
    parser.add_argument("--callers", type=int, default=8, help="closed loop callers per worker")
    parser.add_argument("--deadline-ms", type=float, default=250.0, help="per-call deadline")
    parser.add_argument("--max-in-flight", type=int, default=64, help="ENDCAP_MAX_IN_FLIGHT")
    parser.add_argument(
        "--queue-target-ms", type=float, default=20.0, help="ENDCAP_QUEUE_TARGET_S x 1000 (0 = off)"
    )
    parser.add_argument("--mix", choices=("light", "heavy"), default="light", help="see _requests")
    parser.add_argument(
        "--cpus",
        default="auto",
        help='server:client CPU lists ("0:1"), "auto" (server on the first CPU), "" (none)',
    )
    parser.add_argument("--redis-url", help="serve with ENDCAP_STATE_BACKEND=redis at this URL")
    parser.add_argument(
        "--front",
        choices=("", "nginx"),
        default="",
        help="shed in a proxy in front (deploy/nginx), on the server's CPUs; capacity stays direct",
    )
    parser.add_argument(
        "--front-max-in-flight", type=int, default=4, help="read calls the front lets through"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["summary"]["server_stayed_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
