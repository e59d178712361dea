"""Request decoding at the edge: malformed bytes are INVALID_ARGUMENT, not UNKNOWN.

grpc turns an exception in a request deserializer into UNKNOWN ("Unexpected
DecodeError") before any handler runs. This interceptor hands the behaviour
raw bytes instead and parses them itself, so a client that sends garbage (or a
string that is not UTF-8) gets INVALID_ARGUMENT like any other bad request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.transport.handlers import Behavior, Handler, WrappingInterceptor, behavior_of, rebuild

Ctx = grpc.aio.ServicerContext[Any, Any]


class DecodeInterceptor(WrappingInterceptor):
    """Parses requests of unary-response methods (every Recommender RPC) in the handler.

    Response-streaming methods (health Watch, reflection) keep grpc's own decoding.
    """

    def wrap(self, method: str, handler: Handler) -> Handler:
        parse = handler.request_deserializer
        if parse is None or handler.response_streaming:
            return handler
        wrap = _stream if handler.request_streaming else _unary
        return rebuild(handler, wrap(parse, behavior_of(handler)), request_deserializer=None)


async def _decode(parse: Callable[[bytes], Any], raw: bytes, context: Ctx) -> Any:
    try:
        return parse(raw)
    except (DecodeError, ValueError) as exc:
        # The message names the type and nothing of the payload.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")


def _unary(parse: Callable[[bytes], Any], behavior: Behavior) -> Behavior:
    async def decoded(raw: bytes, context: Ctx) -> Any:
        return await behavior(await _decode(parse, raw, context), context)

    return decoded


def _stream(parse: Callable[[bytes], Any], behavior: Behavior) -> Behavior:
    async def decoded(raw_iterator: AsyncIterator[bytes], context: Ctx) -> Any:
        async def requests() -> AsyncIterator[Any]:
            async for raw in raw_iterator:
                yield await _decode(parse, raw, context)

        return await behavior(requests(), context)

    return decoded
