"""Real-time shopper state and live popularity behind one interface, in memory or in Redis.

A shopper is keyed "u:<user_id>" (logged in) or "s:<session_id>" (anonymous).
Profiles hold item ids (strings), not catalog rows, so they survive model
reloads and catalog changes.

Popularity uses exponentially decayed counts without touching old entries:
an event at time t adds w * exp((t - epoch) / tau); ranking by the stored sums
is ranking by decayed counts. Two horizons: bestsellers (days) and trending
(hours, compared with the long horizon). Each segment keeps its own epoch and
moves it to its newest event every REBASE_S, scaling its sums by
exp(-shift / tau) (ranks and ratios unchanged): exp overflows a double past
709, which the one-hour horizon would reach 30 days after a fixed epoch.
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
# Exposure sums (7-day horizon) are relative to this fixed epoch: exp overflows
# ~700 tau (13 years) later. Popularity sums move their epoch (REBASE_S).
_EPOCH_S = 1_767_225_600.0  # 2026-01-01
# A segment's popularity epoch moves to its newest event once that is this much
# newer: fresh weights stay below e^12 (short horizon), old sums shrink.
REBASE_S = 12 * SHORT_TAU_S


def decay_weight(weight: float, ts_s: float, tau_s: float, epoch_s: float = _EPOCH_S) -> float:
    """`weight` grown to time `ts_s` since `epoch_s`: sums of these rank as decayed counts."""
    return weight * math.exp(min((ts_s - epoch_s) / tau_s, 600.0))


def decayed(total: float, now_s: float, tau_s: float, epoch_s: float) -> float:
    """A sum of decay_weight terms as a count decayed to `now_s` (0.0 for long idle)."""
    return total * math.exp(max(-(now_s - epoch_s) / tau_s, -700.0))


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


# Trending ranks the 4n most active items of the short horizon (both backends).
TRENDING_POOL = 4
# Best items kept ranked as counts change: reads of up to this many (a Recommend's
# pool of 3k, a trending pool of 4x that) sort these instead of the whole segment.
_TOP_KEPT = 512


class _TopK:
    """The k largest of values that only grow (decayed sums): an item enters only when
    its own count passes the smallest kept one, so every item outside is no larger than
    every item inside. A min-heap of (value when pushed, item); entries whose item grew
    since are refreshed when they reach the top."""

    __slots__ = ("heap", "k", "members", "order", "sorted_at")

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, str]] = []
        self.members: dict[str, None] = {}  # insertion-ordered: ties read the same each time
        # Members best first as of counter version `sorted_at`: re-sorted (nearly in
        # order already, so cheaply) only after a write.
        self.order: list[str] = []
        self.sorted_at = -1

    def offer(self, item: str, values: dict[str, float]) -> None:
        """Call after values[item] grew."""
        if item in self.members:
            return
        value = values[item]
        if len(self.members) < self.k:
            heapq.heappush(self.heap, (value, item))
            self.members[item] = None
            self.order.append(item)
            return
        while True:  # the true minimum: refresh stale entries
            low, member = self.heap[0]
            current = values[member]
            if current == low:
                break
            heapq.heapreplace(self.heap, (current, member))
        if value > low:
            heapq.heapreplace(self.heap, (value, item))
            del self.members[member]
            self.members[item] = None
            self.order[self.order.index(member)] = item

    def best(self, n: int, values: dict[str, float], version: int) -> list[str]:
        """The n best members; `version` counts the counter's writes."""
        if self.sorted_at != version:
            self.order.sort(key=values.__getitem__, reverse=True)
            self.sorted_at = version
        return self.order[:n]

    def rebuild(self, values: dict[str, float]) -> None:
        best = heapq.nlargest(self.k, values.items(), key=lambda kv: kv[1])
        self.heap = [(v, k) for k, v in best]
        heapq.heapify(self.heap)
        self.members = dict.fromkeys(k for k, _ in best)
        self.order = list(self.members)
        self.sorted_at = -1


class _Counter:
    """Heavy-hitter decayed counts for one segment, bounded to `capacity` items, with
    the best of each horizon kept ranked (reads cost microseconds, not a pass over
    thousands of items)."""

    __slots__ = ("capacity", "epoch", "long", "long_top", "short", "short_top", "version")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.epoch: float | None = None  # the first event's time, moved by _rebase
        self.long: dict[str, float] = {}
        self.short: dict[str, float] = {}
        kept = min(_TOP_KEPT, capacity)
        self.long_top = _TopK(kept)
        self.short_top = _TopK(kept)
        self.version = 0  # writes so far: the kept rankings re-sort only after one

    def add(self, item: str, weight: float, ts_s: float) -> None:
        self.version += 1
        if self.epoch is None:
            self.epoch = ts_s
        elif ts_s - self.epoch > REBASE_S:
            self._rebase(ts_s)
        epoch = self.epoch
        self.long[item] = self.long.get(item, 0.0) + decay_weight(weight, ts_s, LONG_TAU_S, epoch)
        self.short[item] = self.short.get(item, 0.0) + decay_weight(
            weight, ts_s, SHORT_TAU_S, epoch
        )
        self.long_top.offer(item, self.long)
        self.short_top.offer(item, self.short)
        if len(self.long) > 2 * self.capacity:
            keep = heapq.nlargest(self.capacity, self.long.items(), key=lambda kv: kv[1])
            self.long = dict(keep)
            self.short = {k: self.short[k] for k in self.long}
            self._rerank()

    def _rebase(self, epoch: float) -> None:
        assert self.epoch is not None
        shift = epoch - self.epoch
        f_long, f_short = math.exp(-shift / LONG_TAU_S), math.exp(-shift / SHORT_TAU_S)
        self.long = {k: v * f_long for k, v in self.long.items()}
        self.short = {k: v * f_short for k, v in self.short.items()}
        self.epoch = epoch
        self._rerank()

    def _rerank(self) -> None:
        self.long_top.rebuild(self.long)
        self.short_top.rebuild(self.short)

    def _best(self, n: int, values: dict[str, float], top: _TopK) -> list[str]:
        if n <= top.k:
            return top.best(n, values, self.version)
        return [k for k, _ in heapq.nlargest(n, values.items(), key=lambda kv: kv[1])]

    def top(self, n: int, trending: bool, now_s: float) -> list[tuple[str, float]]:
        if self.epoch is None:
            return []
        long_now = decayed(1.0, now_s, LONG_TAU_S, self.epoch)
        if not trending:
            return [(k, self.long[k] * long_now) for k in self._best(n, self.long, self.long_top)]
        pool = self._best(TRENDING_POOL * n, self.short, self.short_top)
        short = [self.short[k] for k in pool]
        long = [self.long[k] for k in pool]
        return trending_scores(pool, short, long, now_s, self.epoch)[:n]


def trending_scores(
    items: Sequence[str],
    short: Sequence[float],
    long: Sequence[float],
    now_s: float,
    epoch_s: float,
) -> list[tuple[str, float]]:
    """Trending, best first: each item's short-horizon count over its smoothed
    long-horizon rate (sums relative to `epoch_s`), among the items given (the
    TRENDING_POOL * n most active of the short horizon)."""
    short_now = decayed(1.0, now_s, SHORT_TAU_S, epoch_s)
    long_now = decayed(1.0, now_s, LONG_TAU_S, epoch_s)
    ratio = SHORT_TAU_S / LONG_TAU_S
    scored = [
        (k, (s * short_now) / (ratio * lv * long_now + 1.0))
        for k, s, lv in zip(items, short, long, strict=True)
    ]
    scored.sort(key=lambda kv: -kv[1])
    return scored


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
