"""Live catalog changes shared by every replica through one Redis stream, applied in
the stream's order everywhere.

UpsertItems and DeleteItems on any replica append the validated change to the
stream (XADD) and answer once their own replica has applied it; every replica
(the writer included) reads the stream (XREAD) and applies each change in
stream order, so two replicas never disagree about an item's price, stock or
countries, and a change is honoured by the next request on the replica that
acknowledged it. A replica that starts (or restarts) replays the stream before
it reports SERVING. The stream is capped (XADD MAXLEN ~) at `max_batches`
batches: the next retrain folds older changes into the artifact, so a replica
only ever needs the recent ones.

While Redis is unreachable, writes fail with FeedUnavailable (the caller's
change is not applied anywhere, so it can retry: nothing diverges) and reads
retry with backoff; when Redis returns, each replica resumes after the last
entry it applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.domain.catalog import ItemUpdate

log = logging.getLogger(__name__)

Change = tuple[str, ItemUpdate | str]  # ("upsert", item) | ("delete", item_id)
Apply = Callable[[Sequence[Change]], Awaitable[Any]]
FORMAT = 1
_FIELDS = tuple(f.name for f in dataclasses.fields(ItemUpdate))


class FeedUnavailable(Exception):
    """The stream could not be written: the change was applied nowhere."""


def encode(changes: Sequence[Change]) -> bytes:
    rows: list[Any] = []
    for kind, entry in changes:
        if kind == "upsert" and isinstance(entry, ItemUpdate):
            rows.append(["u", [getattr(entry, f) for f in _FIELDS]])
        elif kind == "delete" and isinstance(entry, str):
            rows.append(["d", entry])
        else:
            raise ValueError(f"not a catalog change: {kind!r}")
    return json.dumps({"v": FORMAT, "changes": rows}, separators=(",", ":")).encode()


def decode(raw: bytes) -> list[Change]:
    doc = json.loads(raw)
    if doc.get("v") != FORMAT:
        raise ValueError(f"catalog feed format {doc.get('v')!r}, this server reads {FORMAT}")
    out: list[Change] = []
    for tag, body in doc["changes"]:
        if tag == "u":
            values = dict(zip(_FIELDS, body, strict=True))
            values["countries"] = tuple(values["countries"])
            out.append(("upsert", ItemUpdate(**values)))
        else:
            out.append(("delete", str(body)))
    return out


class CatalogFeed:
    """One replica's end of the shared catalog stream."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = "endcap:catalog",
        max_batches: int = 10_000,
        timeout_s: float = 1.0,
        block_ms: int = 1_000,
        on_behind: Callable[[bool], None] | None = None,
    ) -> None:
        # Reads block for up to block_ms: their socket timeout must outlast that.
        self._writer: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._reader: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s + block_ms / 1000, socket_connect_timeout=timeout_s
        )
        self.stream = stream
        self.max_batches = max_batches
        self.block_ms = block_ms
        self.origin = uuid.uuid4().hex[:12]
        self.last_id = b"0-0"  # the last entry applied here
        self.applied = 0
        self._waiting: dict[bytes, asyncio.Future[Any]] = {}
        self._early: dict[bytes, Any] = {}  # own entries applied before publish() awaited
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.healthy = True
        self._on_behind = on_behind or (lambda behind: None)

    async def publish(self, changes: Sequence[Change]) -> Any:
        """Append `changes` and wait until this replica has applied them; returns what
        the apply function returned for them. Raises FeedUnavailable."""
        try:
            added: bytes | str = await self._writer.xadd(
                self.stream,
                {"origin": self.origin, "changes": encode(changes)},
                maxlen=self.max_batches,
                approximate=True,
            )
        except (RedisError, OSError) as exc:
            raise FeedUnavailable(f"catalog feed (Redis) unavailable: {exc}") from exc
        entry_id = added.encode() if isinstance(added, str) else added
        if entry_id in self._early:  # the follower was quicker than this reply
            early = self._early.pop(entry_id)
            if isinstance(early, Exception):
                raise early
            return early
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting[entry_id] = done
        try:
            return await done
        finally:
            self._waiting.pop(entry_id, None)

    async def catch_up(self, apply: Apply) -> int:
        """Apply every entry after the last one applied here, without blocking; the
        number of batches applied."""
        n = 0
        while True:
            batch = await self._reader.xread({self.stream: self.last_id}, count=64)
            if not batch:
                return n
            n += await self._apply_all(batch, apply)

    def follow(self, apply: Apply) -> None:
        """Keep applying new entries in a background task until close()."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._follow(apply))

    async def _follow(self, apply: Apply) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                batch = await self._reader.xread(
                    {self.stream: self.last_id}, count=64, block=self.block_ms
                )
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                if self.healthy:
                    log.warning("catalog feed: Redis unreachable, retrying: %s", exc)
                    self._on_behind(True)
                self.healthy = False
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            if not self.healthy:
                log.info("catalog feed: Redis back, resuming after %s", self.last_id.decode())
                self._on_behind(False)
            self.healthy, backoff = True, 0.05
            if batch:
                await self._apply_all(batch, apply)

    async def _apply_all(self, batch: Any, apply: Apply) -> int:
        n = 0
        for _stream, entries in batch:
            for entry_id, fields in entries:
                result: Any = None
                failed: Exception | None = None
                try:
                    result = await apply(decode(fields[b"changes"]))
                except ValueError as exc:  # a newer server's format: skip, say so
                    log.error("catalog feed entry %s skipped: %s", entry_id.decode(), exc)
                except Exception as exc:  # a bug here must not stop every later change
                    log.exception("catalog feed entry %s failed to apply", entry_id.decode())
                    failed = exc
                self.last_id = entry_id
                self.applied += 1
                n += 1
                waiter = self._waiting.get(entry_id)
                if waiter is not None:
                    if not waiter.done():
                        if failed is None:
                            waiter.set_result(result)
                        else:
                            waiter.set_exception(failed)
                elif fields.get(b"origin") == self.origin.encode():
                    self._early[entry_id] = result if failed is None else failed
                    if len(self._early) > 1024:  # callers that gave up (deadline)
                        self._early.pop(next(iter(self._early)))
        return n

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            # A blocked XREAD can swallow the cancellation (redis-py): the flag ends
            # the loop once the read returns, within block_ms.
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.block_ms / 1000 + 1.0)
            if not self._task.done():
                log.warning("catalog feed: follower still reading at shutdown")
            self._task = None
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(FeedUnavailable("server shutting down"))
        await self._writer.aclose()
        await self._reader.aclose()
