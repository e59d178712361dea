"""Redis-backed shared state for several replicas, and the resilient wrapper that
degrades to local state while Redis is down or slow."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

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
    REBASE_S,
    REMOVE_FROM_CART,
    SHORT_TAU_S,
    TRENDING_POOL,
    VIEW,
    MemoryStore,
    decay_weight,
    decayed,
    trending_scores,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


# Adds one segment's popularity events: sums grow as exp((t - epoch) / tau) from the
# segment's epoch (KEYS[3]), which moves to the newest event once that is REBASE_S
# past it, scaling both sorted sets by exp(-shift / tau) in the same step, so every
# replica adds against the same epoch. Then keeps the top 2x capacity of each set.
# KEYS: long set, short set, epoch. ARGV: tau_long, tau_short, rebase_s, keep,
# then (item, weight, ts) per event.
_POPULARITY_ADD = """
local tau_l, tau_s = tonumber(ARGV[1]), tonumber(ARGV[2])
local rebase, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
local newest = nil
for i = 5, #ARGV, 3 do
  local t = tonumber(ARGV[i + 2])
  if newest == nil or t > newest then newest = t end
end
local epoch = tonumber(redis.call('GET', KEYS[3]))
if epoch == nil then
  -- A new segment, or sums an older endcap wrote against a fixed epoch: start over.
  redis.call('DEL', KEYS[1], KEYS[2])
  epoch = newest
  redis.call('SET', KEYS[3], string.format('%.17g', epoch))
elseif newest - epoch > rebase then
  local shift = newest - epoch
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', string.format('%.17g', math.exp(-shift / tau_l)))
  redis.call('ZUNIONSTORE', KEYS[2], 1, KEYS[2], 'WEIGHTS', string.format('%.17g', math.exp(-shift / tau_s)))
  epoch = newest
  redis.call('SET', KEYS[3], string.format('%.17g', epoch))
end
for i = 5, #ARGV, 3 do
  local item, w, t = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  redis.call('ZINCRBY', KEYS[1], string.format('%.17g', w * math.exp((t - epoch) / tau_l)), item)
  redis.call('ZINCRBY', KEYS[2], string.format('%.17g', w * math.exp((t - epoch) / tau_s)), item)
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -keep - 1)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -keep - 1)
return 1
"""


class RedisStore:
    """Profiles as sorted sets (member = item id, score = time) plus a stats hash;
    popularity as sorted sets of decayed sums with a per-segment epoch. One round trip
    per call."""

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
        self._popularity_add = self.client.register_script(_POPULARITY_ADD)

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
        popular: dict[str, list[str | float]] = {}  # segment -> item, weight, ts, ...
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
                    popular.setdefault(seg, []).extend((ev.item_id, weight, ev.ts_s))
        for key in touched:
            for k in (*self._keys(key), self._seen(key)):
                pipe.expire(k, self.ttl_s)
        head = (LONG_TAU_S, SHORT_TAU_S, REBASE_S, 2 * self.popularity_items)
        for seg, triples in popular.items():
            base = f"{self.prefix}pop:{seg}"
            keys = [f"{base}:l", f"{base}:s", f"{base}:epoch"]
            await self._popularity_add(keys=keys, args=[*head, *triples], client=pipe)
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
        pipe = self.client.pipeline(transaction=False)
        pipe.get(f"{base}:epoch")
        size = n if not trending else TRENDING_POOL * n
        pipe.zrevrange(f"{base}:{'s' if trending else 'l'}", 0, size - 1, withscores=True)
        raw_epoch, rows = await pipe.execute()
        if raw_epoch is None or not rows:
            return []
        epoch = float(raw_epoch)
        if not trending:
            long_now = decayed(1.0, now, LONG_TAU_S, epoch)
            return [(m.decode(), float(v) * long_now) for m, v in rows]
        members = [m for m, _ in rows]
        longs = await self.client.zmscore(f"{base}:l", members)
        return trending_scores(
            [m.decode() for m in members],
            [float(v) for _, v in rows],
            [float(lv or 0.0) for lv in longs],
            now,
            epoch,
        )[:n]

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
