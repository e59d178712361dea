"""Wiring: settings -> artifact -> engine -> grpc.aio server with health, reflection, metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from endcap.v1 import recommender_pb2, recommender_pb2_grpc
from server.artifact import ArtifactError, load_artifact
from server.domain.engine import Engine
from server.domain.retrieval import SearchTuning
from server.infra.metrics import Metrics, default_metrics
from server.infra.settings import Settings
from server.transport.interceptors import MetricsInterceptor
from server.transport.servicer import EngineHolder, RecommenderServicer

log = logging.getLogger(__name__)

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def load_engine(settings: Settings) -> Engine:
    """Load, verify and index the artifact (seconds at 1M items: run off the event loop)."""
    artifact = load_artifact(settings.artifacts, verify_checksums=settings.verify_checksums)
    tuning = SearchTuning(
        exact_scan_max_items=settings.exact_scan_max_items,
        ann_min_nprobe=settings.ann_min_nprobe,
        ann_overfetch=settings.ann_overfetch,
    )
    return Engine(artifact, tuning)


@dataclass
class Running:
    """A started server and the parts tests and the entry point need to drive it."""

    server: grpc.aio.Server
    port: int
    holder: EngineHolder
    health: health.aio.HealthServicer
    metrics: Metrics
    executor: ThreadPoolExecutor

    def publish(self, engine: Engine) -> None:
        """Serve `engine` from the next request on, and report SERVING."""
        self.holder.current = engine
        m = self.metrics
        manifest = engine.artifact.manifest
        m.catalog_items.set(len(engine.catalog))
        m.model_info.info(
            {
                "model_version": manifest.model_version,
                "format_version": str(manifest.format_version),
            }
        )
        m.model_loaded.set(time.time())
        m.model_created.set(_iso_to_unix(manifest.created_at))

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _iso_to_unix(stamp: str) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


async def start(settings: Settings, metrics: Metrics | None = None) -> Running:
    """Bind and start the gRPC server, NOT_SERVING until an engine is published."""
    faiss.omp_set_num_threads(settings.omp_threads)
    metrics = metrics or default_metrics()
    holder = EngineHolder()
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics)], options=options)
    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        RecommenderServicer(holder, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    running = Running(
        server=server,
        port=port,
        holder=holder,
        health=health_servicer,
        metrics=metrics,
        executor=ThreadPoolExecutor(settings.pool_threads, thread_name_prefix="endcap"),
    )
    await running.set_serving(False)
    return running


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    running = await start(settings)
    log.info(
        "gRPC listening on %s:%d (NOT_SERVING until the model loads)", settings.host, running.port
    )
    try:
        engine = await loop.run_in_executor(running.executor, load_engine, settings)
    except ArtifactError as exc:
        log.error("cannot serve: %s", exc)
        await running.stop(0)
        return 2
    running.publish(engine)
    await running.set_serving(True)
    log.info(
        "serving model %s: %d items, index %s",
        engine.model_version,
        len(engine.catalog),
        engine.artifact.manifest.index_description,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.1f s", settings.grace_s)
    await running.stop(settings.grace_s)
    return 0
