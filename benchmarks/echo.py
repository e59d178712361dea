"""The transport floor: a grpc.aio server with endcap's service name, options and messages
that answers every call with a canned response captured from the real server.

It parses each request and serialises each response exactly as the real server
does, so what it costs is gRPC + protobuf + asyncio and nothing of endcap's.
Run: python -m benchmarks.echo --port P --responses FILE (JSON: method -> base64).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from endcap.v1 import recommender_pb2 as pb

SERVICE = "endcap.v1.Recommender"
MESSAGES: dict[str, tuple[type[Message], type[Message]]] = {
    "Recommend": (pb.RecommendRequest, pb.RecommendResponse),
    "Rerank": (pb.RerankRequest, pb.RerankResponse),
    "SimilarItems": (pb.SimilarItemsRequest, pb.SimilarItemsResponse),
}


def _handler(response: Message) -> Callable[[Any, Any], Any]:
    async def echo(request: Any, context: Any) -> Message:
        return response

    return echo


async def serve(port: int, responses: dict[str, bytes], max_message_bytes: int) -> None:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    handlers = {}
    for method, (req_cls, resp_cls) in MESSAGES.items():
        resp = resp_cls.FromString(responses.get(method, b""))
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            _handler(resp),
            request_deserializer=req_cls.FromString,
            response_serializer=resp_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    args = parser.parse_args(argv)
    raw = json.loads(args.responses.read_text())
    responses = {m: base64.b64decode(v) for m, v in raw.items()}
    asyncio.run(serve(args.port, responses, args.max_message_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
