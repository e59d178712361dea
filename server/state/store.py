"""Real-time shopper state and live popularity behind one interface, in memory or in Redis.

A shopper is keyed "u:<user_id>" (logged in) or "s:<session_id>" (anonymous).
Profiles hold item ids (strings), not catalog rows, so they survive model
reloads and catalog changes.

Popularity uses exponentially decayed counts without touching old entries:
an event at time t adds w * exp((t - epoch) / tau); ranking by the stored sums
is ranking by decayed counts. Two horizons: bestsellers (days) and trending
(hours, compared with the long horizon).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.domain.query import Profile, StateEvent, key_hash

# Event kinds the state layer understands (mirrors Event.Type in the proto).
VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE = 1, 2, 3, 4
IMPRESSION, CLICK = 6, 7  # RECOMMENDATION_IMPRESSION, RECOMMENDATION_CLICK
# Engaging with an item resets its impression count (exposure caps).
ENGAGEMENTS = frozenset({CLICK, ADD_TO_CART, PURCHASE})
# Impression counts kept per shopper: past this, the least-shown items are dropped.
EXPOSURE_ITEMS = 200
# Impressions fade with this time constant: a week-old one counts e^-1, so an item
# demoted long ago gets another chance and fresh items are never crowded out.
EXPOSURE_TAU_S = 7 * 86_400.0
# How much an event says about what a segment wants.
POPULARITY_WEIGHTS = {VIEW: 1.0, ADD_TO_CART: 3.0, PURCHASE: 5.0}
LONG_TAU_S = 3 * 86_400.0
SHORT_TAU_S = 3_600.0
# Stored sums are relative to this epoch; far-future events would overflow a
# double after ~700 tau, so the epoch is moved (and sums rescaled) long before.
_EPOCH_S = 1_767_225_600.0  # 2026-01-01


def decay_weight(weight: float, ts_s: float, tau_s: float) -> float:
    return weight * math.exp(min((ts_s - _EPOCH_S) / tau_s, 600.0))


class StateStore(Protocol):
    """The interface both backends implement. All methods are coroutines."""

    async def apply(self, events: Sequence[StateEvent]) -> None: ...

    async def profile(self, key: str) -> Profile: ...

    async def forget(self, key: str) -> int:
        """Drop the shopper's state and remember (by hash) that they were forgotten."""
        ...

    async def mark_forgotten(self, hashes: Iterable[bytes]) -> None:
        """Remember shoppers forgotten earlier (tombstones read from the event log)."""
        ...

    async def top(self, segment: str, n: int, trending: bool) -> list[tuple[str, float]]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _MutableProfile:
    recent: OrderedDict[str, float] = field(default_factory=OrderedDict)
    cart: OrderedDict[str, None] = field(default_factory=OrderedDict)
    purchased: OrderedDict[str, None] = field(default_factory=OrderedDict)
    orders: int = 0
    monetary: float = 0.0
    first_seen_s: float = 0.0
    last_purchase_s: float = 0.0
    touched_s: float = 0.0
    seen: dict[str, float] = field(default_factory=dict)  # item -> decayed impressions


class _Counter:
    """Heavy-hitter decayed counts for one segment, bounded to `capacity` items."""

    __slots__ = ("capacity", "long", "short")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.long: dict[str, float] = {}
        self.short: dict[str, float] = {}

    def add(self, item: str, weight: float, ts_s: float) -> None:
        self.long[item] = self.long.get(item, 0.0) + decay_weight(weight, ts_s, LONG_TAU_S)
        self.short[item] = self.short.get(item, 0.0) + decay_weight(weight, ts_s, SHORT_TAU_S)
        if len(self.long) > 2 * self.capacity:
            keep = heapq.nlargest(self.capacity, self.long.items(), key=lambda kv: kv[1])
            self.long = dict(keep)
            self.short = {k: self.short[k] for k in self.long}

    def top(self, n: int, trending: bool, now_s: float) -> list[tuple[str, float]]:
        if not trending:
            scale = decay_weight(1.0, now_s, LONG_TAU_S)
            best = heapq.nlargest(n, self.long.items(), key=lambda kv: kv[1])
            return [(k, v / scale) for k, v in best]
        # Trending: short-horizon count over a smoothed long-horizon rate.
        s_scale = decay_weight(1.0, now_s, SHORT_TAU_S)
        l_scale = decay_weight(1.0, now_s, LONG_TAU_S)
        ratio = SHORT_TAU_S / LONG_TAU_S
        scored = (
            (k, (v / s_scale) / (ratio * self.long[k] / l_scale + 1.0))
            for k, v in self.short.items()
        )
        return heapq.nlargest(n, scored, key=lambda kv: kv[1])


class MemoryStore:
    """Embedded state: LRU-bounded profiles with idle TTL, bounded popularity counters."""

    def __init__(
        self,
        *,
        max_profiles: int = 1_000_000,
        ttl_s: float = 30 * 86_400.0,
        recent_items: int = 50,
        popularity_items: int = 5_000,
    ) -> None:
        self.max_profiles = max_profiles
        self.ttl_s = ttl_s
        self.recent_items = recent_items
        self.popularity_items = popularity_items
        self._profiles: OrderedDict[str, _MutableProfile] = OrderedDict()
        self._counters: dict[str, _Counter] = {}
        self._forgotten: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._profiles)

    async def apply(self, events: Sequence[StateEvent]) -> None:
        now = time.time()
        for ev in events:
            p = self._profiles.get(ev.key)
            if p is None:
                p = _MutableProfile(first_seen_s=ev.ts_s)
                self._profiles[ev.key] = p
                if len(self._profiles) > self.max_profiles:
                    self._profiles.popitem(last=False)
            else:
                self._profiles.move_to_end(ev.key)
            p.touched_s = now
            _apply_one(p, ev, self.recent_items)
            weight = POPULARITY_WEIGHTS.get(ev.kind)
            if weight:
                for seg in ev.segments:
                    counter = self._counters.get(seg)
                    if counter is None:
                        counter = self._counters[seg] = _Counter(self.popularity_items)
                    counter.add(ev.item_id, weight, ev.ts_s)

    async def profile(self, key: str) -> Profile:
        forgotten = bool(self._forgotten) and key_hash(key) in self._forgotten
        p = self._profiles.get(key)
        if p is None or time.time() - p.touched_s > self.ttl_s:
            if p is not None:
                del self._profiles[key]
            return Profile(forgotten=forgotten)
        return _freeze(p, forgotten, time.time())

    async def forget(self, key: str) -> int:
        self._forgotten.add(key_hash(key))
        p = self._profiles.pop(key, None)
        if p is None:
            return 0
        return len(p.recent) + len(p.cart) + len(p.purchased) + len(p.seen) + 1

    async def mark_forgotten(self, hashes: Iterable[bytes]) -> None:
        self._forgotten.update(hashes)

    async def top(self, segment: str, n: int, trending: bool) -> list[tuple[str, float]]:
        counter = self._counters.get(segment)
        return counter.top(n, trending, time.time()) if counter else []

    async def close(self) -> None:
        return None


def _apply_one(p: _MutableProfile, ev: StateEvent, recent_items: int) -> None:
    if ev.kind == IMPRESSION and ev.item_id:
        weight = decay_weight(1.0, ev.ts_s, EXPOSURE_TAU_S)
        p.seen[ev.item_id] = p.seen.get(ev.item_id, 0.0) + weight
        if len(p.seen) > 2 * EXPOSURE_ITEMS:
            p.seen = dict(heapq.nlargest(EXPOSURE_ITEMS, p.seen.items(), key=lambda kv: kv[1]))
    elif ev.kind in ENGAGEMENTS:
        p.seen.pop(ev.item_id, None)
    if ev.kind in (VIEW, ADD_TO_CART, PURCHASE):
        p.recent.pop(ev.item_id, None)
        p.recent[ev.item_id] = ev.ts_s
        while len(p.recent) > recent_items:
            p.recent.popitem(last=False)
    if ev.kind == ADD_TO_CART:
        p.cart[ev.item_id] = None
    elif ev.kind == REMOVE_FROM_CART:
        p.cart.pop(ev.item_id, None)
    elif ev.kind == PURCHASE:
        p.cart.pop(ev.item_id, None)
        p.purchased.pop(ev.item_id, None)
        p.purchased[ev.item_id] = None
        p.orders += 1
        p.monetary += ev.value
        p.last_purchase_s = max(p.last_purchase_s, ev.ts_s)


def _freeze(p: _MutableProfile, forgotten: bool, now_s: float) -> Profile:
    scale = decay_weight(1.0, now_s, EXPOSURE_TAU_S)
    return Profile(
        recent=tuple(reversed(p.recent.items())),
        cart=tuple(reversed(p.cart)),
        purchased=tuple(reversed(p.purchased)),
        orders=p.orders,
        monetary=p.monetary,
        first_seen_s=p.first_seen_s,
        last_purchase_s=p.last_purchase_s,
        forgotten=forgotten,
        exposures=tuple((item, v / scale) for item, v in p.seen.items()),
    )
