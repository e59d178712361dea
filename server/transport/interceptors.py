"""Server interceptors: per-method request counts and handler latency."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.infra.metrics import Metrics


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every unary call's handler and counts it by method and status code.

    Wrapped handlers are cached per method: building one per call would cost
    more than the recommendation itself.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        name = method.rsplit("/", 1)[-1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._timed(name, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._cache[method] = wrapped
        return wrapped

    def _timed(
        self, name: str, behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        handling = self._metrics.handling.labels(name)
        requests = self._metrics.requests
        ok = requests.labels(name, "OK")

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException:
                code = context.code()
                label = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                requests.labels(name, label).inc()
                raise
            finally:
                handling.observe(time.perf_counter() - start)
            ok.inc()
            return response

        return timed
