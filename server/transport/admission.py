"""Admission control: refuse calls while gRPC's queue stands, bound calls in flight, and
do no work for calls already past their deadline. Health and reflection are never
refused.

Why the deadline. Handlers that compute (search, ranking) run inline on the one
event loop, and grpc.aio accepts one new call per loop turn: offered more than
the loop can compute, the excess waits inside gRPC core, before any Python code
sees it. There, a count of calls in flight stays about one, and the loop's
timer lag stays one handler long whatever the backlog (both measured: see
benchmarks/README.md). What does show the wait is the call's deadline, fixed
when the call arrived: `QueueDelay` reads each call's queueing delay from it and
refuses, CoDel-style, the calls that waited more than a target while a queue
stands, before their request is parsed. The admitted calls are the ones that
did not wait. Calls that wait before gRPC reads them (in the client, in the
socket) do not show, and a refusal is not free in gRPC Python, so well past
capacity much of the excess still times out unseen (README, "Operating endcap").

Handlers that wait (Redis, the event log's fsync, a reload) overlap; for them
`max_in_flight` bounds the number in flight, and the memory they hold. A call
whose client deadline passed while it queued is answered DEADLINE_EXCEEDED
without running.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import grpc

from server.infra.metrics import Metrics
from server.infra.settings import Settings
from server.transport.auth import METHOD_ROLES, PROTECTED
from server.transport.handlers import Behavior, Handler, WrappingInterceptor, behavior_of, rebuild

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_REFS = 4096  # (connection, method) pairs whose freshest deadline is remembered
MIN_CALLS = 8  # calls an interval needs before it can show a standing queue


class QueueDelay:
    """CoDel on each call's queueing delay, read from its deadline.

    gRPC fixes a call's deadline when the call arrives (arrival + the client's
    timeout), so `time_remaining()` when the handler starts is the timeout minus
    the time spent queued. The timeout itself is not sent to handlers: the
    reference is the most time remaining any call of the same method on the same
    connection had over the last `window_s` (a client uses one timeout per
    method; the freshest of its calls waited about nothing). delay = reference -
    remaining.

    Like CoDel, a burst is not a queue: time is cut into `interval_s` windows, and
    the queue stands while most calls of the last window (at least MIN_CALLS,
    and no idle window since) waited more than `target_s`. Then each call that waited more than `target_s` is refused (a
    refusal costs less than an answer, so the backlog shrinks), and calls that
    did not wait are answered. Calls without a deadline are never refused
    here.
    """

    def __init__(self, target_s: float, interval_s: float, window_s: float = 30.0) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.window_s = window_s
        self.dropping = False
        self._window_end = 0.0
        self._above = 0  # calls of this interval that waited more than target_s
        self._calls = 0
        # (peer, method) -> [this window's max remaining, last window's, window start]
        self._refs: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def delay(self, key: tuple[str, str], remaining: float, now: float) -> float:
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [remaining, remaining, now]
            if len(self._refs) > MAX_REFS:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(key)
        if now - ref[2] > self.window_s:  # roll the window: forget stale maxima slowly
            ref[1], ref[0], ref[2] = ref[0], remaining, now
        elif remaining > ref[0]:
            ref[0] = remaining
        return max(ref[0], ref[1]) - remaining

    def refuse(self, delay: float, now: float) -> bool:
        """Whether a call that queued `delay` seconds should be refused."""
        if now >= self._window_end:
            # A queue stands if most calls of the interval that just ended waited, and
            # there were enough of them to call it a queue; an interval without calls
            # in between means the queue emptied.
            recent = now < self._window_end + self.interval_s
            enough = self._calls >= MIN_CALLS
            self.dropping = recent and enough and self._above * 2 > self._calls
            self._above = self._calls = 0
            self._window_end = now + self.interval_s
        self._calls += 1
        if delay <= self.target_s:
            return False
        self._above += 1
        return self.dropping


class AdmissionInterceptor(WrappingInterceptor):
    """Refuses read calls (Recommend, Rerank, SimilarItems, Popular, RecentlyViewed)
    with RESOURCE_EXHAUSTED while gRPC's queue stands (`queue_target_s`, 0 = never),
    any Recommender call beyond `max_in_flight` (0 = no bound), and calls whose
    deadline has passed with DEADLINE_EXCEEDED."""

    def __init__(
        self,
        max_in_flight: int,
        metrics: Metrics,
        *,
        queue_target_s: float = 0.0,
        queue_interval_s: float = 0.1,
    ) -> None:
        super().__init__()
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._metrics = metrics
        self.queue = QueueDelay(queue_target_s, queue_interval_s) if queue_target_s > 0 else None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> AdmissionInterceptor:
        return cls(
            settings.max_in_flight,
            metrics,
            queue_target_s=settings.queue_target_s,
            queue_interval_s=settings.queue_interval_s,
        )

    def wrap(self, method: str, handler: Handler) -> Handler:
        service = method.lstrip("/").rpartition("/")[0]
        if service != PROTECTED or handler.response_streaming:
            return handler
        return rebuild(handler, self._admit(method, behavior_of(handler)))

    def _admit(self, method: str, behavior: Behavior) -> Behavior:
        shed_busy = self._metrics.shed.labels("in_flight")
        shed_queue = self._metrics.shed.labels("queue")
        shed_late = self._metrics.shed.labels("deadline")
        queue_delay = self._metrics.queue_delay
        gauge = self._metrics.in_flight
        # Only reads are refused for queueing: a page renders without them, while
        # events and admin calls (a reload may be what ends the overload) are not
        # worth losing to a busy minute.
        queue = self.queue if METHOD_ROLES.get(method.rpartition("/")[2]) == "read" else None

        async def admitted(request: Any, context: Ctx) -> Any:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                shed_late.inc()
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call started"
                )
            if queue is not None and remaining is not None:
                now = time.monotonic()
                delay = queue.delay((context.peer(), method), remaining, now)
                queue_delay.observe(delay)
                if queue.refuse(delay, now):
                    shed_queue.inc()
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"overloaded: queued {delay * 1000:.0f} ms; retry with backoff",
                    )
            if self.max_in_flight and self.in_flight >= self.max_in_flight:
                shed_busy.inc()
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"overloaded: {self.in_flight} calls in flight; retry with backoff",
                )
            self.in_flight += 1
            gauge.inc()
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1
                gauge.dec()

        return admitted
