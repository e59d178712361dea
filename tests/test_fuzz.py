"""Hostile input over real gRPC: hypothesis-built messages and raw bytes sent to every RPC.

Every field of every request message is drawn from its type (huge, unicode and
control-character strings, NaN and infinities, extreme and negative integers,
unknown enum values, lists at and past every limit, messages past the size
limit), and arbitrary or corrupted bytes go on the wire through a generic
channel. No call may end INTERNAL or UNKNOWN (a server bug), UNAVAILABLE (a
crash) or DEADLINE_EXCEEDED (a hang), and the server must stay healthy.
Run with `-s` to see the counts per method and status code.
"""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Iterator
from functools import cache
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import ROOT, free_port, wait_serving

from conftest import TrainedStore
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import resolve

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
METHODS = [m.name for m in SERVICE.methods]
# Per method: hypothesis-built messages and raw byte strings. 11 methods x 920 > 10,000.
MESSAGES_PER_METHOD = 620
RAW_PER_METHOD = 300
TIMEOUT_S = 30.0
FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}
TALLY: Counter[tuple[str, str, str]] = Counter()  # (method, "message" | "raw", code)

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Values that reach past validation now and then: real ids, codes and names.
KNOWN: list[str] = ["", " ", "DE", "de", "FR", "US", "EUR", "usd", "XXX", "..", "a/b"]


@pytest.fixture(scope="module")
def fuzzed(trained: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`endcap serve` in a process of its own (fuzzing changes the catalog, and the
    server gets a core of its own), with the event log on. Yields its target."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    ds = trained.dataset
    KNOWN.extend(str(i) for i in ds.item_ids[:20])
    KNOWN.extend([*ds.category_names[:10], *ds.brand_names[:5]])
    KNOWN.extend(str(u) for u in ds.user_ids[:5])
    KNOWN.append(resolve(trained.artifacts).name)  # a real version for ReloadModel
    port = free_port()
    env = os.environ | {
        "ENDCAP_EVENT_LOG": str(tmp_path / "events"),
        "ENDCAP_FSYNC": "never",
        "ENDCAP_EXACT_SCAN_MAX_ITEMS": "500",
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "endcap.cli", "serve", "--host", "127.0.0.1"),
                *(
                    "--port",
                    str(port),
                    "--metrics-port",
                    "0",
                    "--artifacts",
                    str(trained.artifacts),
                ),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
        assert proc.poll() is None, f"server died:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def fuzz_channel(fuzzed: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed) as ch:
        yield ch


# Strategies built from the descriptors, so fields added to the proto are fuzzed too.
_CHARS = st.characters(exclude_categories=["Cs"])  # protobuf strings are UTF-8
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_EDGES = [0, 1, -1, 2, 9, 10, 49, 50, 51, 99, 100, 101, 499, 500, 501, 999, 1000, 1001]
_EDGES += [9_999, 10_000, 10_001]


def _strings(huge: bool) -> st.SearchStrategy[str]:
    options = [
        st.text(_CHARS, max_size=12),
        st.sampled_from(KNOWN),
        st.text(st.characters(codec="ascii"), max_size=24),
        st.builds(operator.mul, st.sampled_from(["a", "é", "\x00", "\x7f", "\u2028", "\U0001d518"]),
                  st.sampled_from([2, 3, 64, 127, 128, 129, 255, 256, 257])),
    ]  # fmt: skip
    if huge:  # up to and past the 4 MiB message limit
        options.append(st.builds(operator.mul, st.just("x"), st.integers(5_000, 5_000_000)))
    return st.one_of(*options)


def _numbers(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([v for v in _EDGES if lo <= v <= hi] + [lo, hi]), st.integers(lo, hi)
    )


def _scalar(field: FieldDescriptor, mode: str) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return _strings(mode == "huge")
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, 5e-324]))
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _numbers(*_INT32))  # proto3 enums are open
    if t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return _numbers(*_INT32)
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return _numbers(*_INT64)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _numbers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _numbers(0, 2**64 - 1)
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def _value(field: FieldDescriptor, mode: str) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, mode)
    return _scalar(field, mode)


def _field(field: FieldDescriptor, mode: str) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        return st.dictionaries(_value(key, "element"), _value(value, "element"), max_size=4)
    if not field.is_repeated:
        return _value(field, mode)
    short = st.lists(_value(field, mode), max_size=3)
    if mode in ("normal", "element"):
        return short
    # At, just past and far past every list limit: one value repeated keeps it cheap.
    long = st.builds(
        operator.mul,
        st.lists(_value(field, "element"), min_size=1, max_size=1),
        st.sampled_from([e for e in _EDGES if e > 3] + [20_000]),
    )
    return st.one_of(short, long)


@cache
def messages(desc: Descriptor, mode: str = "normal") -> st.SearchStrategy[Message]:
    """Any message of type `desc`: each field unset or drawn from its type. Modes:
    "normal" (lists of 0..3), "long" (lists at and past their limits), "huge" (also
    megabyte strings), "element" (inside a long list: short lists, short strings)."""
    cls = message_factory.GetMessageClass(desc)
    fields = {f.name: _field(f, mode) for f in desc.fields}

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            field = desc.fields_by_name[name]
            target: Any = getattr(msg, name)
            if isinstance(value, dict):
                target.update(value)
            elif field.is_repeated:
                target.extend(value)
            elif field.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def requests(desc: Descriptor) -> st.SearchStrategy[Message]:
    """Mostly normal messages; one in 8 with long lists, one in 40 with megabyte strings."""
    modes = ["huge"] + ["long"] * 4 + ["normal"] * 35
    return st.sampled_from(modes).flatmap(lambda mode: messages(desc, mode))


def _corrupt(data: bytes, at: int, cut: int, noise: bytes) -> bytes:
    """A serialised message with bytes flipped, spliced in and cut off."""
    if not data:
        return noise
    at %= len(data)
    flipped = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    return (flipped[:at] + noise + flipped[at:])[: max(1, len(flipped) - cut % 8)]


def raw_bytes(desc: Descriptor) -> st.SearchStrategy[bytes]:
    valid = messages(desc, "element").map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=256),
        st.builds(
            _corrupt, valid, st.integers(0, 10_000), st.integers(0, 64), st.binary(max_size=8)
        ),
        st.builds(operator.add, valid, st.binary(min_size=1, max_size=16)),
    )


class Window:
    """Calls in flight, at most `size`: the next payload is generated while the server
    answers the last ones. Codes are tallied as calls settle; forbidden ones collected."""

    def __init__(self, channel: grpc.Channel, size: int = 4) -> None:
        self.channel = channel
        self.size = size
        self.pending: deque[tuple[str, str, Any, grpc.Future[Any]]] = deque()
        self.failures: list[str] = []

    def send(self, method: str, payload: Any, *, raw: bool) -> None:
        md = SERVICE.methods_by_name[method]
        path = f"/{SERVICE.full_name}/{method}"
        kw: dict[str, Any] = {}
        if not raw:
            kw = {
                "request_serializer": _serialize,
                "response_deserializer": message_factory.GetMessageClass(md.output_type).FromString,
            }
        if md.client_streaming:
            call = self.channel.stream_unary(path, **kw).future(iter(payload), timeout=TIMEOUT_S)
        else:
            call = self.channel.unary_unary(path, **kw).future(payload, timeout=TIMEOUT_S)
        self.pending.append((method, "raw" if raw else "message", payload, call))
        while len(self.pending) > self.size:
            self._settle()

    def drain(self) -> None:
        while self.pending:
            self._settle()
        assert not self.failures, "\n".join(self.failures[:5])

    def _settle(self) -> None:
        method, kind, payload, call = self.pending.popleft()
        code = grpc.StatusCode.OK
        try:
            call.result()
        except grpc.RpcError as exc:
            code = exc.code()
            if code in FORBIDDEN:
                self.failures.append(
                    f"{method} -> {code.name}: {exc.details()}\n  payload: {repr(payload)[:2000]}"
                )
        TALLY[(method, kind, code.name)] += 1


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


def _requests(method: str) -> st.SearchStrategy[Any]:
    md = SERVICE.methods_by_name[method]
    one = requests(md.input_type)
    return st.lists(one, max_size=4) if md.client_streaming else one


def _raw(method: str) -> st.SearchStrategy[Any]:
    md = SERVICE.methods_by_name[method]
    one = raw_bytes(md.input_type)
    return st.lists(one, max_size=4) if md.client_streaming else one


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_messages_never_break_the_server(fuzz_channel: grpc.Channel, method: str) -> None:
    window = Window(fuzz_channel)

    @settings(FUZZ, max_examples=MESSAGES_PER_METHOD)
    @given(payload=_requests(method))
    def run(payload: Any) -> None:
        window.send(method, payload, raw=False)

    run()
    window.drain()


@pytest.mark.parametrize("method", METHODS)
def test_raw_bytes_never_break_the_server(fuzz_channel: grpc.Channel, method: str) -> None:
    window = Window(fuzz_channel)

    @settings(FUZZ, max_examples=RAW_PER_METHOD)
    @given(payload=_raw(method))
    def run(payload: Any) -> None:
        window.send(method, payload, raw=True)

    run()
    window.drain()


def test_garbage_is_named_invalid_argument(fuzz_channel: grpc.Channel) -> None:
    for method in METHODS:
        md = SERVICE.methods_by_name[method]
        path = f"/{SERVICE.full_name}/{method}"
        call: Any = (
            fuzz_channel.stream_unary if md.client_streaming else fuzz_channel.unary_unary
        )(path)
        garbage = b"\x0a\x03\xc3\x28\x61"  # a string field that is not UTF-8
        with pytest.raises(grpc.RpcError) as err:
            call(iter([garbage]) if md.client_streaming else garbage, timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert (err.value.details() or "").startswith("malformed request"), method


def test_server_is_healthy_after_the_fuzz(fuzz_channel: grpc.Channel) -> None:
    """Runs last: the server still answers, and the fuzz sent enough requests."""
    health = health_pb2_grpc.HealthStub(fuzz_channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=TIMEOUT_S
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = pb_grpc.RecommenderStub(fuzz_channel).Recommend(
        pb.RecommendRequest(context=pb.RequestContext(country="DE"), num_results=5),
        timeout=TIMEOUT_S,
    )
    assert len(reply.items) == 5
    total = sum(TALLY.values())
    by_code = Counter[str]()
    for (method, kind, code), n in sorted(TALLY.items()):
        by_code[code] += n
        print(f"fuzz {method:>15} {kind:>7} {code:<20} {n:>6}")
    print(f"fuzz total {total}: " + ", ".join(f"{c} {n}" for c, n in by_code.most_common()))
    if {m for m, _, _ in TALLY} != set(METHODS):
        pytest.skip("run the whole module to check the request count")
    assert total >= 10_000
