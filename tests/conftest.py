"""Shared fixtures: a small trained artifact, and the real server on a loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.app import Running, load_engine, start
from server.infra.settings import Settings
from training.data import Dataset
from training.synthetic import StoreConfig, generate_store
from training.train import TrainConfig

T = TypeVar("T")

# Small enough to train in seconds, big enough for every plan to run: with
# exact_scan_max_items below the catalog size, broad filters take the ANN path.
TEST_STORE = StoreConfig(n_items=3_000, n_users=600, n_events=30_000, seed=7)
TEST_TRAIN = TrainConfig(dim=32, epochs=2, seed=7)


@dataclass(frozen=True)
class TrainedStore:
    dataset: Dataset
    artifacts: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    from training.pipeline import train_and_export

    root = tmp_path_factory.mktemp("artifacts")
    train_and_export(root, TEST_STORE, TEST_TRAIN, progress=False)
    return TrainedStore(dataset=generate_store(TEST_STORE), artifacts=root)


class ServerThread:
    """The real grpc.aio server, on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: Running = self.call(start(settings))
        self.running.publish(load_engine(settings))
        self.call(self.running.set_serving(True))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.call(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def make_settings(artifacts: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "artifacts": artifacts,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "exact_scan_max_items": 500,
    }
    return Settings(**(base | overrides))


@pytest.fixture(scope="session")
def server(trained: TrainedStore) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(trained.artifacts))
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)
