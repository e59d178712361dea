"""Soak: steady mixed load on `endcap serve` for minutes; are RSS and latency flat?

    python -m benchmarks.soak [--minutes 10] [--rate 100] [--items 10000]
                              [--max-profiles 5000] [--queue-target-ms 20]
                              [--json PATH] [--plot PATH]

Starts the server on a synthetic catalog (benchmarks.catalog, cached) on
loopback and drives an open-loop mix at --rate calls/s: Recommend, Rerank,
SimilarItems (benchmarks.workload personas and filters), Popular, and
TrackEvents whose events come from shoppers never seen before (a few per call),
so real-time state keeps growing and only the LRU (--max-profiles, i.e.
ENDCAP_MAX_PROFILES) and TTL can bound it. Each minute is one load run: its
p50/p99 (from the intended send time), errors and the server's RSS (sampled
every few seconds) make one row of the table. Writes JSON (machine, params,
minutes, verdict) and a PNG of RSS and p99 over time.

Verdict: after --warmup-minutes, the mean RSS of the last three minutes against
the first three, and the ratio of their p99s; flat when RSS grew less than
--rss-tolerance-mb and the p99 ratio is below --p99-tolerance. Bounded: at most
120 minutes and 2,000 calls/s, loopback only, the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.catalog import CatalogSpec, ensure_catalog
from benchmarks.loadgen import LoadClient, LoadOutcome, LoadSpec, percentiles
from benchmarks.servers import Sampler, start_endcap
from endcap.v1 import recommender_pb2 as pb

MAX_MINUTES = 120.0
MAX_RATE = 2000.0
MIX = {
    "Recommend": 0.45,
    "Rerank": 0.08,
    "SimilarItems": 0.12,
    "Popular": 0.10,
    "TrackEvents": 0.25,
}
SHOPPERS_PER_TRACK = 4  # new shoppers per TrackEvents call


def _bounded(lo: float, hi: float, name: str) -> Any:
    def parse(raw: str) -> float:
        value = float(raw)
        if not lo < value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in ({lo:g}, {hi:g}], got {raw}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--minutes", type=_bounded(0, MAX_MINUTES, "--minutes"), default=10.0)
    p.add_argument("--rate", type=_bounded(0, MAX_RATE, "--rate"), default=100.0, help="calls/s")
    p.add_argument("--items", type=int, default=10_000, help="catalog size")
    p.add_argument("--users", type=int, default=20_000, help="trained shoppers in the catalog")
    p.add_argument("--max-profiles", type=int, default=5_000, help="ENDCAP_MAX_PROFILES")
    p.add_argument(
        "--queue-target-ms", type=float, default=20.0, help="ENDCAP_QUEUE_TARGET_S x 1000 (0 = off)"
    )
    p.add_argument("--warmup-minutes", type=float, default=1.0, help="left out of the verdict")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--rss-tolerance-mb", type=float, default=10.0)
    p.add_argument("--p99-tolerance", type=float, default=1.5, help="last/first p99 ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG of RSS and p99 over time here")
    return p


def track_requests(count: int, items: Sequence[str], seed: int) -> list[bytes]:
    """TrackEvents calls, each from SHOPPERS_PER_TRACK shoppers no other call has."""
    rng = np.random.default_rng(seed)
    out = []
    shopper = 0
    for _ in range(count):
        events = []
        for _ in range(SHOPPERS_PER_TRACK):
            shopper += 1
            ctx = pb.RequestContext(user_id=f"soak-u{shopper:09d}", country="DE")
            picks = [items[int(i)] for i in rng.integers(len(items), size=3)]
            events += [pb.Event(type=pb.Event.VIEW, item_id=i, context=ctx) for i in picks]
            events.append(pb.Event(type=pb.Event.ADD_TO_CART, item_id=picks[0], context=ctx))
            if rng.random() < 0.3:
                events.append(
                    pb.Event(
                        type=pb.Event.PURCHASE,
                        item_id=picks[0],
                        context=ctx,
                        price=float(rng.uniform(5, 200)),
                        quantity=1,
                    )
                )
        out.append(pb.TrackEventsRequest(events=events).SerializeToString())
    return out


def plan(root: Path, count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` serialised calls in MIX proportions, shuffled; TrackEvents shoppers unique."""
    from benchmarks import inproc
    from benchmarks.workload import Workload

    engine = inproc.load(root, {})
    wl = Workload(engine, seed=seed)
    n = {m: max(1, round(count * share)) for m, share in MIX.items()}
    served = {m: float(n[m]) for m in ("Recommend", "Rerank", "SimilarItems")}
    total = sum(n[m] for m in served)
    # Workload's mix draws fresh personas and filters for each request: 4,000 distinct
    # requests cycle, which is what a shop's traffic looks like to a cache-less server.
    pool = wl.mixed(min(4000, total), served)
    calls: list[tuple[str, bytes]] = []
    for i in range(total):
        p = pool[i % len(pool)]
        calls.append((p.method, p.payload))
    for i in range(n["Popular"]):
        persona = wl.persona()
        kind = pb.PopularRequest.BESTSELLERS if i % 2 else pb.PopularRequest.TRENDING
        req = pb.PopularRequest(context=persona.context(), kind=kind, num_results=20)
        calls.append(("Popular", req.SerializeToString()))
    items = engine.catalog.item_ids(np.arange(min(engine.catalog.n_base, 5000)))
    calls += [("TrackEvents", b) for b in track_requests(n["TrackEvents"], items, seed)]
    order = np.random.default_rng(seed).permutation(len(calls))
    return [calls[int(i)] for i in order]


def _memory(samples: Sequence[tuple[float, dict[str, float]]]) -> list[tuple[float, float, float]]:
    """(seconds, RSS MB, PSS MB) of the server's process tree."""
    return [(t, m["rss_mb"], m["pss_mb"]) for t, m in samples]


def _minute_row(i: int, out: LoadOutcome, rss: list[tuple[float, float, float]]) -> dict[str, Any]:
    lat = percentiles(out.latency)
    return {
        "minute": i + 1,
        "sent": out.sent,
        "ok": out.ok,
        "achieved_qps": round(out.qps, 1),
        "errors": out.errors,
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 2),
        "rss_mb": rss[-1][1] if rss else float("nan"),
        "rss_max_mb": max((r[1] for r in rss), default=float("nan")),
        "pss_mb": rss[-1][2] if rss else float("nan"),
    }


def verdict(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Flat or not: last three minutes against the first three after the warmup."""
    steady = [r for r in rows if r["minute"] > args.warmup_minutes]
    k = min(3, len(steady) // 2)
    if k == 0:
        return {"flat": None, "reason": "too short for a verdict (needs 2 minutes after warmup)"}
    first, last = steady[:k], steady[-k:]
    rss_growth = float(np.mean([r["rss_mb"] for r in last]) - np.mean([r["rss_mb"] for r in first]))
    p99_first = float(np.mean([r["p99_ms"] for r in first]))
    p99_last = float(np.mean([r["p99_ms"] for r in last]))
    ratio = p99_last / p99_first if p99_first > 0 else float("inf")
    flat = rss_growth < args.rss_tolerance_mb and ratio < args.p99_tolerance
    return {
        "flat": flat,
        "compared_minutes": [[r["minute"] for r in first], [r["minute"] for r in last]],
        "rss_growth_mb": round(rss_growth, 1),
        "p99_first_ms": round(p99_first, 2),
        "p99_last_ms": round(p99_last, 2),
        "p99_ratio": round(ratio, 2),
        "criterion": (
            f"RSS growth < {args.rss_tolerance_mb:g} MB and p99 ratio < {args.p99_tolerance:g}"
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = CatalogSpec(n_items=args.items, n_users=args.users, seed=args.seed)
    built = ensure_catalog(spec)
    minutes = int(np.ceil(args.minutes))
    minute_s = 60.0 * args.minutes / minutes
    per_minute = int(args.rate * minute_s)
    calls = plan(built.root, per_minute * minutes, args.seed)
    env = {
        "ENDCAP_MAX_PROFILES": str(args.max_profiles),
        "ENDCAP_QUEUE_TARGET_S": str(args.queue_target_ms / 1000),
        "ENDCAP_VERIFY_CHECKSUMS": "false",
    }
    server = start_endcap(built.root, env=env)
    client = LoadClient(1)
    rows: list[dict[str, Any]] = []
    try:
        print(f"serving {args.items:,} items at {server.target}; {args.rate:g} calls/s", flush=True)
        print(" min     sent  ok/s     p50 ms   p99 ms   max ms  rss MB  errors", flush=True)
        with Sampler(server.memory, args.sample_s) as rss:
            for i in range(minutes):
                start = len(rss.samples)
                out = client.run(
                    LoadSpec(
                        targets=(server.target,),
                        requests=tuple(calls),
                        duration_s=minute_s,
                        mode="open",
                        rate_qps=args.rate,
                        offset=i * per_minute,
                        max_inflight=2000,
                    )
                )
                row = _minute_row(i, out, _memory(rss.samples[start:] or rss.samples[-1:]))
                rows.append(row)
                print(
                    f"{row['minute']:>4} {row['sent']:>8} {row['achieved_qps']:>5.0f} "
                    f"{row['p50_ms']:>10.2f} {row['p99_ms']:>8.2f} {row['max_ms']:>8.1f} "
                    f"{row['rss_mb']:>7.1f}  {row['errors'] or ''}",
                    flush=True,
                )
            samples = _memory(rss.samples)
        alive = server.proc.poll() is None
    finally:
        client.close()
        server.stop()
    return {
        "benchmark": "soak",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "params": {k: str(v) for k, v in vars(args).items()} | {"mix": MIX},
        "catalog": str(built.root),
        "server_stayed_up": alive,
        "server_exit_code": server.proc.returncode,
        "minutes": rows,
        "rss_samples": [{"t_s": round(t, 1), "rss_mb": r, "pss_mb": p} for t, r, p in samples],
        "verdict": verdict(rows, args),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s["t_s"] / 60 for s in result["rss_samples"]]
    top.plot(t, [s["rss_mb"] for s in result["rss_samples"]], label="RSS")
    top.plot(t, [s["pss_mb"] for s in result["rss_samples"]], label="PSS", alpha=0.6)
    top.set_ylabel("server memory (MB)")
    top.set_ylim(bottom=0)
    top.legend()
    rows = result["minutes"]
    bottom.plot([r["minute"] - 0.5 for r in rows], [r["p99_ms"] for r in rows], "o-", label="p99")
    bottom.plot([r["minute"] - 0.5 for r in rows], [r["p50_ms"] for r in rows], "o-", label="p50")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("minute")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    v = result["verdict"]
    fig.suptitle(
        f"endcap soak: {result['params']['rate']} calls/s, "
        f"{'flat' if v.get('flat') else 'NOT flat' if v.get('flat') is False else 'no verdict'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result["verdict"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0 if result["server_stayed_up"] and result["verdict"].get("flat") is not False else 1


if __name__ == "__main__":
    sys.exit(main())
