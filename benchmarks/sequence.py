"""Per-request cost of the sequential query encoder: Encoder.encode and Engine.encode.

python -m benchmarks.sequence [--runs 2000] [--json out.json]

ML-100K-sized (1,682 items) with the tuned SeqConfig (d 64, 2 layers, 2 heads,
inner 256, 50 positions) and random weights: the cost does not depend on the
values. One BLAS thread, as in a serving process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from server.artifact import load_artifact
from server.domain.engine import Engine
from server.domain.query import Context, Profile
from server.domain.sequence import Encoder
from training.export import export_sequential
from training.protocol import Part
from training.sequential import NUM_HEADS, SeqConfig, SequentialModel, init_weights

N_ITEMS, N_USERS = 1682, 100


def _timings_us(fn: Callable[[], object], runs: int, warmup: int = 200) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    wall = np.empty(runs)
    cpu0 = time.process_time()
    for j in range(runs):
        t0 = time.perf_counter()
        fn()
        wall[j] = time.perf_counter() - t0
    cpu = (time.process_time() - cpu0) / runs
    return {
        "p50_us": float(np.percentile(wall, 50) * 1e6),
        "p99_us": float(np.percentile(wall, 99) * 1e6),
        "cpu_mean_us": cpu * 1e6,
    }


def run(runs: int) -> dict[str, object]:
    config = SeqConfig()
    rng = np.random.default_rng(0)
    weights = init_weights(N_ITEMS, config, seed=0)
    for name, value in weights.items():
        if name != NUM_HEADS:
            weights[name] = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
    model = SequentialModel(weights, config, best_epoch=0, valid_ndcg10=0.0, train_s=0.0)
    encoder = Encoder.of(weights)
    table = weights["item_embeddings"]
    results: dict[str, object] = {}
    for length in (1, 10, 50):
        x = table[rng.integers(0, N_ITEMS, length)]
        results[f"Encoder.encode len {length}"] = _timings_us(partial(encoder.encode, x), runs)
    histories = [rng.integers(0, N_ITEMS, 40).tolist() for _ in range(N_USERS)]
    indptr = np.arange(0, 40 * N_USERS + 1, 40, dtype=np.int64)
    part = Part(
        indptr=indptr,
        items=np.array(histories, dtype=np.int32).ravel(),
        timestamps=np.zeros(40 * N_USERS, dtype=np.int64),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = export_sequential(
            model,
            Path(tmp),
            item_ids=[str(i) for i in range(N_ITEMS)],
            user_ids=[str(u) for u in range(N_USERS)],
            histories=part,
        )
        engine = Engine(load_artifact(path))
        session = Profile(recent=tuple((str(i), 0.0) for i in range(10)))
        ctx = Context(user_id="7")
        results["Engine.encode trained 40 + session 10"] = _timings_us(
            lambda: engine.encode(ctx, session, 0.0), runs
        )
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "params": {"runs": runs, "config": repr(config), "n_items": N_ITEMS},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.runs)
    for name, r in report["results"].items():  # type: ignore[attr-defined]
        print(
            f"{name:40s} p50 {r['p50_us']:7.0f} µs  p99 {r['p99_us']:7.0f} µs  cpu {r['cpu_mean_us']:7.0f} µs"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
