"""Server interceptors' shared parts: wrap each method's handler once, and rebuild a
grpc method handler around a new behaviour, keeping its kind and codecs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

Behavior = Callable[..., Any]
_SAME: Any = object()


def behavior_of(handler: Handler) -> Behavior:
    """The one behaviour a handler carries, whatever its kind."""
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None, "a method handler without a behaviour"
    return behavior


def rebuild(
    handler: Handler,
    behavior: Behavior,
    *,
    request_deserializer: Callable[[bytes], Any] | None = _SAME,
) -> Handler:
    """A handler of the same kind running `behavior`; the deserializer may be swapped
    (None hands the behaviour raw bytes)."""
    deserializer = (
        handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    )
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (`wrap`) and caches the
    result per method: building a wrapper per call would cost more than the call.
    Unknown methods (no handler) are passed on and not cached."""

    def __init__(self) -> None:
        self._cache: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self.wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler to serve `method` with (`handler` itself to leave it alone)."""
        raise NotImplementedError
