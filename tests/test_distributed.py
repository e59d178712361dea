"""Data-parallel training: 2 processes (torchrun, gloo) match 1 process in quality."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from training.distributed import allreduce_gradients

ROOT = Path(__file__).resolve().parents[1]
STORE = ["--items", "2000", "--users", "500", "--interactions", "20000", "--seed", "3"]
TRAIN = ["--epochs", "3", "--dim", "32", "--batch-size", "512", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(prefix: list[str], out: Path) -> dict[str, Any]:
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*prefix, "-m", "training.distributed", *STORE, *TRAIN, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_two_processes_train_as_well_as_one(tmp_path: Path) -> None:
    one = run([sys.executable], tmp_path / "one.json")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    two = run(torchrun, tmp_path / "two.json")
    assert (one["world"], two["world"]) == (1, 2)
    for result in (one, two):
        # Far above the bestsellers on the same validation shoppers.
        assert result["metrics"]["ndcg@10"] > 2.0 * result["popularity"]["ndcg@10"]
    assert two["popularity"] == one["popularity"]  # the same validation set
    assert two["metrics"]["ndcg@10"] == pytest.approx(one["metrics"]["ndcg@10"], rel=0.15)
    assert two["metrics"]["recall@50"] == pytest.approx(one["metrics"]["recall@50"], rel=0.15)


def test_sparse_gradients_average_over_processes(tmp_path: Path) -> None:
    """One process group of size 1 still runs every collective: the mean is the gradient."""
    import torch.distributed as dist

    from training.model import TwoTower

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        model = TwoTower(
            item_category=torch.zeros(5, dtype=torch.int64),
            item_brand=torch.zeros(5, dtype=torch.int64),
            item_price_bucket=torch.zeros(5, dtype=torch.int64),
            category_ancestry=torch.eye(1),
            n_users=3,
            n_brands=1,
            n_price_buckets=1,
            n_countries=1,
            dim=4,
        )
        ids = torch.tensor([1, 3, 1])
        (model.item_id(ids).sum() + model.device.weight.sum()).backward()
        before = model.item_id.weight.grad
        assert before is not None and before.is_sparse
        expected = before.coalesce().to_dense()
        allreduce_gradients(model, 1)
        after = model.item_id.weight.grad
        assert after is not None and after.is_sparse
        torch.testing.assert_close(after.to_dense(), expected)
        assert model.device.weight.grad is not None
        torch.testing.assert_close(model.device.weight.grad, torch.ones(4, 4))
        # A sparse table the batch never touched gets an empty sparse gradient, not dense
        # zeros (which would make the lazy Adam decay every row's moments).
        user_grad = model.user.weight.grad
        assert user_grad is not None and user_grad.is_sparse and user_grad._nnz() == 0
        assert model.brand.weight.grad is not None and not model.brand.weight.grad.is_sparse
    finally:
        dist.destroy_process_group()
