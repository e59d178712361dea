"""Prometheus metrics: defined here, recorded by the interceptor and the search call.

Names follow Prometheus conventions (base units, `_total` counters). Labels are
bounded sets (method, code, plan, provenance); never ids.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

# Fine enough to see 25 us .. 10 ms, with a tail up to a second.
LATENCY_BUCKETS_S = (
    25e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 400e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip


class Metrics:
    """All of endcap's series, registered in one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "endcap_grpc_requests_total",
            "gRPC requests handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.handling = Histogram(
            "endcap_grpc_handling_seconds",
            "Server-side handler time (after deserialisation, before serialisation).",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.retrieval = Histogram(
            "endcap_retrieval_seconds",
            "Time in the retrieval plan chosen for a request (filter, search, rank).",
            ["plan"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.items_served = Counter(
            "endcap_items_served_total",
            "Items returned, by the pipeline stage that produced them.",
            ["provenance"],
            registry=registry,
        )
        self.catalog_items = Gauge(
            "endcap_catalog_items", "Items in the served catalog.", registry=registry
        )
        self.model_info = Info(
            "endcap_model", "The model artifact being served.", registry=registry
        )
        self.model_loaded = Gauge(
            "endcap_model_loaded_timestamp_seconds",
            "Unix time the served artifact was loaded.",
            registry=registry,
        )
        self.events = Counter(
            "endcap_events_total",
            "Shopper events received, by outcome (accepted, rejected).",
            ["outcome"],
            registry=registry,
        )
        self.event_lag = Histogram(
            "endcap_event_lag_seconds",
            "Time from an event happening (its timestamp) to the server accepting it.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600),
            registry=registry,
        )
        self.state_degraded = Gauge(
            "endcap_state_degraded",
            "1 while the shared state backend (Redis) is unavailable and local state serves.",
            registry=registry,
        )
        self.catalog_feed_behind = Gauge(
            "endcap_catalog_feed_behind",
            "1 while this replica cannot read the shared live catalog stream (Redis down): "
            "catalog changes made elsewhere are not applied here yet.",
            registry=registry,
        )
        self.reloads = Counter(
            "endcap_model_reloads_total",
            "Model reload attempts, by outcome (ok, refused).",
            ["outcome"],
            registry=registry,
        )
        self.experiment_requests = Counter(
            "endcap_experiment_requests_total",
            "Responses served per experiment variant (labels come from the config, bounded).",
            ["experiment", "variant"],
            registry=registry,
        )
        self.experiment_events = Counter(
            "endcap_experiment_events_total",
            "Impressions, clicks and purchases attributed to a variant via recommendation_id.",
            ["experiment", "variant", "type"],
            registry=registry,
        )
        self.model_created = Gauge(
            "endcap_model_created_timestamp_seconds",
            "Unix time the served artifact was built (alert on model age).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "endcap_in_flight_requests",
            "Recommender calls admitted and not yet answered.",
            registry=registry,
        )
        self.shed = Counter(
            "endcap_shed_total",
            "Calls refused before running: queue and in_flight (RESOURCE_EXHAUSTED), "
            "deadline (already late).",
            ["reason"],
            registry=registry,
        )
        self.queue_delay = Histogram(
            "endcap_queue_delay_seconds",
            "How long Recommender calls with a deadline waited before their handler ran.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.recommendations = Counter(
            "endcap_recommendations_total",
            "Recommend answers per strategy, shopper segment and traffic source (sources "
            "no strategy names count as other, none when unset).",
            ["strategy", "segment", "source"],
            registry=registry,
        )
        self.budget_fallbacks = Counter(
            "endcap_budget_fallbacks_total",
            "Calls answered from segment popularity because their time budget ran short.",
            ["method"],
            registry=registry,
        )


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide Metrics in the default registry (created on first use)."""
    global _default
    if _default is None:
        # `_created` series double the exposition and no dashboard reads them.
        # prometheus_client ships py.typed but leaves this function unannotated.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        _default = Metrics()
    return _default
