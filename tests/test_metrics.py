"""The Prometheus exposition, scraped over HTTP from a real server and parsed."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerThread
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def metrics_url(server: ServerThread) -> Iterator[str]:
    http, thread = start_http_server(0, addr="127.0.0.1", registry=server.running.metrics.registry)
    yield f"http://127.0.0.1:{http.server_port}/metrics"
    http.shutdown()
    http.server_close()
    thread.join(timeout=5)


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_requests_latency_and_provenance_are_exposed(
    stub: pb_grpc.RecommenderStub, metrics_url: str
) -> None:
    before = scrape(metrics_url)
    key_ok = (("code", "OK"), ("method", "Recommend"))
    key_bad = (("code", "INVALID_ARGUMENT"), ("method", "Recommend"))
    n_ok = before.get("endcap_grpc_requests_total", {}).get(key_ok, 0.0)
    n_bad = before.get("endcap_grpc_requests_total", {}).get(key_bad, 0.0)
    for _ in range(3):
        stub.Recommend(pb.RecommendRequest(context=pb.RequestContext(country="DE"), num_results=4))
    with pytest.raises(grpc.RpcError):
        stub.Recommend(pb.RecommendRequest(num_results=9999))
    # context.abort sends the status before the interceptor counts it: the client can
    # see the error a moment before the counter moves.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(metrics_url)
        counted = after.get("endcap_grpc_requests_total", {}).get(key_bad, 0.0)
        if counted >= n_bad + 1 or time.monotonic() > deadline:
            break
    assert after["endcap_grpc_requests_total"][key_ok] == n_ok + 3
    assert after["endcap_grpc_requests_total"][key_bad] == n_bad + 1
    count = after["endcap_grpc_handling_seconds_count"][(("method", "Recommend"),)]
    assert count >= n_ok + n_bad + 4
    buckets = {
        dict(k)["le"]: v
        for k, v in after["endcap_grpc_handling_seconds_bucket"].items()
        if dict(k)["method"] == "Recommend"
    }
    assert "5e-05" in buckets and "0.01" in buckets  # 50 us .. 10 ms resolution
    served = after["endcap_items_served_total"]
    assert served[(("provenance", "segment_popularity"),)] >= 1
    assert after["endcap_catalog_items"][()] > 0
    (info_labels,) = after["endcap_model_info"].keys()
    assert dict(info_labels)["model_version"]
    assert after["endcap_model_created_timestamp_seconds"][()] > 1.6e9
    plans = {dict(k)["plan"] for k in after["endcap_retrieval_seconds_count"]}
    assert "popularity" in plans


def test_recommendations_are_counted_by_strategy_segment_and_bounded_source(
    stub: pb_grpc.RecommenderStub, metrics_url: str
) -> None:
    def count(source: str) -> float:
        key = (("segment", "new_visitor"), ("source", source), ("strategy", "home"))
        return scrape(metrics_url).get("endcap_recommendations_total", {}).get(key, 0.0)

    before = {s: count(s) for s in ("social", "other", "none")}
    for source in ("Social", "newsletter-42", "", "coupon-site"):
        ctx = pb.RequestContext(country="DE", placement=pb.RequestContext.HOME)
        ctx.traffic_source = source
        stub.Recommend(pb.RecommendRequest(context=ctx, num_results=3))
    assert count("social") == before["social"] + 1  # named by the default home strategy
    assert count("other") == before["other"] + 2  # free-form sources share one label
    assert count("none") == before["none"] + 1
    sources = {dict(k)["source"] for k in scrape(metrics_url)["endcap_recommendations_total"]}
    assert not sources & {"newsletter-42", "coupon-site"}
