"""Data-parallel training of the two-tower model over processes (DDP-style, gloo on CPU).

    torchrun --nproc_per_node 2 -m training.distributed --items 50000 --out artifacts

Every rank builds the same Dataset (the synthetic store is deterministic; shop
files are read by every rank), trains on its 1/world shard of each epoch's
shuffled examples, and averages gradients with an explicit all-reduce after
every backward pass: dense gradients in one flat all_reduce, the sparse
embedding-row gradients by all-gathering (row, value) pairs. That keeps the
model's lazy sparse Adam (training/model.py) exact, which DistributedDataParallel
would not (it buckets dense gradients and would densify or reject the sparse
ones). Rank 0 exports the artifact and writes the report. Without torchrun's
environment it runs as one process, the same code path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training.data import Dataset
from training.model import TwoTower
from training.train import TrainConfig, TrainedModel, train

logger = logging.getLogger(__name__)


def allreduce_gradients(model: TwoTower, world: int) -> None:
    """Replace every parameter's gradient by its mean over the `world` processes."""
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if p.grad is None or not p.grad.is_sparse]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense]
    )
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p in dense:
        size = p.numel()
        p.grad = flat[offset : offset + size].view_as(p)
        offset += size
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = _mean_sparse(p.grad, world)


def _mean_sparse(grad: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over processes of a sparse row gradient (rows x dim, COO)."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    # all_gather wants equal shapes: pad to the longest, then cut each back.
    padded_rows = torch.zeros(longest, dtype=rows.dtype)
    padded_rows[: rows.numel()] = rows
    padded_values = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype)
    padded_values[: rows.numel()] = values
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    merged_rows = torch.cat([r[: int(c)] for r, c in zip(all_rows, counts, strict=True)])
    merged_values = torch.cat([v[: int(c)] for v, c in zip(all_values, counts, strict=True)])
    # Rows come from coalesced gradients of this very table: in range by construction.
    mean = torch.sparse_coo_tensor(
        merged_rows.unsqueeze(0), merged_values.div_(world), grad.shape, check_invariants=False
    ).coalesce()
    return mean


def weights_digest(model: TrainedModel) -> str:
    """sha256 prefix over the exported arrays: equal on every rank if training stayed in sync."""
    digest = hashlib.sha256()
    for arr in (model.item_embeddings, model.user_embeddings, model.history_projection):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def train_distributed(
    dataset: Dataset, config: TrainConfig, *, progress: bool = True
) -> tuple[TrainedModel, int, int]:
    """Train on this process's shard (one process when torch.distributed is not set up).

    config.batch_size is the global batch: each of the `world` ranks takes
    batch_size // world examples per step, so step counts and the learning
    rate schedule match a single process. Returns (model, rank, world).
    """
    if not dist.is_available() or not dist.is_initialized():
        return train(dataset, config, progress=progress), 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    if config.batch_size < world:
        raise ValueError(f"batch_size must be >= world size {world}, got {config.batch_size}")
    local = _with_batch(config, config.batch_size // world)
    model = train(
        dataset,
        local,
        progress=progress and rank == 0,
        shard=(rank, world),
        sync=lambda m: allreduce_gradients(m, world),
    )
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks diverged: weight digests {digests}")
    return model, rank, world


def _with_batch(config: TrainConfig, batch_size: int) -> TrainConfig:
    values = config.to_dict()
    values["batch_size"] = batch_size
    values["event_weights"] = tuple(values["event_weights"])
    return TrainConfig(**values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.distributed",
        description="Train the two-tower model data-parallel; launch with torchrun.",
    )
    p.add_argument("--items", type=int, default=50_000, help="synthetic catalog size")
    p.add_argument("--users", type=int, default=20_000, help="synthetic shoppers")
    p.add_argument("--interactions", type=int, default=1_000_000, help="synthetic events")
    p.add_argument("--interactions-file", type=Path, help="train on a shop's interactions instead")
    p.add_argument("--items-file", type=Path, help="and its items file")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--epochs", type=int, help="epochs (default: TrainConfig)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--batch-size", type=int, default=1024, help="global batch size")
    p.add_argument("--out", type=Path, help="rank 0 writes the artifact under this root")
    p.add_argument("--json", type=Path, help="rank 0 writes metrics and timings here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _load(args: argparse.Namespace) -> Dataset:
    from training.loaders import ShopFiles, SyntheticSource
    from training.synthetic import StoreConfig

    if args.interactions_file is not None:
        return ShopFiles(args.interactions_file, args.items_file).load().dataset
    store = StoreConfig(
        n_items=args.items, n_users=args.users, n_events=args.interactions, seed=args.seed
    )
    return SyntheticSource(store).load().dataset


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    began = time.perf_counter()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group("gloo")
    try:
        dataset = _load(args)
        overrides: dict[str, Any] = {"dim": args.dim, "seed": args.seed}
        overrides["batch_size"] = args.batch_size
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        model, rank, world = train_distributed(
            dataset, TrainConfig(**overrides), progress=not args.quiet
        )
        if rank == 0:
            path = None
            if args.out is not None:
                from training.export import export_artifact

                path = export_artifact(dataset, model, args.out, extra_params={"world": world})
                print(f"artifact written to {path}")
            result = {
                "world": world,
                "metrics": model.metrics,
                "popularity": model.baseline_metrics,
                "best_epoch": model.best_epoch,
                "epochs": [
                    {"epoch": s.epoch, "loss": s.loss, "seconds": s.seconds, **s.metrics}
                    for s in model.history
                ],
                "train_seconds": model.seconds,
                "wall_seconds": time.perf_counter() - began,
                "weights": weights_digest(model),
                "artifact": str(path) if path is not None else None,
            }
            print(json.dumps({k: result[k] for k in ("world", "metrics", "train_seconds")}))
            if args.json is not None:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
