"""endcap.client against the real server, and its channel behaviour against a scripted peer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import ServerThread, TrainedStore
from endcap.client import (
    SERVICE_NAME,
    AsyncClient,
    Boost,
    Client,
    Context,
    DeadlineExceeded,
    Diversity,
    Event,
    Filters,
    InvalidArgument,
    Item,
    NotFound,
    Pin,
    Recommendations,
    Reranked,
    Rules,
    Unavailable,
    channel_options,
    service_config,
)
from endcap.v1 import recommender_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
MODEL_PROVENANCE = {"ann_retrieval", "exact_scan"}


def known_user(trained: TrainedStore, country: str) -> str:
    ds = trained.dataset
    c = ds.country_codes.index(country)
    return str(ds.user_ids[np.flatnonzero(ds.user_country == c)[0]])


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


# --- the blocking client against the real server ---------------------------------


def test_three_lines_recommend_for_a_known_user(
    server: ServerThread, trained: TrainedStore
) -> None:
    user = known_user(trained, "DE")
    with Client(server.target) as client:
        recs = client.recommend(user_id=user, country="DE", num_results=10)
    assert isinstance(recs, Recommendations)
    assert len(recs) == 10 and all(isinstance(i, Item) for i in recs.items)
    assert recs.personalized and recs.model_version and recs.recommendation_id
    assert {i.provenance for i in recs.items} <= MODEL_PROVENANCE
    scores = [i.score for i in recs.items]
    assert scores == sorted(scores, reverse=True)
    assert recs.item_ids == [i.item_id for i in recs.items]


def test_recommend_applies_context_and_filters(client: Client) -> None:
    recs = client.recommend(
        session_id="s-new",
        device="mobile",
        placement="home",
        country="DE",
        currency="EUR",
        filters=Filters(max_price=40.0, in_stock_only=True),
        num_results=7,
    )
    assert not recs.personalized
    assert 0 < len(recs) <= 7
    assert recs.currency == "EUR"
    for item in recs.items:
        assert item.price <= 40.0 + 1e-6 and item.in_stock and item.currency == "EUR"
        assert item.provenance in {"segment_popularity", "global_popularity"}


def test_recommend_takes_seeds_strategy_and_diversity(client: Client) -> None:
    def recommend(placement: str, **kwargs: Any) -> Recommendations:
        return client.recommend(
            placement=placement,  # type: ignore[arg-type]  # a literal, checked by the client
            country="DE",
            currency="EUR",
            session_id="s-client-upsell",
            **kwargs,
        )

    seed = recommend("product", num_results=1).items[0]
    up = recommend(
        "product", seed_item_ids=seed.item_id, strategy="product.upsell", traffic_source="Email"
    )
    assert up.strategy == "product.upsell" and up.shopper_segment == "new_visitor"
    assert up.traffic_source == "email"
    assert len(up) > 0 and seed.item_id not in up.item_ids
    for item in up.items:
        assert item.category == seed.category
        assert 1.1 * seed.price - 1e-6 <= item.price <= 2.0 * seed.price + 1e-6
        assert item.reason  # every item explains itself
    home = recommend("home", num_results=10, diversity=Diversity(max_per_category=1))
    categories = [i.category for i in home.items]
    assert len(home) > 1 and len(categories) == len(set(categories))


def test_recommend_takes_merchandising_rules(client: Client) -> None:
    ctx: dict[str, Any] = {"country": "DE", "currency": "EUR", "user_id": "u-client-rules"}
    plain = client.recommend(num_results=10, **ctx)
    assert len(plain) >= 4
    first, second = plain.items[:2]
    third = next(i for i in plain.items[2:] if i.brand != second.brand)
    ruled = client.recommend(
        num_results=10,
        rules=Rules(
            pins=[Pin(third.item_id, 1)],
            blocked_item_ids=[first.item_id],
            boosts=[Boost("brand", second.brand, 0.0)],  # 0 hides the brand
        ),
        **ctx,
    )
    assert ruled.items[0].item_id == third.item_id
    assert first.item_id not in ruled.item_ids
    assert all(i.brand != second.brand for i in ruled.items if i.item_id != third.item_id)


def test_similar_items_never_returns_seeds(client: Client, trained: TrainedStore) -> None:
    seeds = [str(s) for s in trained.dataset.item_ids[:2]]
    recs = client.similar_items(seeds, num_results=5, country="DE")
    assert 0 < len(recs) <= 5
    assert not set(recs.item_ids) & set(seeds)
    one = client.similar_items(seeds[0], num_results=3)  # a bare id is one seed
    assert seeds[0] not in one.item_ids


def test_rerank_orders_candidates_and_reports_the_rest(
    client: Client, trained: TrainedStore
) -> None:
    candidates = [str(s) for s in trained.dataset.item_ids[10:40]]
    reranked = client.rerank(
        [*candidates, "no-such-item"],
        user_id=known_user(trained, "DE"),
        country="DE",
        filters=Filters(in_stock_only=False),
    )
    assert isinstance(reranked, Reranked)
    assert reranked.unknown_item_ids == ("no-such-item",)
    assert set(reranked.item_ids) | set(reranked.filtered_item_ids) == set(candidates)
    assert {i.provenance for i in reranked.items} == {"reranked_candidate"}
    top = client.rerank(candidates, num_results=3, filters=Filters(in_stock_only=False))
    assert len(top) == 3


def test_unknown_seed_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as err:
        client.similar_items(["no-such-item"])
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_invalid_argument_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.recommend(num_results=9999)
    assert err.value.message.startswith("num_results")
    assert [v.field for v in err.value.violations] == ["num_results"]
    with pytest.raises(InvalidArgument) as err2:
        client.recommend(filters=Filters(min_price=10, max_price=5))
    assert err2.value.violations and err2.value.violations[0].field.startswith("filters.")


def test_bad_context_is_refused_before_the_call(client: Client) -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        client.recommend(device="watch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown context field"):
        client.recommend(userid="u1")  # type: ignore[call-arg]


def test_track_events_accepts_good_events_and_reports_bad_ones(
    client: Client, trained: TrainedStore
) -> None:
    shopper: Context = {"session_id": "s-events", "country": "DE", "currency": "EUR"}
    recs = client.recommend(num_results=3, **shopper)
    assert recs.experiment == "" and recs.variant == ""  # no experiments configured
    item = recs.item_ids[0]
    tracked = client.track_events(
        [
            Event("recommendation_impression", shopper, recommendation_id=recs.recommendation_id),
            Event("recommendation_click", shopper, item, recommendation_id=recs.recommendation_id),
            Event("view", shopper, item, timestamp_s=time.time() - 1, event_id="e-view"),
            Event("view", shopper, event_id="e-bad"),  # no item_id
            Event("purchase", shopper, item, price=19.99, quantity=2),
        ]
    )
    assert tracked.accepted == 4
    (bad,) = tracked.rejected
    assert (bad.index, bad.event_id, bad.field) == (3, "e-bad", "events[3].item_id")
    with pytest.raises(ValueError, match="type must be one of"):
        client.track_events([Event("like", shopper, item)])  # type: ignore[arg-type]


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    client.wait_until_serving(timeout_s=10)


def test_dns_target_uses_round_robin(server: ServerThread) -> None:
    target = f"dns:///{server.target}"
    config = json.loads(dict(channel_options(target))["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    with Client(target) as client:
        assert len(client.recommend(country="DE", num_results=3)) == 3


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", max_attempts=1, timeout_s=5) as client:
        with pytest.raises(Unavailable):
            client.recommend()
        with pytest.raises(Unavailable):
            client.health()


# --- the asyncio client against the real server ----------------------------------


def test_async_client_matches_the_blocking_one(server: ServerThread, trained: TrainedStore) -> None:
    user = known_user(trained, "DE")
    seeds = [str(s) for s in trained.dataset.item_ids[:2]]

    async def main() -> tuple[Recommendations, Recommendations, Reranked, str]:
        async with AsyncClient(server.target) as client:
            await client.wait_until_serving(timeout_s=10)
            recs, similar, reranked = await asyncio.gather(
                client.recommend(user_id=user, country="DE", num_results=10),
                client.similar_items(seeds, num_results=5),
                client.rerank([*seeds, "no-such-item"], filters=Filters(in_stock_only=False)),
            )
            with pytest.raises(InvalidArgument):
                await client.recommend(num_results=0 - 1)
            with pytest.raises(NotFound):
                await client.similar_items("no-such-item")
            return recs, similar, reranked, await client.health()

    recs, similar, reranked, health = asyncio.run(main())
    with Client(server.target) as sync:
        expected = sync.recommend(user_id=user, country="DE", num_results=10)
    assert recs.item_ids == expected.item_ids and recs.personalized
    assert not set(similar.item_ids) & set(seeds)
    assert reranked.unknown_item_ids == ("no-such-item",)
    assert health == "SERVING"


# --- channel behaviour against a scripted peer ------------------------------------


@dataclass
class Script:
    """What the scripted Recommender does, and what it saw."""

    fail_first: int = 0  # answer UNAVAILABLE to this many attempts
    hold: threading.Event | None = None  # block each call until set
    attempts: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if self.hold is not None:
            self.hold.wait(timeout=30)
        if attempt <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.RecommendResponse(
            items=[pb.RecommendedItem(item_id="sku-1", score=1.0)],
            recommendation_id="r1",
            model_version="scripted",
        )


def _peer(
    script: Script, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(
        script.recommend,
        request_deserializer=pb.RecommendRequest.FromString,
        response_serializer=pb.RecommendResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Recommend": handler}),)
    )
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def scripted() -> Iterator[tuple[Script, str]]:
    script = Script()
    server, port = _peer(script)
    yield script, f"127.0.0.1:{port}"
    if script.hold is not None:
        script.hold.set()
    server.stop(None)


@pytest.mark.parametrize(
    ("api_key_header", "expected"),
    [("authorization", ("authorization", "Bearer k-123")), ("x-api-key", ("x-api-key", "k-123"))],
)
def test_api_key_is_sent_as_metadata(
    scripted: tuple[Script, str], api_key_header: Any, expected: tuple[str, str]
) -> None:
    script, target = scripted
    with Client(target, api_key="k-123", api_key_header=api_key_header) as client:
        client.recommend(metadata=[("x-request-id", "abc")])
    seen = script.metadata[-1]
    assert seen[expected[0]] == expected[1]
    assert seen["x-request-id"] == "abc"
    assert seen["user-agent"].startswith("endcap-python")


def test_no_api_key_sends_no_auth_metadata(scripted: tuple[Script, str]) -> None:
    script, target = scripted
    with Client(target) as client:
        client.recommend()
    assert "authorization" not in script.metadata[-1]
    assert "x-api-key" not in script.metadata[-1]


def test_unavailable_is_retried_per_the_service_config(scripted: tuple[Script, str]) -> None:
    script, target = scripted
    script.fail_first = 2
    with Client(target) as client:
        assert client.recommend().model_version == "scripted"
    assert script.attempts == 3


def test_retries_stop_at_max_attempts(scripted: tuple[Script, str]) -> None:
    script, target = scripted
    script.fail_first = 100
    with Client(target, max_attempts=2) as client, pytest.raises(Unavailable) as err:
        client.recommend()
    assert err.value.message == "draining"
    assert script.attempts == 2
    with Client(target, max_attempts=1) as client, pytest.raises(Unavailable):
        client.recommend()
    assert script.attempts == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda target: Client(target).recommend(timeout_s=0.2),  # per-call deadline
        lambda target: Client(target, timeout_s=0.2).recommend(),  # the client's default
    ],
    ids=["per-call", "default"],
)
def test_deadline_is_enforced(
    scripted: tuple[Script, str], call: Callable[[str], Recommendations]
) -> None:
    script, target = scripted
    script.hold = threading.Event()
    with pytest.raises(DeadlineExceeded):
        call(target)


def test_async_client_sends_metadata_and_retries(scripted: tuple[Script, str]) -> None:
    script, target = scripted
    script.fail_first = 1

    async def main() -> Recommendations:
        async with AsyncClient(target, api_key="k-async") as client:
            return await client.recommend(country="DE")

    assert asyncio.run(main()).item_ids == ["sku-1"]
    assert script.attempts == 2
    assert script.metadata[-1]["authorization"] == "Bearer k-async"


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


def test_tls_credentials(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    script = Script()
    server, port = _peer(script, grpc.ssl_server_credentials([(key, cert)]))
    try:
        tls = grpc.ssl_channel_credentials(root_certificates=cert)
        with Client(f"localhost:{port}", credentials=tls, api_key="k") as client:
            assert client.recommend().model_version == "scripted"
        assert script.metadata[-1]["authorization"] == "Bearer k"
        # The same server refuses a plaintext client.
        with Client(f"localhost:{port}", max_attempts=1) as plain, pytest.raises(Unavailable):
            plain.recommend()
    finally:
        server.stop(None)


def test_service_config_shape() -> None:
    config = service_config(timeout_s=0.25, max_attempts=4, load_balancing="round_robin")
    method, writes = config["methodConfig"]
    assert writes["name"][0] == {"service": SERVICE_NAME, "method": "TrackEvents"}
    assert "retryPolicy" not in writes and writes["timeout"] == "0.25s"
    assert {"service": SERVICE_NAME} in method["name"]
    assert method["timeout"] == "0.25s"
    assert "timeout" not in service_config()["methodConfig"][0]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert "retryPolicy" not in service_config(max_attempts=1)["methodConfig"][0]
    with pytest.raises(ValueError, match="max_attempts"):
        service_config(max_attempts=0)


# --- the README and the worked example ------------------------------------------------


def test_readme_three_lines_work(
    server: ServerThread, trained: TrainedStore, capsys: pytest.CaptureFixture[str]
) -> None:
    section = (ROOT / "README.md").read_text().split("## Python client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match
    code = [line for line in match[1].splitlines() if line.strip()]
    assert len(code) == 3, code
    user = known_user(trained, "DE")
    exec("\n".join(code).replace("localhost:50051", server.target).replace("u000001", user), {})
    printed = capsys.readouterr().out
    assert printed.count("sku-") == 10


def test_product_page_example_renders(server: ServerThread, trained: TrainedStore) -> None:
    item = str(trained.dataset.item_ids[5])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")])}
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "examples/product_page.py"),
            "--target", server.target, "--item", item, "--country", "DE", "--currency", "EUR",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = result.stdout
    assert f"Product {item}" in page
    assert "You may also like" in page and "Complete the look" in page
    assert "recommendation_id=" in page
    assert "impressions recorded: 2" in page
