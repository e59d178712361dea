"""Redis-backed shared state for several replicas, and the resilient wrapper that
degrades to local state while Redis is down or slow."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.domain.query import Profile, StateEvent, key_hash
from server.state.store import (
    ADD_TO_CART,
    ENGAGEMENTS,
    EXPOSURE_ITEMS,
    EXPOSURE_TAU_S,
    IMPRESSION,
    LONG_TAU_S,
    POPULARITY_WEIGHTS,
    PURCHASE,
    REMOVE_FROM_CART,
    SHORT_TAU_S,
    VIEW,
    MemoryStore,
    decay_weight,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisStore:
    """Profiles as sorted sets (member = item id, score = time) plus a stats hash;
    popularity as sorted sets of decayed sums. One round trip per call."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "endcap:",
        ttl_s: float = 30 * 86_400.0,
        recent_items: int = 50,
        popularity_items: int = 5_000,
        timeout_s: float = 0.05,
    ) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.recent_items = recent_items
        self.popularity_items = popularity_items

    def _keys(self, key: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}p:{key}"
        return f"{base}:recent", f"{base}:cart", f"{base}:purchased", f"{base}:stats"

    def _seen(self, key: str) -> str:
        """Sorted set: item -> impressions since the shopper last engaged with it, each
        weighted as popularity is (decay_weight), so ranks drop old, rare ones first."""
        return f"{self.prefix}p:{key}:seen"

    async def apply(self, events: Sequence[StateEvent]) -> None:
        pipe = self.client.pipeline(transaction=False)
        touched: set[str] = set()
        pop_keys: set[str] = set()
        for ev in events:
            recent, cart, purchased, stats = self._keys(ev.key)
            touched.add(ev.key)
            pipe.hsetnx(stats, "first_seen_s", ev.ts_s)
            if ev.kind in (VIEW, ADD_TO_CART, PURCHASE):
                pipe.zadd(recent, {ev.item_id: ev.ts_s})
                pipe.zremrangebyrank(recent, 0, -self.recent_items - 1)
            if ev.kind == IMPRESSION and ev.item_id:
                shown = decay_weight(1.0, ev.ts_s, EXPOSURE_TAU_S)
                pipe.zincrby(self._seen(ev.key), shown, ev.item_id)
                pipe.zremrangebyrank(self._seen(ev.key), 0, -2 * EXPOSURE_ITEMS - 1)
            elif ev.kind in ENGAGEMENTS:
                pipe.zrem(self._seen(ev.key), ev.item_id)
            if ev.kind == ADD_TO_CART:
                pipe.zadd(cart, {ev.item_id: ev.ts_s})
            elif ev.kind == REMOVE_FROM_CART:
                pipe.zrem(cart, ev.item_id)
            elif ev.kind == PURCHASE:
                pipe.zrem(cart, ev.item_id)
                pipe.zadd(purchased, {ev.item_id: ev.ts_s})
                pipe.hincrby(stats, "orders", 1)
                pipe.hincrbyfloat(stats, "monetary", ev.value)
                pipe.hset(stats, "last_purchase_s", ev.ts_s)
            weight = POPULARITY_WEIGHTS.get(ev.kind)
            if weight:
                for seg in ev.segments:
                    base = f"{self.prefix}pop:{seg}"
                    pipe.zincrby(f"{base}:l", decay_weight(weight, ev.ts_s, LONG_TAU_S), ev.item_id)
                    pipe.zincrby(
                        f"{base}:s", decay_weight(weight, ev.ts_s, SHORT_TAU_S), ev.item_id
                    )
                    pop_keys.add(base)
        for key in touched:
            for k in (*self._keys(key), self._seen(key)):
                pipe.expire(k, self.ttl_s)
        for base in pop_keys:
            # Bound each segment: drop all but the top 2x capacity.
            pipe.zremrangebyrank(f"{base}:l", 0, -2 * self.popularity_items - 1)
            pipe.zremrangebyrank(f"{base}:s", 0, -2 * self.popularity_items - 1)
        await pipe.execute()

    async def profile(self, key: str) -> Profile:
        recent, cart, purchased, stats = self._keys(key)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(recent, 0, -1, withscores=True)
        pipe.zrevrange(cart, 0, -1)
        pipe.zrevrange(purchased, 0, -1)
        pipe.hgetall(stats)
        pipe.sismember(f"{self.prefix}forgotten", key_hash(key).hex())
        pipe.zrange(self._seen(key), 0, -1, withscores=True)
        r, c, p, s, forgotten, seen = await pipe.execute()
        st = {k.decode(): float(v) for k, v in s.items()}
        scale = decay_weight(1.0, time.time(), EXPOSURE_TAU_S)
        return Profile(
            recent=tuple((m.decode(), float(ts)) for m, ts in r),
            cart=tuple(m.decode() for m in c),
            purchased=tuple(m.decode() for m in p),
            orders=int(st.get("orders", 0)),
            monetary=st.get("monetary", 0.0),
            first_seen_s=st.get("first_seen_s", 0.0),
            last_purchase_s=st.get("last_purchase_s", 0.0),
            forgotten=bool(forgotten),
            exposures=tuple((m.decode(), float(n) / scale) for m, n in seen),
        )

    async def forget(self, key: str) -> int:
        keys = self._keys(key)
        pipe = self.client.pipeline(transaction=True)
        for k in (*keys[:3], self._seen(key)):
            pipe.zcard(k)
        pipe.exists(keys[3])
        pipe.delete(*keys, self._seen(key))
        pipe.sadd(f"{self.prefix}forgotten", key_hash(key).hex())
        *counts, _, _ = await pipe.execute()
        return int(sum(counts))

    async def mark_forgotten(self, hashes: Iterable[bytes]) -> None:
        members = [h.hex() for h in hashes]
        if members:
            await self.client.sadd(f"{self.prefix}forgotten", *members)

    async def top(self, segment: str, n: int, trending: bool) -> list[tuple[str, float]]:
        base = f"{self.prefix}pop:{segment}"
        now = time.time()
        if not trending:
            rows: Any = await self.client.zrevrange(f"{base}:l", 0, n - 1, withscores=True)
            scale = decay_weight(1.0, now, LONG_TAU_S)
            return [(m.decode(), float(v) / scale) for m, v in rows]
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(f"{base}:s", 0, 4 * n - 1, withscores=True)
        short_rows = (await pipe.execute())[0]
        if not short_rows:
            return []
        members = [m for m, _ in short_rows]
        longs = await self.client.zmscore(f"{base}:l", members)
        s_scale = decay_weight(1.0, now, SHORT_TAU_S)
        l_scale = decay_weight(1.0, now, LONG_TAU_S)
        ratio = SHORT_TAU_S / LONG_TAU_S
        scored = [
            (m.decode(), (float(v) / s_scale) / (ratio * float(lv or 0.0) / l_scale + 1.0))
            for (m, v), lv in zip(short_rows, longs, strict=True)
        ]
        scored.sort(key=lambda kv: -kv[1])
        return scored[:n]

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class ResilientStore:
    """Redis first; while it fails or is slow, local memory. Writes go to both, so
    local state is warm when Redis drops; Redis is retried after `retry_s`."""

    def __init__(
        self,
        primary: RedisStore,
        local: MemoryStore,
        *,
        timeout_s: float = 0.05,
        retry_s: float = 1.0,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        self.primary = primary
        self.local = local
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._down_until = 0.0
        self._on_degraded = on_degraded or (lambda _: None)
        self.degraded = False
        # Forgets that could not reach Redis: replayed as soon as it answers again,
        # so a shopper forgotten during an outage does not come back with it.
        self._pending_forgets: set[str] = set()

    def _mark(self, degraded: bool, exc: BaseException | None = None) -> None:
        if degraded and not self.degraded:
            log.warning("redis unavailable (%s): serving from local state", type(exc).__name__)
        elif not degraded and self.degraded:
            log.info("redis is back: serving shared state again")
        self.degraded = degraded
        self._on_degraded(degraded)

    async def _try(self, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        if time.monotonic() < self._down_until:
            return False, None
        try:
            result = await asyncio.wait_for(call(), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self.retry_s
            self._mark(True, exc)
            return False, None
        if self.degraded:
            self._mark(False)
        if self._pending_forgets:
            pending, self._pending_forgets = self._pending_forgets, set()
            for key in pending:
                try:
                    await asyncio.wait_for(self.primary.forget(key), self.timeout_s)
                except (RedisError, OSError, TimeoutError):
                    self._pending_forgets.add(key)
        return True, result

    async def apply(self, events: Sequence[StateEvent]) -> None:
        await self.local.apply(events)
        await self._try(lambda: self.primary.apply(events))

    async def profile(self, key: str) -> Profile:
        ok, result = await self._try(lambda: self.primary.profile(key))
        if ok and result is not None:
            return result
        return await self.local.profile(key)

    async def forget(self, key: str) -> int:
        local = await self.local.forget(key)
        ok, result = await self._try(lambda: self.primary.forget(key))
        if not ok:
            self._pending_forgets.add(key)
            return local
        return max(local, int(result or 0))

    async def mark_forgotten(self, hashes: Iterable[bytes]) -> None:
        hashes = list(hashes)
        await self.local.mark_forgotten(hashes)
        await self._try(lambda: self.primary.mark_forgotten(hashes))

    async def top(self, segment: str, n: int, trending: bool) -> list[tuple[str, float]]:
        ok, result = await self._try(lambda: self.primary.top(segment, n, trending))
        if ok and result is not None:
            return result
        return await self.local.top(segment, n, trending)

    async def close(self) -> None:
        await self.primary.close()
