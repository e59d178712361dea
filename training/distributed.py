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
import math
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
    """Replace every parameter's gradient by its mean over the `world` processes.

    Two collectives per step, whatever the number of tables: an all_gather of
    each rank's sparse row counts, then one all_gather of a flat float32
    buffer holding the dense gradients and every sparse table's (row, value)
    pairs, padded to the largest rank's count. Collectives, not bytes, are
    what costs on a busy 2-core box: each is a rendezvous of all ranks.
    """
    # Which tables have sparse gradients is fixed by the model, not by this step's batch,
    # so every rank packs the same layout even if a table got no gradient here.
    sparse_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse
    }
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if id(p) not in sparse_ids]
    sparse = [p for p in params if id(p) in sparse_ids]
    grads = [_sparse_grad(p) for p in sparse]
    counts = torch.tensor([g.indices().shape[1] for g in grads], dtype=torch.int64)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    per_rank = torch.stack(every)  # (world, tables)
    longest = per_rank.max(dim=0).values.tolist()
    widths = [math.prod(p.shape[1:]) for p in sparse]  # floats per row
    flat = [_grad(p).reshape(-1).to(torch.float32) for p in dense]
    for g, size, width in zip(grads, longest, widths, strict=True):
        rows = torch.zeros(size, dtype=torch.int32)
        rows[: g.indices().shape[1]] = g.indices()[0].to(torch.int32)
        values = torch.zeros((size, width), dtype=torch.float32)
        values[: g.indices().shape[1]] = g.values().reshape(-1, width)
        # Row numbers ride in the float buffer bit for bit (a view, never arithmetic).
        flat += [rows.view(torch.float32), values.reshape(-1)]
    buffer = torch.cat(flat)
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer)
    stacked = torch.stack(gathered)  # (world, length)
    offset = 0
    for p in dense:
        size = p.numel()
        p.grad = stacked[:, offset : offset + size].sum(dim=0).div_(world).view_as(p).to(p.dtype)
        offset += size
    for t, (p, size, width) in enumerate(zip(sparse, longest, widths, strict=True)):
        rows = stacked[:, offset : offset + size].contiguous().view(torch.int32)
        offset += size
        values = stacked[:, offset : offset + size * width].reshape(world, size, width)
        offset += size * width
        keep = torch.arange(size).unsqueeze(0) < per_rank[:, t].unsqueeze(1)  # (world, size)
        shape = p.shape
        # Rows come from coalesced gradients of this very table: in range by construction.
        p.grad = torch.sparse_coo_tensor(
            rows[keep].to(torch.int64).unsqueeze(0),
            values[keep].div_(world).reshape(-1, *shape[1:]).to(p.dtype),
            shape,
            check_invariants=False,
        ).coalesce()


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _sparse_grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        return torch.sparse_coo_tensor(
            torch.zeros((1, 0), dtype=torch.int64),
            torch.zeros((0, *p.shape[1:]), dtype=p.dtype),
            p.shape,
            check_invariants=True,
        ).coalesce()
    return p.grad.coalesce()


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
