"""Durable event log: append-only segment files of CRC-framed LogRecords.

Delivery guarantee: with fsync="always", TrackEvents acknowledges a batch only
after its records are written and fsync'd, so an acknowledged event survives a
crash (kill -9, power loss). With "interval", records are fsync'd at least every
`fsync_interval_s` (a crash may lose that window); with "never", the OS
decides. Writes from concurrent requests are group-committed: one fsync
covers every batch queued while the previous one ran.

Frame: u32 LE payload length, u32 LE crc32(payload), payload (LogRecord). A
torn frame at the end of the newest segment (crash mid-write) is ignored on
read and truncated when the log reopens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from endcap.v1 import eventlog_pb2, recommender_pb2
from server.domain.query import key_hash, shopper_key

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_SEGMENT_GLOB = "events-*.log"
FSYNC_POLICIES = ("always", "interval", "never")


def shopper_hash(user_id: str, session_id: str) -> bytes:
    """SHA-256 of the shopper key, what tombstones store instead of the id."""
    return key_hash(shopper_key(user_id, session_id))


def _frame(record: eventlog_pb2.LogRecord) -> bytes:
    payload = record.SerializeToString()
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _segment_name(seq: int) -> str:
    return f"events-{seq:012d}.log"


@dataclass(frozen=True, slots=True)
class ReadStats:
    records: int
    events: int
    tombstones: int
    dead_events: int  # events of forgotten shoppers, skipped
    torn_bytes: int  # bytes of an incomplete final frame, ignored


def _frames(path: Path) -> Iterator[tuple[int, eventlog_pb2.LogRecord | None]]:
    """(end offset, record) per intact frame; a final (None) marks a torn tail."""
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if pos + _HEADER.size > len(data):
            yield pos, None
            return
        length, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            yield pos, None
            return
        record = eventlog_pb2.LogRecord()
        record.ParseFromString(data[start:end])
        pos = end
        yield pos, record


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(_SEGMENT_GLOB))


def read_tombstones(directory: Path) -> dict[bytes, int]:
    """Forgotten shopper hash -> latest tombstone time (unix ms)."""
    dead: dict[bytes, int] = {}
    for path in segments(directory):
        for _, record in _frames(path):
            if record is not None and record.WhichOneof("record") == "forget":
                key = record.forget.shopper_sha256
                dead[key] = max(dead.get(key, 0), record.received_unix_ms)
    return dead


def read_events(directory: Path) -> tuple[list[eventlog_pb2.LogRecord], ReadStats]:
    """Every live event (tombstoned ones removed), in log order, with counts."""
    dead = read_tombstones(directory)
    out: list[eventlog_pb2.LogRecord] = []
    records = events = tombstones = dead_events = torn = 0
    for path in segments(directory):
        size = path.stat().st_size
        for end, record in _frames(path):
            if record is None:
                torn += size - end
                break
            records += 1
            if record.WhichOneof("record") == "forget":
                tombstones += 1
                continue
            events += 1
            ctx = record.event.context
            cutoff = dead.get(shopper_hash(ctx.user_id, ctx.session_id))
            if cutoff is not None and record.received_unix_ms <= cutoff:
                dead_events += 1
                continue
            out.append(record)
    return out, ReadStats(records, events, tombstones, dead_events, torn)


class EventLog:
    """Append-only, group-committed, segment-rotated log. One writer thread."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: str = "always",
        fsync_interval_s: float = 0.05,
        segment_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.directory = directory
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(directory, os.O_RDONLY)
        self._open_tail()
        self.forgotten = read_tombstones(directory)
        self._queue: queue.Queue[tuple[bytes, Future[None]] | None] = queue.Queue()
        self._last_sync = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="endcap-eventlog", daemon=True)
        self._thread.start()

    def _open_tail(self) -> None:
        existing = segments(self.directory)
        if existing:
            tail = existing[-1]
            self._seq = int(tail.stem.split("-")[1])
            good = 0
            for end, record in _frames(tail):
                if record is None:
                    break
                good = end
            if good < tail.stat().st_size:
                log.warning(
                    "event log %s: truncating a torn tail of %d bytes (crash mid-write)",
                    tail.name,
                    tail.stat().st_size - good,
                )
                os.truncate(tail, good)
        else:
            self._seq = 0
        self._file = open(self.directory / _segment_name(self._seq), "ab")  # noqa: SIM115
        self._size = self._file.tell()
        os.fsync(self._dir_fd)

    def _rotate(self) -> None:
        self._sync()
        self._file.close()
        self._seq += 1
        self._file = open(self.directory / _segment_name(self._seq), "ab")  # noqa: SIM115
        self._size = 0
        os.fsync(self._dir_fd)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            waiters: list[Future[None]] = []
            stop = False
            try:
                for entry in batch:
                    if entry is None:
                        stop = True
                        continue
                    data, fut = entry
                    if self._size and self._size + len(data) > self.segment_bytes:
                        self._rotate()
                    self._file.write(data)
                    self._size += len(data)
                    waiters.append(fut)
                if self.fsync == "always" or stop:
                    self._sync()
                elif self.fsync == "interval":
                    if time.monotonic() - self._last_sync >= self.fsync_interval_s:
                        self._sync()
                    else:
                        self._file.flush()
                else:
                    self._file.flush()
            except OSError as exc:
                log.error("event log write failed: %s", exc)
                for fut in waiters:
                    fut.set_exception(exc)
                waiters = []
            for fut in waiters:
                fut.set_result(None)
            if stop:
                self._file.close()
                return

    async def append(self, records: Sequence[eventlog_pb2.LogRecord]) -> None:
        """Write records; returns once they are as durable as the fsync policy promises."""
        if not records:
            return
        fut: Future[None] = Future()
        self._queue.put((b"".join(_frame(r) for r in records), fut))
        await asyncio.wrap_future(fut)

    async def append_events(self, events: Sequence[recommender_pb2.Event], now_ms: int) -> None:
        await self.append(
            [eventlog_pb2.LogRecord(event=e, received_unix_ms=now_ms) for e in events]
        )

    async def forget(self, user_id: str, session_id: str, now_ms: int) -> int:
        """Tombstone a shopper; returns how many of their logged events it covers."""
        key = shopper_hash(user_id, session_id)
        await self.append(
            [
                eventlog_pb2.LogRecord(
                    forget=eventlog_pb2.Forget(shopper_sha256=key), received_unix_ms=now_ms
                )
            ]
        )
        previous = self.forgotten.get(key, -1)
        self.forgotten[key] = now_ms
        return await asyncio.get_running_loop().run_in_executor(
            None, self._count_events, key, previous, now_ms
        )

    def _count_events(self, key: bytes, after_ms: int, until_ms: int) -> int:
        count = 0
        for path in segments(self.directory):
            for _, record in _frames(path):
                if record is None or record.WhichOneof("record") != "event":
                    continue
                ctx = record.event.context
                if (
                    after_ms < record.received_unix_ms <= until_ms
                    and shopper_hash(ctx.user_id, ctx.session_id) == key
                ):
                    count += 1
        return count

    def compact(self) -> int:
        """Rewrite closed segments without tombstoned events; returns events removed.

        The open (newest) segment is left alone; call again after it rotates.
        """
        removed = 0
        closed = segments(self.directory)[:-1]
        dead = read_tombstones(self.directory)
        for path in closed:
            keep: list[bytes] = []
            dropped = 0
            for _, record in _frames(path):
                if record is None:
                    break
                if record.WhichOneof("record") == "event":
                    ctx = record.event.context
                    cutoff = dead.get(shopper_hash(ctx.user_id, ctx.session_id))
                    if cutoff is not None and record.received_unix_ms <= cutoff:
                        dropped += 1
                        continue
                keep.append(_frame(record))
            if dropped:
                tmp = path.with_suffix(".compact")
                with open(tmp, "wb") as fh:
                    fh.write(b"".join(keep))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
                os.fsync(self._dir_fd)
                removed += dropped
        return removed

    def close(self) -> None:
        """Flush, fsync and stop the writer (graceful shutdown)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        os.close(self._dir_fd)
