"""Wiring: settings -> artifact -> engine -> grpc.aio server with health, reflection, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from endcap.v1 import recommender_pb2, recommender_pb2_grpc
from server.artifact import LATEST, ArtifactError, load_artifact, resolve
from server.domain import experiments
from server.domain.catalog import ItemUpdate
from server.domain.engine import Engine
from server.domain.experiments import ExperimentConfigError
from server.domain.retrieval import SearchTuning
from server.domain.strategy import StrategyConfigError
from server.domain.strategy import load as load_strategies
from server.infra.memory import release_freed
from server.infra.metrics import Metrics, default_metrics
from server.infra.settings import Settings, SettingsError
from server.infra.threads import limit_blas_threads
from server.infra.tls import server_credentials
from server.state.catalog_feed import Apply, CatalogFeed
from server.state.eventlog import EventLog
from server.state.redis_store import RedisStore, ResilientStore
from server.state.store import MemoryStore, StateStore
from server.transport import auth
from server.transport.admission import AdmissionInterceptor
from server.transport.budget import BudgetPolicy
from server.transport.decode import DecodeInterceptor
from server.transport.interceptors import MetricsInterceptor
from server.transport.servicer import EngineHolder, RecommenderServicer

log = logging.getLogger(__name__)

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name


def load_engine(settings: Settings, path: Path | None = None) -> Engine:
    """Load, verify, index and smoke-test an artifact (seconds at 1M items: run it off
    the event loop). Raises ArtifactError naming what is wrong."""
    artifact = load_artifact(path or settings.artifacts, verify_checksums=settings.verify_checksums)
    tuning = SearchTuning(
        exact_scan_max_items=settings.exact_scan_max_items,
        ann_min_nprobe=settings.ann_min_nprobe,
        ann_overfetch=settings.ann_overfetch,
        ann_category_factor=settings.ann_category_factor,
    )
    strategies = load_strategies(Path(settings.strategies) if settings.strategies else None)
    engine = Engine(artifact, tuning, live_capacity=settings.live_capacity, strategies=strategies)
    rules = engine.segment_rules
    log.info(
        "VIP rule: %d+ orders (%s) or %.2f %s spent (%s), last purchase within %.1f days (%s)",
        rules.vip_min_orders,
        rules.origin["vip_min_orders"],
        rules.vip_min_monetary,
        artifact.manifest.base_currency,
        rules.origin["vip_min_monetary"],
        rules.vip_max_recency_days,
        rules.origin["vip_max_recency_days"],
    )
    try:
        engine.smoke_test()
    except (ValueError, IndexError) as exc:
        raise ArtifactError(f"smoke query failed on {artifact.path}: {exc}") from exc
    release_freed()
    return engine


def replay(engine: Engine, journal: list[tuple[str, ItemUpdate | str]]) -> None:
    """Re-apply live catalog changes to a freshly loaded engine."""
    for i, (kind, entry) in enumerate(journal):
        if kind == "upsert" and isinstance(entry, ItemUpdate):
            engine.upsert([(i, entry)])
        elif isinstance(entry, str):
            engine.delete([entry])


def build_store(settings: Settings, metrics: Metrics) -> StateStore:
    local = MemoryStore(max_profiles=settings.max_profiles, ttl_s=settings.profile_ttl_s)
    if settings.state_backend == "memory":
        return local
    redis = RedisStore(
        settings.redis_url, ttl_s=settings.profile_ttl_s, timeout_s=settings.redis_timeout_s
    )
    return ResilientStore(
        redis,
        local,
        timeout_s=settings.redis_timeout_s,
        on_degraded=lambda down: metrics.state_degraded.set(1 if down else 0),
    )


@dataclass
class Running:
    """A started server and the parts tests and the entry point need to drive it."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    holder: EngineHolder
    health: health.aio.HealthServicer
    metrics: Metrics
    executor: ThreadPoolExecutor
    store: StateStore
    events: EventLog | None
    feed: CatalogFeed | None = None
    apply_catalog: Apply | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def reload(self, version: str = "") -> tuple[str, str]:
        """Load a version (default: LATEST) off the loop, verify it, replay live catalog
        changes, swap. In-flight requests finish on the engine they started with; a
        refused artifact leaves the current one serving."""
        async with self.reload_lock:
            root = self.settings.artifacts
            path = root / version if version else root
            loop = asyncio.get_running_loop()
            seen = len(self.holder.journal)
            journal = list(self.holder.journal)

            def build() -> Engine:
                engine = load_engine(self.settings, path)
                replay(engine, journal)
                return engine

            try:
                engine = await loop.run_in_executor(self.executor, build)
            except ArtifactError as exc:
                self.metrics.reloads.labels("refused").inc()
                log.error("reload refused, still serving %s: %s", self._version(), exc)
                raise
            replay(engine, self.holder.journal[seen:])  # changes that arrived while loading
            old = self._version()
            self.publish(engine)
            self.metrics.reloads.labels("ok").inc()
            log.info("reloaded: now serving %s (was %s)", engine.model_version, old)
            return engine.model_version, old

    def _version(self) -> str:
        return self.holder.current.model_version if self.holder.current else ""

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
        """Report SERVING (after catching up with the replicas' live catalog changes)
        or NOT_SERVING."""
        if serving:
            await self.sync_catalog()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def sync_catalog(self) -> None:
        """Replay the shared catalog stream, then follow it (nothing without a feed).
        Redis being down does not stop serving: the follower catches up when it returns."""
        feed, apply = self.feed, self.apply_catalog
        if feed is None or apply is None:
            return
        try:
            replayed = await feed.catch_up(apply)
            if replayed:
                log.info("catalog feed: replayed %d change batches", replayed)
        except (RedisError, OSError) as exc:
            log.warning("catalog feed: cannot replay yet (Redis: %s); will catch up", exc)
        feed.follow(apply)

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new calls, drain in-flight ones, flush the event log."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.feed is not None:
            await self.feed.close()
        if self.events is not None:
            self.events.close()
        await self.store.close()
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
    limit_blas_threads(settings.omp_threads)
    metrics = metrics or default_metrics()
    edge = auth.interceptors(settings)  # first: a bad key file fails before anything opens
    credentials = server_credentials(settings)
    holder = EngineHolder()
    store = build_store(settings, metrics)
    events = None
    if settings.event_log:
        events = EventLog(Path(settings.event_log), fsync=settings.fsync)
        await store.mark_forgotten(events.forgotten)
    running_ref: list[Running] = []

    async def reload(version: str) -> tuple[str, str]:
        return await running_ref[0].reload(version)

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Close connections after a while (with a grace for in-flight calls) so
        # clients re-resolve DNS and spread onto replicas the autoscaler adds.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grace_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]
    admission = AdmissionInterceptor.from_settings(settings, metrics)
    budget = BudgetPolicy(settings.request_budget_s, settings.fallback_below_s)
    interceptors = [MetricsInterceptor(metrics), *edge, admission, DecodeInterceptor()]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    feed = None
    if settings.state_backend == "redis" and settings.catalog_feed:
        feed = CatalogFeed(
            settings.redis_url,
            max_batches=settings.catalog_feed_batches,
            on_behind=lambda behind: metrics.catalog_feed_behind.set(1 if behind else 0),
        )
    servicer = RecommenderServicer(holder, metrics, store, events, reload, budget=budget, feed=feed)
    recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
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
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
        log.info("TLS on%s", " with client certificates required" if settings.tls_client_ca else "")
    await server.start()
    running = Running(
        settings=settings,
        server=server,
        port=port,
        holder=holder,
        health=health_servicer,
        metrics=metrics,
        executor=ThreadPoolExecutor(settings.pool_threads, thread_name_prefix="endcap"),
        store=store,
        events=events,
        feed=feed,
        apply_catalog=servicer.apply_catalog,
    )
    running_ref.append(running)
    await running.set_serving(False)
    return running


async def load_experiments(running: Running) -> None:
    """Load the experiments file and the artifact version each variant names."""
    settings = running.settings
    if not settings.experiments:
        return
    loaded = experiments.load(Path(settings.experiments))
    loop = asyncio.get_running_loop()
    engines: dict[str, Engine] = {}
    for exp in loaded:
        for variant in exp.variants:
            if variant.model and variant.model not in engines:
                engines[variant.model] = await loop.run_in_executor(
                    running.executor, load_engine, settings, settings.artifacts / variant.model
                )
    running.holder.experiments = loaded
    running.holder.variant_engines = engines
    log.info("experiments: %s", ", ".join(f"{e.name} ({len(e.variants)} variants)" for e in loaded))


async def _watch_latest(running: Running, interval_s: float) -> None:
    """Reload when the artifact root's LATEST changes (a training job published)."""
    latest = running.settings.artifacts / LATEST
    seen = latest.read_text().strip() if latest.is_file() else ""
    while True:
        await asyncio.sleep(interval_s)
        current = latest.read_text().strip() if latest.is_file() else ""
        if current and current != seen:
            seen = current
            with contextlib.suppress(ArtifactError):
                await running.reload(current)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    if settings.workers > 1:
        from server.workers import supervise

        return await supervise(settings)
    loop = asyncio.get_running_loop()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    try:
        running = await start(settings)
    except SettingsError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    log.info(
        "gRPC listening on %s:%d (NOT_SERVING until the model loads)", settings.host, running.port
    )
    try:
        await _wait_for_artifact(settings)
        engine = await loop.run_in_executor(running.executor, load_engine, settings)
    except (ArtifactError, StrategyConfigError) as exc:
        log.error("cannot serve: %s", exc)
        await running.stop(0)
        return 2
    running.publish(engine)
    try:
        await load_experiments(running)
    except (ExperimentConfigError, ArtifactError, OSError) as exc:
        log.error("cannot serve: experiments: %s", exc)
        await running.stop(0)
        return 2
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
    background: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.ensure_future(_reload_quietly(running))
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if settings.reload_poll_s > 0:
        background.add(asyncio.ensure_future(_watch_latest(running, settings.reload_poll_s)))
    await stop.wait()
    log.info("shutting down: draining for up to %.1f s", settings.grace_s)
    for task in background:
        task.cancel()
    await running.stop(settings.grace_s)
    return 0


async def _wait_for_artifact(settings: Settings) -> None:
    """Before the first training run publishes, wait (NOT_SERVING) instead of exiting."""
    deadline = time.monotonic() + settings.wait_for_artifact_s
    while time.monotonic() < deadline:
        try:
            resolve(settings.artifacts)
            return
        except ArtifactError:
            await asyncio.sleep(1.0)


async def _reload_quietly(running: Running) -> None:
    with contextlib.suppress(ArtifactError):
        await running.reload()
