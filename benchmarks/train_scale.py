"""Train at scale (10M interactions, 1M items) on this machine: wall time and peak RSS per phase.

    .venv/bin/python -m benchmarks.train_scale --json train_scale.json

Phases: generate the synthetic store; optionally write it as Parquet and read
it back through training.loaders (--via-parquet); train one epoch of the
two-tower model (training.train, validation included); optionally export the
artifact with its IVF index (--export). Peak RSS is measured per phase by
resetting the kernel's high-water mark (/proc/self/clear_refs) and reading
VmHWM; the process-wide peak is getrusage's ru_maxrss. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Wall time and peak RSS of each phase."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        reset = _reset_peak()
        extra: dict[str, Any] = {}
        began = time.perf_counter()
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        yield extra
        row = {
            "phase": name,
            "seconds": round(time.perf_counter() - began, 1),
            "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1) if reset else None,
            "rss_after_mb": round(_status_kb("VmRSS") / 1024, 1),
            **extra,
        }
        self.rows.append(row)
        print(f"{time.strftime('%H:%M:%S')} {name}: {json.dumps(row)}", flush=True)


def _write_parquet(dataset: Any, directory: Path, chunk: int = 1 << 21) -> tuple[Path, Path]:
    """The store as a shop would export it: interactions and items Parquet, written in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = np.array(["view", "add_to_cart", "purchase"])
    devices = np.array(["", "mobile", "tablet", "desktop"])
    countries = np.array([*dataset.country_codes, ""])
    events = directory / "interactions.parquet"
    with pq.ParquetWriter(events, pa.schema([
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("event_type", pa.string()),
        ("device", pa.string()),
        ("country", pa.string()),
    ])) as writer:  # fmt: skip
        for lo in range(0, dataset.n_events, chunk):
            sl = slice(lo, lo + chunk)
            writer.write_table(
                pa.table(
                    {
                        "user_id": pa.array(dataset.user_ids[dataset.ev_user[sl]]),
                        "item_id": pa.array(dataset.item_ids[dataset.ev_item[sl]]),
                        "timestamp": pa.array(dataset.ev_ts[sl]),
                        "event_type": pa.array(kinds[dataset.ev_type[sl]]),
                        "device": pa.array(devices[dataset.ev_device[sl]]),
                        "country": pa.array(countries[dataset.ev_country[sl]]),
                    }
                )
            )
    names = np.array(dataset.category_names)
    brands = np.array(dataset.brand_names)
    codes = np.array(dataset.country_codes)
    ships = ["|".join(codes[row]) for row in dataset.item_countries]
    items = directory / "items.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(dataset.item_ids),
                "category": pa.array(names[dataset.item_category]),
                "brand": pa.array(brands[dataset.item_brand]),
                "price": pa.array(dataset.item_price),
                "currency": pa.array(np.full(dataset.n_items, dataset.base_currency)),
                "countries": pa.array(ships),
                "in_stock": pa.array(dataset.item_in_stock),
            }
        ),
        items,
    )
    return events, items


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_scale", description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (TrainConfig.threads)")
    p.add_argument("--via-parquet", action="store_true", help="round-trip through loaders")
    p.add_argument("--export", action="store_true", help="also write the artifact + IVF index")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    from training.synthetic import StoreConfig, generate_store
    from training.train import TrainConfig, train

    phases = Phases()
    store = StoreConfig(
        n_items=args.items, n_users=args.users, n_events=args.interactions, seed=args.seed
    )
    began = time.perf_counter()
    with phases.phase("generate") as info:
        dataset = generate_store(store)
        info["events"] = dataset.n_events
    with tempfile.TemporaryDirectory(prefix="endcap-train-scale-") as tmp:
        if args.via_parquet:
            with phases.phase("write parquet") as info:
                events, items = _write_parquet(dataset, Path(tmp))
                info["bytes"] = events.stat().st_size + items.stat().st_size
            del dataset
            from training.loaders import ShopFiles

            with phases.phase("load parquet (training.loaders)") as info:
                loaded = ShopFiles(interactions=events, items=items).load()
                dataset = loaded.dataset
                info["events"] = dataset.n_events
                info["skipped"] = sum(sum(r.skipped.values()) for r in loaded.reports)
        config = TrainConfig(dim=args.dim, epochs=1, seed=args.seed, threads=args.threads)
        with phases.phase("train 1 epoch") as info:
            model = train(dataset, config, progress=sys.stderr.isatty())
            info["examples"] = model.n_train_examples
            info["steps"] = -(-model.n_train_examples // config.batch_size)
            info["epoch_seconds"] = round(model.history[0].seconds, 1)
            info["validation"] = {k: round(v, 4) for k, v in model.metrics.items()}
            info["popularity"] = {k: round(v, 4) for k, v in model.baseline_metrics.items()}
        if args.export:
            from training.export import export_artifact

            with phases.phase("export artifact") as info:
                path = export_artifact(dataset, model, Path(tmp) / "artifacts")
                info["index"] = json.loads((path / "manifest.json").read_text())[
                    "index_description"
                ]
    result = {
        "params": vars(args) | {"json": str(args.json) if args.json else None},
        "store": {"items": args.items, "users": args.users, "interactions": args.interactions},
        "phases": phases.rows,
        "total_seconds": round(time.perf_counter() - began, 1),
        # Resetting VmHWM resets ru_maxrss too: the run's peak is the largest phase peak.
        "peak_rss_mb": max(
            [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)]
            + [row["peak_rss_mb"] for row in phases.rows if row["peak_rss_mb"] is not None]
        ),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "mem_total_mb": round(_meminfo_kb("MemTotal") / 1024),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
