"""Admission control: a bound on calls in flight, and no work for calls already past
their deadline. Health and reflection are never refused.

A Recommender call counts as in flight from the moment its handler is entered
until it returns. Beyond `max_in_flight`, a call is answered RESOURCE_EXHAUSTED
at once, before its request is parsed, so a burst costs microseconds per refused
call instead of queueing work nobody will wait for. Calls whose client deadline
has already passed when they reach the handler (they waited in gRPC's queue)
are answered DEADLINE_EXCEEDED without running.

Handlers that wait (Redis, the event log's fsync, a reload) overlap, and this
bound is what keeps their number, and the memory they hold, in check. Handlers
that compute run one at a time on the event loop; when those are offered more
than the loop can do, the excess waits in gRPC's own queue, where the deadline
check above and the servicer's time budget (answer from popularity when little
time is left) keep the loop doing useful work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.infra.metrics import Metrics
from server.transport.auth import PROTECTED
from server.transport.handlers import Behavior, Handler, behavior_of, rebuild

Ctx = grpc.aio.ServicerContext[Any, Any]


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Recommender calls beyond `max_in_flight` (0 = no bound) with
    RESOURCE_EXHAUSTED, and calls whose deadline has passed with DEADLINE_EXCEEDED."""

    def __init__(self, max_in_flight: int, metrics: Metrics) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._metrics = metrics
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
        service = method.lstrip("/").rpartition("/")[0]
        if handler is None or service != PROTECTED or handler.response_streaming:
            return handler
        wrapped = rebuild(handler, self._admit(behavior_of(handler)))
        self._cache[method] = wrapped
        return wrapped

    def _admit(self, behavior: Behavior) -> Behavior:
        shed_busy = self._metrics.shed.labels("in_flight")
        shed_late = self._metrics.shed.labels("deadline")
        gauge = self._metrics.in_flight

        async def admitted(request: Any, context: Ctx) -> Any:
            if self.max_in_flight and self.in_flight >= self.max_in_flight:
                shed_busy.inc()
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"overloaded: {self.in_flight} calls in flight; retry with backoff",
                )
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                shed_late.inc()
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call started"
                )
            self.in_flight += 1
            gauge.inc()
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1
                gauge.dec()

        return admitted
