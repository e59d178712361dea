"""Server interceptors: per-method request counts and handler latency."""

from __future__ import annotations

import time
from typing import Any

import grpc

from server.infra.metrics import Metrics
from server.transport.handlers import Behavior, Handler, WrappingInterceptor, rebuild


class MetricsInterceptor(WrappingInterceptor):
    """Times every unary call's handler and counts it by method and status code."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return handler
        return rebuild(handler, self._timed(method.rsplit("/", 1)[-1], handler.unary_unary))

    def _timed(self, name: str, behavior: Behavior) -> Behavior:
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
