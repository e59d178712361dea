"""`endcap bench` flags, kept free of heavy imports so `endcap --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_ITEMS = 100_000
DEFAULT_SECONDS = 3.0
INDEX_KINDS = ("ivf_sq8", "ivf_flat", "ivf_pq", "flat")
LAYOUTS = ("category", "shuffled")
LEVELS = "1,0.3,0.1,0.03,0.01,0.003,0.001"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="catalog size")
    p.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="measured seconds per scenario"
    )
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="results file")
    p.add_argument(
        "--plots", type=Path, default=None, help="PNG directory (default: next to --json)"
    )
    p.add_argument("--index", choices=INDEX_KINDS, default="ivf_sq8", help="catalog index")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="category",
        help="catalog row order: category (as training exports it) or shuffled",
    )
    p.add_argument("--users", type=int, default=20_000, help="synthetic shoppers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop callers (throughput)")
    p.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="serving processes for the multi-process scenario (1 = skip)",
    )
    p.add_argument(
        "--per-level", type=int, default=200, help="distinct requests per selectivity level"
    )
    p.add_argument(
        "--recall-samples", type=int, default=100, help="requests per level checked for recall"
    )
    p.add_argument(
        "--levels",
        type=str,
        default=LEVELS,
        help="selectivity levels (fractions)",
    )
    p.add_argument(
        "--load-fractions",
        type=str,
        default="0.25,0.5,0.75,1.0,1.25",
        help="open-loop rates as fractions of the server's closed-loop capacity",
    )
    p.add_argument(
        "--scale",
        type=str,
        default="",
        help="also measure cost at these catalog sizes, e.g. 10000,100000,1000000",
    )
    p.add_argument(
        "--compressed",
        action="store_true",
        help="also run an IVF-PQ catalog of the same size (recall and memory)",
    )
    p.add_argument(
        "--skip",
        type=str,
        default="",
        help="comma list of sections to skip: realtime,replicas,workers,open_loop,sweep,placements",
    )
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="ENDCAP_X=V",
        help="server setting for the run (repeatable)",
    )
    p.add_argument(
        "--live-events",
        type=int,
        default=40_000,
        help="events streamed before the latency scenarios, so live popularity is "
        "populated as in production (0 = an empty state store)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached catalog")
