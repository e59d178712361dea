"""`endcap bench`: build (or reuse) a synthetic catalog, serve it, load it, report.

Every comparison is made in the same run: the echo floor (transport) and the raw
FAISS floor (index) are measured next to the real server, and the headline is
the ratio to them, because the bench host is shared and noisy.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import inproc, placements, realtime
from benchmarks.catalog import CatalogSpec, ensure_catalog
from benchmarks.loadgen import SERVICE, LoadClient, LoadOutcome, LoadSpec
from benchmarks.options import add_arguments
from benchmarks.promscrape import HANDLING, RETRIEVAL, Scrape, scrape
from benchmarks.servers import ServerProcess, start_echo, start_endcap, tree
from benchmarks.workload import Planned, Workload, level_label
from endcap.v1 import recommender_pb2 as pb


def main(args: argparse.Namespace) -> int:
    from benchmarks.report import print_report, write_plots

    results = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    plots = write_plots(results, args.plots or args.json.parent)
    results["plots"] = [str(p) for p in plots]
    args.json.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    print_report(results)
    print(f"\nJSON: {args.json}   plots: {', '.join(str(p) for p in plots)}")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def machine() -> dict[str, Any]:
    import faiss

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "grpcio": grpc.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


class Bench:
    """One run: the catalog, the in-process engine, the servers and the load client."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seconds = float(args.seconds)
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        self.env = {k: v for k, v in (t.split("=", 1) for t in args.tune)}
        self.client = LoadClient(args.client_procs)
        self.log: list[str] = []

    # Helpers.
    def section(self, into: dict[str, Any], name: str, run: Callable[[], Any]) -> None:
        """into[name] = run(), or {"error": ...} if it fails: one broken section (a
        server that will not start, a missing redis-server) must not lose the run."""
        try:
            into[name] = run()
        except Exception as exc:
            self.say(f"{name} failed: {exc!r}")
            into[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}

    def say(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)

    def load(
        self,
        server: ServerProcess,
        requests: list[Planned],
        *,
        mode: str = "closed",
        concurrency: int = 1,
        rate: float = 0.0,
        seconds: float | None = None,
        warmup_s: float = 0.5,
        channels: int = 0,
        procs: int | None = None,
    ) -> tuple[LoadOutcome, Scrape | None]:
        before = scrape(server.metrics_urls) if server.metrics_urls else None
        spec = LoadSpec(
            targets=(server.target,),
            requests=tuple((p.method, p.payload) for p in requests),
            duration_s=seconds or self.seconds,
            mode=mode,
            concurrency=concurrency,
            rate_qps=rate,
            channels=channels or max(1, min(concurrency, 8) if mode == "closed" else 4),
            warmup_s=warmup_s,
            server_pids=tuple(tree(server.pid)),
        )
        out = self.client.run(spec, procs=procs)
        diff = None
        if before is not None:
            diff = scrape(server.metrics_urls).minus(before)
        return out, diff

    @staticmethod
    def server_side(diff: Scrape | None, method: str | None = None) -> dict[str, Any]:
        if diff is None:
            return {}
        methods = [method] if method else diff.labels(HANDLING)
        out: dict[str, Any] = {}
        for m in methods:
            h = diff.hist(HANDLING, m)
            if h.count:
                out[m] = h.summary() | {"codes": diff.codes(m)}
        plans = {p: diff.hist(RETRIEVAL, p).summary() for p in diff.labels(RETRIEVAL)}
        return {"handler": out, "plans": {p: s for p, s in plans.items() if s["count"]}}

    def record(
        self,
        name: str,
        outcome: LoadOutcome,
        diff: Scrape | None,
        *,
        mode: str,
        concurrency: int = 0,
        rate: float = 0.0,
        method: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        row = {
            "name": name,
            "mode": mode,
            "concurrency": concurrency or None,
            "offered_qps": rate or None,
            "e2e": outcome.summary(),
            "server_side": self.server_side(diff, method),
        } | (extra or {})
        lat = row["e2e"]["latency_us"]
        self.say(
            f"{name}: {outcome.qps:,.0f} qps, e2e p50 {lat['p50']:.0f} us p99 {lat['p99']:.0f} us"
            + (f", errors {outcome.errors}" if outcome.errors else "")
        )
        return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    b = Bench(args)
    results: dict[str, Any] = {
        "tool": "endcap bench",
        "command": "endcap bench "
        + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
        },
    }
    try:
        results |= run_main(b, args)
        if args.scale:
            b.section(results, "scaling", lambda: run_scaling(b, args))
        if args.compressed:
            b.section(results, "compressed", lambda: run_compressed(b, args))
    finally:
        b.client.close()
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["duration_s"] = round(time.perf_counter() - began, 1)
    from benchmarks.report import evaluate_targets

    results["targets"] = evaluate_targets(results)
    return results


def _spec(args: argparse.Namespace, n_items: int, index: str | None = None) -> CatalogSpec:
    return CatalogSpec(
        n_items=n_items,
        n_users=args.users,
        seed=args.seed,
        index=index or args.index,
        layout=args.layout,
    )


def _capture_responses(server: ServerProcess, samples: dict[str, bytes]) -> Path:
    """One real response per method, for the echo server to send back."""
    out: dict[str, str] = {}
    with grpc.insecure_channel(
        server.target, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    ) as ch:
        for method, payload in samples.items():
            call: Any = ch.unary_unary(SERVICE + method)
            out[method] = base64.b64encode(call(payload, timeout=30)).decode()
    path = Path(tempfile.mkstemp(prefix="endcap-echo-", suffix=".json")[1])
    path.write_text(json.dumps(out))
    return path


def _served(server: ServerProcess, prepared: list[inproc.Prepared], engine: Any) -> list[float]:
    """Recall of what the server returns for each prepared Recommend."""
    recalls = []
    with grpc.insecure_channel(server.target) as ch:
        call: Any = ch.unary_unary(
            SERVICE + "Recommend", response_deserializer=pb.RecommendResponse.FromString
        )
        for p in prepared:
            reply = call(p.planned.payload, timeout=30)
            rows = engine.catalog.lookup([i.item_id for i in reply.items])
            recalls.append(inproc.recall(rows[rows >= 0], p.truth))
    return recalls


def run_main(b: Bench, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    b.say(f"catalog: {args.items:,} items ({args.index})")
    built = ensure_catalog(_spec(args, args.items), rebuild=args.rebuild)
    out["catalog"] = built.to_json()
    b.say(
        f"catalog ready at {built.root} (cached={built.cached}, index build {built.index_build_s:.1f}s)"
    )
    engine = inproc.load(built.root, b.env)
    wl = Workload(engine, seed=args.seed)
    mixed = wl.mixed(4000)
    recommend_mix = wl.mixed(2000, {"Recommend": 1.0}, scenario="recommend")
    levels = tuple(float(x) for x in args.levels.split(",") if x)
    sweep = wl.sweep(args.per_level, levels) if "sweep" not in b.skip else {}
    rerank500 = [
        Planned(
            "Rerank",
            wl.rerank(wl.persona(), wl.filters("country", wl.persona()), 500).SerializeToString(),
            "rerank500",
            "country",
            math.nan,
        )
        for _ in range(300)
    ]
    similar = wl.mixed(1000, {"SimilarItems": 1.0}, scenario="similar")

    b.say("starting endcap serve (1 worker)")
    server = start_endcap(built.root, env=b.env)
    out["server"] = {"ready_s": round(server.ready_s, 2)}
    echo: ServerProcess | None = None
    try:
        samples = {
            "Recommend": recommend_mix[0].payload,
            "Rerank": next(p.payload for p in mixed if p.method == "Rerank"),
            "SimilarItems": similar[0].payload,
        }
        echo = start_echo(_capture_responses(server, samples))
        if args.live_events:
            b.say(f"streaming {args.live_events:,} events: live popularity as in production")
            live = wl.live_events(args.live_events, seed=args.seed)
            out["live_events"] = realtime.send_events(server.target, live)
        b.say("warming up")
        b.load(server, mixed, concurrency=4, seconds=min(3.0, b.seconds), warmup_s=0)
        out["memory_after_warmup"] = server.memory()
        scen: list[dict[str, Any]] = []
        # Concurrency 1, Recommend: echo, server, echo again (drift check).
        e1, _ = b.load(echo, recommend_mix, concurrency=1)
        scen.append(b.record("echo c=1 Recommend", e1, None, mode="closed", concurrency=1))
        s1, d1 = b.load(server, recommend_mix, concurrency=1)
        scen.append(
            b.record(
                "endcap c=1 Recommend", s1, d1, mode="closed", concurrency=1, method="Recommend"
            )
        )
        e1b, _ = b.load(echo, recommend_mix, concurrency=1)
        scen.append(b.record("echo c=1 Recommend (again)", e1b, None, mode="closed", concurrency=1))
        c = args.concurrency
        ec, _ = b.load(echo, mixed, concurrency=c)
        scen.append(b.record(f"echo c={c} mix", ec, None, mode="closed", concurrency=c))
        sc, dc = b.load(server, mixed, concurrency=c)
        scen.append(b.record(f"endcap c={c} mix", sc, dc, mode="closed", concurrency=c))
        r5, dr = b.load(server, rerank500, concurrency=1)
        scen.append(
            b.record("endcap c=1 Rerank 500", r5, dr, mode="closed", concurrency=1, method="Rerank")
        )
        si, ds = b.load(server, similar, concurrency=1)
        scen.append(
            b.record(
                "endcap c=1 SimilarItems",
                si,
                ds,
                mode="closed",
                concurrency=1,
                method="SimilarItems",
            )
        )
        out["scenarios"] = scen
        if "placements" not in b.skip:
            b.section(out, "placements", lambda: placements.run(b, server, engine, args.seed))
        echo_c1 = e1.latency.get_value_at_percentile(50)
        echo_c1b = e1b.latency.get_value_at_percentile(50)
        out["floors"] = {
            "echo_c1_p50_us": [echo_c1, echo_c1b],
            "echo_c1_p50_us_mean": (echo_c1 + echo_c1b) / 2,
            f"echo_c{c}_qps": round(ec.qps, 1),
        }
        out["ratios"] = {
            "e2e_c1_p50_vs_echo": round(
                s1.latency.get_value_at_percentile(50) / max((echo_c1 + echo_c1b) / 2, 1), 3
            ),
            f"qps_c{c}_vs_echo": round(sc.qps / max(ec.qps, 1e-9), 3),
        }
        cpu, echo_cpu = sc.server_cpu(), ec.server_cpu()
        if cpu and echo_cpu:  # the serving process's CPU per call against the echo's
            out["ratios"][f"cpu_per_call_c{c}_vs_echo"] = round(
                cpu["server_cpu_us_per_call"] / echo_cpu["server_cpu_us_per_call"], 3
            )

        if "sweep" not in b.skip:
            b.section(out, "selectivity", lambda: run_sweep(b, server, engine, sweep, args))
        if "open_loop" not in b.skip:
            b.section(out, "open_loop", lambda: run_open_loop(b, server, echo, mixed, sc.qps, args))
        out["memory_after_load"] = server.memory()
        out["memory"] = memory_report(out, built)
        if "realtime" not in b.skip:
            b.section(
                out,
                "realtime",
                lambda: run_realtime(b, server, engine, wl, recommend_mix, sc.qps),
            )
    finally:
        server.stop()
        if echo is not None:
            echo.stop()
    if args.workers > 1 and "workers" not in b.skip:
        b.section(out, "workers", lambda: run_workers(b, built.root, mixed, args, sc.qps))
    if "replicas" not in b.skip and "realtime" not in b.skip:
        users, items, country = _fresh_users(engine, wl, 10)
        b.say("freshness across two replicas sharing Redis")
        rt = out.get("realtime")
        b.section(
            rt if isinstance(rt, dict) else out,
            "freshness_two_replicas",
            lambda: realtime.replicas_freshness(
                lambda env: start_endcap(built.root, env=b.env | env), users, items, country
            ),
        )
    return out


def run_sweep(
    b: Bench,
    server: ServerProcess,
    engine: Any,
    sweep: dict[float, list[Planned]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    rows = []
    min_nprobe = engine.retriever.tuning.ann_min_nprobe
    for level, planned in sweep.items():
        if not planned:
            continue
        label = level_label(level)
        prepared = [inproc.prepare(engine, p) for p in planned[: args.recall_samples]]
        served = _served(server, prepared, engine)
        floor = inproc.index_floor(engine, prepared, min_nprobe)
        plan = inproc.plan_costs(engine, prepared)
        outcome, diff = b.load(server, planned, concurrency=1)
        row = b.record(
            f"endcap c=1 Recommend sel={label}",
            outcome,
            diff,
            mode="closed",
            concurrency=1,
            method="Recommend",
        )
        handler = row["server_side"].get("handler", {}).get("Recommend", {})
        row |= {
            "level": level,
            "label": label,
            "selectivity_mean": round(float(np.mean([p.selectivity for p in planned])), 6),
            "passing_items_mean": round(
                float(np.mean([p.selectivity for p in planned])) * engine.catalog.n_base
            ),
            "recall_at_20": round(float(np.mean(served)), 4),
            "recall_at_20_p10": round(float(np.percentile(served, 10)), 4),
            "recall_samples": len(served),
            "index_floor": floor,
            "in_process": plan,
            "server_p50_vs_index_floor": round(
                handler.get("p50_us", math.nan) / max(floor["filtered_us"]["p50"], 1e-9), 3
            ),
        }
        b.say(f"  sel={label}: recall@20 {row['recall_at_20']:.3f}, plans {plan['plans']}")
        rows.append(row)
    return rows


def run_open_loop(
    b: Bench,
    server: ServerProcess,
    echo: ServerProcess,
    mixed: list[Planned],
    capacity_qps: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    fractions = [float(x) for x in args.load_fractions.split(",") if x]
    out: dict[str, Any] = {"capacity_qps": round(capacity_qps, 1), "server": [], "echo": []}
    for f in fractions:
        rate = max(10.0, capacity_qps * f)
        for name, target in (("server", server), ("echo", echo)):
            o, d = b.load(target, mixed, mode="open", rate=rate)
            out[name].append(
                b.record(f"{name} open-loop {rate:,.0f} qps", o, d, mode="open", rate=rate)
            )
    return out


def memory_report(out: dict[str, Any], built: Any) -> dict[str, Any]:
    mem = out.get("memory_after_load") or out.get("memory_after_warmup") or {}
    data_mb = (built.embedding_bytes + built.metadata_bytes) / 2**20
    bound = 1.5 * data_mb + 300
    n = built.spec.n_items
    return {
        "rss_mb": mem.get("rss_mb"),
        "pss_mb": mem.get("pss_mb"),
        "embedding_plus_metadata_mb": round(data_mb, 1),
        "bound_mb": round(bound, 1),
        "rss_within_bound": bool(mem.get("rss_mb", math.inf) <= bound),
        "rss_bytes_per_item": round(mem.get("rss_mb", math.nan) * 2**20 / n, 1),
        "index_file_mb": round(built.index_bytes / 2**20, 1),
    }


def _fresh_users(engine: Any, wl: Workload, n: int) -> tuple[list[str], list[str], str]:
    """Known shoppers and, for each, an item of a leaf far from their current picks."""
    rng = np.random.default_rng(7)
    users = [str(u) for u in rng.choice(wl.user_ids, size=n, replace=False)]
    country = "US"
    cat = engine.catalog
    us = cat.country_row(country)
    items = []
    for _ in users:
        leaf = int(rng.choice(wl.leaves))
        members = wl._leaf_items(leaf)
        ok = (
            members[cat.in_stock[members] & _ships(cat, members, us)] if us is not None else members
        )
        pick = ok if ok.size else members
        items.append(cat.item_ids(pick[rng.integers(pick.size)].reshape(1))[0])
    return users, items, country


def _ships(cat: Any, rows: Any, country: int) -> Any:
    bits = cat.filters.country_bits[country]
    return ((bits[rows >> 6] >> (rows & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)


def run_realtime(
    b: Bench,
    server: ServerProcess,
    engine: Any,
    wl: Workload,
    recommend_mix: list[Planned],
    capacity_qps: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    users, items, country = _fresh_users(engine, wl, 20)
    b.say("freshness (one process)")
    out["freshness_one_process"] = realtime.freshness(
        server.target, server.target, users, items, country
    )
    payloads = [p.payload for p in recommend_mix]
    rate = max(20.0, 0.3 * capacity_qps)
    b.say(f"reload x5 under {rate:,.0f} qps")
    out["reload_under_load"] = realtime.reload_under_load(server.target, payloads, rate, 5)
    b.say("UpsertItems 10k under load")
    out["upsert_10k_under_load"] = realtime.upsert_under_load(
        server.target, payloads, rate, _new_items(engine, 10_000)
    )
    return out


def _new_items(engine: Any, n: int) -> list[pb.CatalogItem]:
    cat = engine.catalog
    rng = np.random.default_rng(11)
    leaves = [c for c in cat.category_names if "/" in c] or list(cat.category_names)
    brands = list(cat.brand_names[:50])
    countries = list(cat.country_codes)
    stamp = int(time.time() * 1000) % 10**9
    return [
        pb.CatalogItem(
            item_id=f"bench-new-{stamp}-{i}",
            category=str(rng.choice(leaves)),
            brand=str(rng.choice(brands)),
            price=round(float(rng.lognormal(3.5, 0.8)), 2),
            countries=[str(c) for c in rng.choice(countries, size=3, replace=False)],
        )
        for i in range(n)
    ]


def run_workers(
    b: Bench,
    root: Path,
    mixed: list[Planned],
    args: argparse.Namespace,
    single_qps: float,
) -> dict[str, Any]:
    w = args.workers
    b.say(f"starting endcap serve with {w} workers (SO_REUSEPORT)")
    server = start_endcap(root, workers=w, env=b.env)
    try:
        b.load(server, mixed, concurrency=8, seconds=min(3.0, b.seconds), warmup_s=0, channels=8)
        c = args.concurrency
        o, d = b.load(server, mixed, concurrency=c, channels=4 * w)
        row = b.record(f"endcap x{w} c={c} mix", o, d, mode="closed", concurrency=c)
        per_worker = [
            scrape([u]).minus(Scrape()).hist(HANDLING, "Recommend").count
            for u in server.metrics_urls
        ]
        return {
            "workers": w,
            "scenario": row,
            "qps": round(o.qps, 1),
            "qps_single_process": round(single_qps, 1),
            "speedup": round(o.qps / max(single_qps, 1e-9), 3),
            "recommend_calls_per_worker_total": per_worker,
            "memory": server.memory(),
        }
    finally:
        server.stop()


def run_scaling(b: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in (int(x) for x in args.scale.split(",") if x):
        b.say(f"scaling: {n:,} items")
        built = ensure_catalog(_spec(args, n))
        engine = inproc.load(built.root, b.env)
        wl = Workload(engine, seed=args.seed)
        recs = wl.mixed(1000, {"Recommend": 1.0}, scenario="recommend")
        server = start_endcap(built.root, env=b.env)
        try:
            b.load(server, recs, concurrency=2, seconds=min(2.0, b.seconds), warmup_s=0)
            o, d = b.load(server, recs, concurrency=1)
            row = b.record(f"scale {n:,}: c=1 Recommend", o, d, mode="closed", concurrency=1)
            rows.append(
                {
                    "items": n,
                    "catalog": built.to_json(),
                    "ready_s": round(server.ready_s, 2),
                    "e2e_us": row["e2e"]["latency_us"],
                    "server_side": row["server_side"],
                    "memory": server.memory(),
                }
            )
        finally:
            server.stop()
        del engine
    return rows


def run_compressed(b: Bench, args: argparse.Namespace) -> dict[str, Any]:
    b.say(f"compressed index (IVF-PQ): {args.items:,} items")
    built = ensure_catalog(_spec(args, args.items, "ivf_pq"))
    engine = inproc.load(built.root, b.env)
    wl = Workload(engine, seed=args.seed)
    levels = tuple(float(x) for x in args.levels.split(",") if x)
    sweep = wl.sweep(min(args.per_level, 100), levels)
    server = start_endcap(built.root, env=b.env)
    try:
        rows = run_sweep(b, server, engine, sweep, args)
        mem = server.memory()
    finally:
        server.stop()
    return {"catalog": built.to_json(), "selectivity": rows, "memory": mem}


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))
