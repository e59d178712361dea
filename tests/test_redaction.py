"""No API keys or shopper ids in logs or metrics, and bounded metric label cardinality."""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
METHODS = [m.name for m in SERVICE.methods]
SECRET = "sk-live-" + uuid.uuid4().hex  # a valid key
WRONG = "sk-wrong-" + uuid.uuid4().hex  # a key a client got wrong
MARK = "pii" + uuid.uuid4().hex[:12]  # in every shopper id sent


@pytest.fixture(scope="module")
def guarded(trained: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("redaction")
    (d / "keys").write_text(f"{SECRET} read,events,admin\n")
    thread = ServerThread(
        make_settings(trained.artifacts, api_keys_file=str(d / "keys"), event_log=str(d / "ev"))
    )
    yield thread
    thread.close()


def _ctx(n: int) -> pb.RequestContext:
    return pb.RequestContext(
        user_id=f"user-{MARK}-{n}", session_id=f"sess-{MARK}-{n}", country="DE", city=MARK
    )


def _traffic(channel: grpc.Channel, trained: TrainedStore) -> None:
    items = [str(i) for i in trained.dataset.item_ids[:5]]
    good = [("authorization", f"Bearer {SECRET}")]
    stub: dict[str, Any] = {
        m.name: channel.unary_unary(
            f"/{SERVICE.full_name}/{m.name}",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        for m in SERVICE.methods
        if not m.client_streaming
    }
    event = pb.Event(type=pb.Event.VIEW, item_id=items[0], context=_ctx(1))
    calls: list[tuple[str, Any]] = [
        ("Recommend", pb.RecommendRequest(context=_ctx(1), num_results=3)),
        ("Recommend", pb.RecommendRequest(context=_ctx(2), num_results=9999)),  # invalid
        ("Rerank", pb.RerankRequest(context=_ctx(3), candidate_item_ids=items)),
        ("SimilarItems", pb.SimilarItemsRequest(context=_ctx(4), seed_item_ids=[f"x-{MARK}"])),
        ("Popular", pb.PopularRequest(context=_ctx(5))),
        ("RecentlyViewed", pb.RecentlyViewedRequest(context=_ctx(1))),
        ("TrackEvents", pb.TrackEventsRequest(events=[event, pb.Event(context=_ctx(6))])),
        ("UpsertItems", pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id=f"i-{MARK}")])),
        ("DeleteItems", pb.DeleteItemsRequest(item_ids=[f"i-{MARK}"])),
        ("ForgetUser", pb.ForgetUserRequest(user_id=f"user-{MARK}-1")),
        ("ReloadModel", pb.ReloadModelRequest(version="no-such-version")),  # logged: admin input
    ]
    for metadata in (good, [("authorization", f"Bearer {WRONG}")], [("x-api-key", WRONG)], []):
        for method, request in calls:
            with contextlib.suppress(grpc.RpcError):
                stub[method](request, timeout=30, metadata=tuple(metadata))
    stream: Any = channel.stream_unary(f"/{SERVICE.full_name}/StreamEvents")
    with contextlib.suppress(grpc.RpcError):
        stream(iter([pb.TrackEventsRequest(events=[event]).SerializeToString()]), metadata=good)


def test_logs_and_metrics_never_carry_keys_or_shopper_ids(
    guarded: ServerThread,
    trained: TrainedStore,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(guarded.target) as channel:
        _traffic(channel, trained)
    assert any(r.name.startswith("server") for r in caplog.records)  # logging was on
    logs = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    out, err = capfd.readouterr()
    exposition = generate_latest(REGISTRY).decode()
    for text, where in ((logs, "logs"), (out + err, "stdout/stderr"), (exposition, "metrics")):
        for needle in (SECRET, WRONG, MARK, SECRET[8:], WRONG[9:]):
            assert needle not in text, f"{needle!r} in {where}"


def test_metric_label_values_stay_bounded(guarded: ServerThread, trained: TrainedStore) -> None:
    rng = random.Random(7)
    good = (("authorization", f"Bearer {SECRET}"),)
    with grpc.insecure_channel(guarded.target) as channel:
        for n in range(400):
            method = rng.choice([*METHODS, "NoSuchMethod", f"Made{n}Up"])
            service = SERVICE.full_name if n % 7 else f"evil{n}.Service"
            body = rng.randbytes(rng.randint(0, 40)) if n % 3 else b""
            metadata = good if n % 5 else (("x-api-key", f"k{n}"),)
            if n % 2 == 0:
                request = pb.RecommendRequest(
                    context=pb.RequestContext(
                        user_id=f"u{rng.random()}",
                        country=rng.choice(["DE", "FR", "US", "ZZ", f"c{n}"]),
                        currency=rng.choice(["EUR", "USD", f"x{n}"]),
                        device=rng.randint(0, 5),  # type: ignore[arg-type]
                    ),
                    num_results=rng.randint(-5, 600),
                )
                method, service, body = "Recommend", SERVICE.full_name, request.SerializeToString()
            path = f"/{service}/{method}"
            md = SERVICE.methods_by_name.get(method)
            call: Any = (
                channel.stream_unary(path)
                if md is not None and md.client_streaming
                else channel.unary_unary(path)
            )
            with contextlib.suppress(grpc.RpcError):
                call(
                    iter([body]) if md and md.client_streaming else body,
                    timeout=30,
                    metadata=metadata,
                )
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for family in REGISTRY.collect():
        if not family.name.startswith("endcap_"):
            continue
        for s in family.samples:
            for label, value in s.labels.items():
                if label not in ("le", "quantile"):
                    values[(family.name, label)].add(value)
    rpc_names = set(METHODS) | {"Check"}  # + the health check
    codes = {c.name for c in grpc.StatusCode}
    for (name, label), seen in values.items():
        assert len(seen) <= 40, (name, label, sorted(seen))
        if label == "method":
            assert seen <= rpc_names, (name, sorted(seen - rpc_names))
        if label == "code":
            assert seen <= codes, (name, sorted(seen - codes))
    assert ("endcap_grpc_requests", "code") in values  # counter families drop _total


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_key_file_is_not_logged(trained: TrainedStore, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"{SECRET} read\n")
    settings = make_settings(trained.artifacts, api_keys_file=str(tmp_path / "keys"))
    logger = logging.getLogger("server")
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        ServerThread(settings).close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert any("API keys required" in m for m in messages)
    assert not any(SECRET in m or SECRET[8:] in m for m in messages)
