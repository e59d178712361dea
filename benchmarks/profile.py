"""Profile the real server under bench load with py-spy (pip install py-spy).

    python -m benchmarks.profile --items 1000000 --scenario recommend --seconds 20

Starts `endcap serve` under `py-spy record` (a child of py-spy, so no ptrace
privileges are needed), drives closed-loop load of one scenario, then prints
where the serving process spent its samples: inclusive and self time per
frame, with the model-loading phase cut out (only samples taken while the
load ran are kept: py-spy is started after loading, attached to the pid).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import inproc, realtime
from benchmarks.catalog import CatalogSpec, ensure_catalog
from benchmarks.loadgen import LoadClient, LoadSpec
from benchmarks.servers import start_endcap
from benchmarks.workload import Planned, Workload

SCENARIOS = ("recommend", "mix", "rerank500", "similar")


def requests_for(wl: Workload, scenario: str) -> list[Planned]:
    if scenario == "recommend":
        return wl.mixed(2000, {"Recommend": 1.0})
    if scenario == "mix":
        return wl.mixed(2000)
    if scenario == "similar":
        return wl.mixed(1000, {"SimilarItems": 1.0})
    if scenario == "rerank500":
        return [
            Planned(
                "Rerank",
                wl.rerank(
                    wl.persona(), wl.filters("country", wl.persona()), 500
                ).SerializeToString(),
                "rerank500",
                "country",
                0.0,
            )
            for _ in range(300)
        ]
    if scenario.startswith("sel="):
        level = float(scenario[4:])
        return wl.sweep(200, (level,))[level]
    if scenario.startswith("placement="):
        from benchmarks import placements

        return placements.plan(wl.engine, seed=0)[scenario.split("=", 1)[1]]
    raise ValueError(
        f"scenario must be one of {SCENARIOS}, sel=<fraction> or placement=<name>, got {scenario!r}"
    )


def summarize(raw: Path, top: int = 40) -> str:
    """Inclusive and self sample shares per frame from py-spy's raw (collapsed) output."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n_text = line.rsplit(" ", 1)
        n = int(n_text)
        frames = stack.split(";")
        total += n
        self_[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top // 2)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument(
        "--scenario",
        default="recommend",
        help=f"{', '.join(SCENARIOS)}, sel=0.01 or placement=home",
    )
    p.add_argument(
        "--live-events",
        type=int,
        default=40_000,
        help="events streamed first, as endcap bench does (0 = empty live state)",
    )
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("profile"))
    p.add_argument("--idle", action="store_true", help="keep idle samples (event loop waiting)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    built = ensure_catalog(CatalogSpec(n_items=args.items))
    engine = inproc.load(built.root, {})
    wl = Workload(engine, seed=0)
    reqs = requests_for(wl, args.scenario)
    live = wl.live_events(args.live_events) if args.live_events else []
    del engine, wl
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_endcap(built.root)
    if live:
        print(realtime.send_events(server.target, live))
    raw = args.out / f"{args.scenario.replace('=', '')}-{args.items}.txt"
    cmd = [spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", str(args.rate)]
    cmd += ["-o", str(raw), "--duration", str(int(args.seconds) + 1)]
    if args.idle:
        cmd.append("--idle")
    client = LoadClient(1)
    try:
        spec = LoadSpec(
            targets=(server.target,),
            requests=tuple((r.method, r.payload) for r in reqs),
            duration_s=args.seconds + 2,
            concurrency=args.concurrency,
            warmup_s=1.0,
        )
        future = client._pool.submit(_run, spec)
        time.sleep(1.5)
        spy_proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        outcome = future.result()
    finally:
        client.close()
        server.stop()
    print(outcome)
    if spy_proc.returncode != 0 or not raw.is_file():
        print(spy_proc.stderr, file=sys.stderr)
        print(
            "py-spy could not attach (needs ptrace: run as root or with CAP_SYS_PTRACE)",
            file=sys.stderr,
        )
        return 1
    text = summarize(raw)
    (raw.with_suffix(".summary.txt")).write_text(text + "\n")
    print(text)
    return 0


def _run(spec: LoadSpec) -> dict[str, object]:
    from benchmarks.loadgen import LoadOutcome, run_spec

    return LoadOutcome.decode(run_spec(spec)).summary()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
