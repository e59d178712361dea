"""The README's grpcurl commands against the real server: reflection only, no .proto."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ServerThread, TrainedStore

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
if GRPCURL is None and os.environ.get("CI"):
    raise RuntimeError("grpcurl is required in CI (the dev extra installs it)")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (dev extra)")


def grpcurl(*args: str) -> str:
    assert GRPCURL is not None
    done = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_describe_and_call(server: ServerThread, trained: TrainedStore) -> None:
    services = grpcurl(server.target, "list").split()
    assert "endcap.v1.Recommender" in services and "grpc.health.v1.Health" in services
    described = grpcurl(server.target, "describe", "endcap.v1.Recommender")
    assert "rpc Recommend" in described and "rpc TrackEvents" in described
    user = str(trained.dataset.user_ids[0])
    body = {
        "context": {"user_id": user, "country": "DE", "currency": "EUR", "device": "MOBILE"},
        "filters": {"max_price": 50},
        "num_results": 5,
    }
    reply = json.loads(
        grpcurl("-d", json.dumps(body), server.target, "endcap.v1.Recommender/Recommend")
    )
    assert len(reply["items"]) == 5
    assert all(item["price"] <= 50 and item["currency"] == "EUR" for item in reply["items"])
    health = json.loads(
        grpcurl(
            "-d",
            '{"service": "endcap.v1.Recommender"}',
            server.target,
            "grpc.health.v1.Health/Check",
        )
    )
    assert health["status"] == "SERVING"
