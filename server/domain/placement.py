"""Executing a placement strategy: seeds, constraints, retrievers, fusion, rules, diversity.

Each retriever returns a ranked list; lists are fused by weighted reciprocal
rank (score = sum_r w_r / (RRF_K + rank_r)), which needs no calibration between
dot products and popularity counts. Merchandising boosts multiply the fused
score, diversity caps and MMR reorder it, pins are placed last; the hard
filters hold throughout because every candidate comes from a filtered
retriever and pins are checked against the same compiled filter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from server.domain.caps import Caps, admit
from server.domain.errors import InvalidQuery, UnknownItems
from server.domain.exposure import demote
from server.domain.filters import Compiled
from server.domain.query import Profile, RecommendQuery, segment_key
from server.domain.retrieval import Provenance, Results
from server.domain.strategy import Strategies, Strategy, traffic_source

if TYPE_CHECKING:
    from server.domain.engine import Blend, Engine

RRF_K = 20.0
_COUNTRY_NAMES = {
    "US": "the US", "CA": "Canada", "GB": "the UK", "DE": "Germany", "FR": "France",
    "ES": "Spain", "IT": "Italy", "NL": "the Netherlands", "PL": "Poland", "SE": "Sweden",
    "CH": "Switzerland", "JP": "Japan", "AU": "Australia", "AT": "Austria", "BE": "Belgium",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request will run, decided before live lists are fetched."""

    strategy: Strategy
    seeds: tuple[str, ...]
    seed_rows: npt.NDArray[np.int64]
    shopper_segment: str
    traffic_source: str  # as strategies key it ("" = none)
    weights: Mapping[str, float]  # retriever -> weight for this device, segment and source
    live_keys: Mapping[str, tuple[str, ...]]  # retriever -> store keys to read


@dataclass(frozen=True, slots=True)
class Placed:
    """A fused list with the reason of each item."""

    results: Results
    reasons: tuple[str, ...]
    reason_items: tuple[str, ...]
    strategy: str
    shopper_segment: str
    traffic_source: str
    personalized: bool


@dataclass
class _Candidates:
    scores: dict[int, float] = field(default_factory=dict)
    best: dict[int, tuple[float, str, int]] = field(
        default_factory=dict
    )  # contribution, retriever, prov

    def add(
        self, name: str, ids: npt.NDArray[np.int64], prov: npt.NDArray[np.int8], weight: float
    ) -> None:
        for rank, (row, p) in enumerate(zip(ids.tolist(), prov.tolist(), strict=True)):
            contribution = weight / (RRF_K + rank)
            self.scores[row] = self.scores.get(row, 0.0) + contribution
            if contribution > self.best.get(row, (0.0, "", 0))[0]:
                self.best[row] = (contribution, name, p)


def shopper_segment(engine: Engine, user_row: int | None, profile: Profile, now_s: float) -> str:
    orders, monetary, last = profile.orders, profile.monetary, profile.last_purchase_s
    if user_row is not None and engine.user_orders is not None:
        orders += int(engine.user_orders[user_row])
        monetary += float(engine.user_monetary[user_row])  # type: ignore[index]
        last = max(last, float(engine.user_last_purchase_s[user_row]))  # type: ignore[index]
    recency_days = (now_s - last) / 86_400.0 if last else float("inf")
    has_history = bool(profile.recent or profile.cart or profile.purchased)
    return engine.segment_rules.classify(
        known=user_row is not None,
        has_history=has_history,
        orders=orders,
        monetary=monetary,
        recency_days=recency_days,
    )


def plan(
    engine: Engine, strategies: Strategies, query: RecommendQuery, profile: Profile, now_s: float
) -> Plan:
    ctx = query.context
    try:
        strategy = strategies.for_request(ctx.placement, query.strategy)
    except KeyError:
        known = ", ".join(sorted(strategies.strategies))
        raise InvalidQuery(
            "strategy", f"unknown strategy {query.strategy!r} (known: {known})"
        ) from None
    if query.seeds:
        rows = engine.catalog.lookup(query.seeds)
        if (rows < 0).any():
            missing = tuple(s for s, r in zip(query.seeds, rows, strict=True) if r < 0)
            raise UnknownItems("seed_item_ids", missing)
        seeds = query.seeds
    else:
        source = {
            "request": (),
            "cart": profile.cart,
            "purchased": profile.purchased[:5],
            "recent": tuple(i for i, _ in profile.recent[:5]),
        }[strategy.seeds]
        rows = engine.catalog.lookup(source) if source else np.empty(0, np.int64)
        seeds = tuple(s for s, r in zip(source, rows, strict=True) if r >= 0)
        rows = rows[rows >= 0]
    user_row = engine.user_row(ctx, profile)
    segment = shopper_segment(engine, user_row, profile, now_s)
    traffic = traffic_source(ctx.traffic_source)
    weights = strategy.weights(ctx.device, segment, traffic)
    device = ("*", "mobile", "tablet", "desktop")[ctx.device] if ctx.device else "*"
    keys: dict[str, tuple[str, ...]] = {}
    # Personal picks fall back to bestsellers for a shopper the model cannot place.
    unplaced = user_row is None and not profile.recent
    if "segment_bestsellers" in weights or ("personal" in weights and unplaced):
        keys["segment_bestsellers"] = (segment_key(ctx.country, device),)
    if "trending" in weights:
        keys["trending"] = (segment_key(ctx.country, device),)
    if "also_bought" in weights and seeds:
        keys["also_bought"] = tuple(f"co|{s}" for s in seeds[:10])
    return Plan(strategy, seeds, rows.astype(np.int64), segment, traffic, weights, keys)


def constrain(
    engine: Engine, query: RecommendQuery, plan: Plan, profile: Profile, rate: float
) -> tuple[Compiled, npt.NDArray[np.int64]]:
    """Compile request filters plus the strategy's constraints and exclusions."""
    cat = engine.catalog
    st = plan.strategy
    exclude = [plan.seed_rows]
    if st.exclude_purchased:
        exclude.append(_rows(engine, profile.purchased))
    if st.exclude_cart:
        exclude.append(_rows(engine, profile.cart))
    blocked = query.rules.blocked_item_ids + engine.strategies.blocked_item_ids
    exclude.append(_rows(engine, blocked))
    excluded = np.concatenate(exclude)
    spec = cat.filter_spec(query.filters, query.context.country, rate, excluded)
    seeds = plan.seed_rows
    if seeds.size:
        if st.same_category:
            spec = dataclasses.replace(spec, require_category=int(cat.category[seeds[0]]))
        if st.complementary:
            leaves = tuple(sorted({int(c) for c in cat.category[seeds].tolist()}))
            spec = dataclasses.replace(spec, exclude_categories=spec.exclude_categories + leaves)
        if st.price_ratio is not None:
            ref = float(cat.price[seeds].mean()) * rate
            lo, hi = st.price_ratio[0] * ref, st.price_ratio[1] * ref
            spec = dataclasses.replace(
                spec,
                min_price=lo if spec.min_price is None else max(lo, spec.min_price),
                max_price=hi if spec.max_price is None else min(hi, spec.max_price),
            )
            if (
                spec.min_price is not None
                and spec.max_price is not None
                and spec.min_price > spec.max_price
            ):
                spec = dataclasses.replace(spec, country=-1)  # nothing can satisfy both
    return cat.filters.compile(spec), excluded


def _rows(engine: Engine, ids: Sequence[str]) -> npt.NDArray[np.int64]:
    rows = engine.catalog.lookup(ids) if ids else np.empty(0, np.int64)
    return rows[rows >= 0]


def execute(
    engine: Engine,
    query: RecommendQuery,
    plan: Plan,
    profile: Profile,
    live: Mapping[str, Sequence[str]],
    flt: Compiled,
    now_s: float,
    blend: Blend | None,
) -> Placed:
    ctx = query.context
    st = plan.strategy
    k = query.k
    weights = plan.weights
    pool = max(3 * k, 30)
    q, personal = engine.encode(ctx, profile, now_s, blend)
    lists: list[tuple[str, Results, float]] = []
    if "personal" in weights and personal:
        lists.append(("personal", engine.retriever.search(q, flt, pool), weights["personal"]))
    seeds = plan.seed_rows
    if "content_similar" in weights and seeds.size:
        qs = engine.vectors.take(seeds).mean(axis=0).astype(np.float32)
        found = engine.retriever.search(qs, flt, pool)
        lists.append(
            (
                "content_similar",
                dataclasses.replace(
                    found,
                    provenance=np.full(found.ids.shape[0], Provenance.CONTENT_SIMILAR, np.int8),
                ),
                weights["content_similar"],
            )
        )
    if "also_bought" in weights and seeds.size:
        ids = engine.also_bought(seeds, live.get("also_bought", ()), flt, pool)
        lists.append(
            (
                "also_bought",
                Results.of(
                    ids, np.zeros(ids.shape[0], np.float32), Provenance.ALSO_BOUGHT, "also_bought"
                ),
                weights["also_bought"],
            )
        )
    if "trending" in weights:
        rows = _rows(engine, live.get("trending", ()))
        rows = rows[flt.passes(rows)][:pool] if rows.size else rows
        lists.append(
            (
                "trending",
                Results.of(
                    rows, np.zeros(rows.shape[0], np.float32), Provenance.TRENDING, "trending"
                ),
                weights["trending"],
            )
        )
    wants_popular = "segment_bestsellers" in weights
    if wants_popular or not any(r.ids.size for _, r, _ in lists):
        segment = (engine.country_row(ctx.country), ctx.device)
        pop = engine.popular_list(segment, flt, pool, live.get("segment_bestsellers", ()))
        lists.append(("segment_bestsellers", pop, weights.get("segment_bestsellers", 1.0)))
    if len(lists) == 1 and not query.rules.boosts and not engine.strategies.boosts:
        name, res, _ = lists[0]
        cand_ids, cand_scores, cand_prov = res.ids, res.scores, res.provenance
        names = [name] * cand_ids.shape[0]
        plan_name = res.plan
    else:
        cands = _Candidates()
        for name, res, weight in lists:
            cands.add(name, res.ids, res.provenance, weight)
        rows = np.fromiter(cands.scores, dtype=np.int64, count=len(cands.scores))
        blended = np.fromiter(cands.scores.values(), dtype=np.float64, count=len(cands.scores))
        blended *= _boosts(engine, rows, query)
        keep = blended > 0
        rows, blended = rows[keep], blended[keep]
        order = np.lexsort((rows, -blended))
        cand_ids = rows[order]
        cand_scores = blended[order].astype(np.float32)
        cand_prov = np.array([cands.best[r][2] for r in cand_ids.tolist()], dtype=np.int8)
        names = [cands.best[r][1] for r in cand_ids.tolist()]
        plan_name = "blend"
    cap = query.diversity.exposure_cap or st.exposure_cap
    cand_ids, cand_scores, cand_prov, names = demote(
        engine.catalog, profile, cap, cand_ids, cand_scores, cand_prov, names
    )
    chosen = _diversify(engine, cand_ids, cand_scores, query, st, k)
    ids, scores, prov = cand_ids[chosen], cand_scores[chosen], cand_prov[chosen]
    names = [names[i] for i in chosen.tolist()]
    caps = _caps(query, st)
    if ids.shape[0] < k:  # never short because of the strategy: fill from bestsellers
        segment = (engine.country_row(ctx.country), ctx.device)
        # Under caps most bestsellers may not fit: look further down the list.
        fill = engine.retriever.popular(segment, flt, k + ids.shape[0] + (20 * k if caps else 0))
        extra = np.flatnonzero(~np.isin(fill.ids, ids))
        if query.rules.boosts or engine.strategies.boosts:  # factor 0 hides here too
            extra = extra[_boosts(engine, fill.ids[extra], query) > 0]
        extra = extra[admit(engine.catalog, ids, fill.ids[extra], caps, k - ids.shape[0])]
        ids = np.concatenate([ids, fill.ids[extra]])
        add = extra.shape[0]
        low = float(scores.min()) if scores.size else 1.0
        scores = np.concatenate([scores, (low * 0.5 ** np.arange(1, add + 1)).astype(np.float32)])
        prov = np.concatenate([prov, fill.provenance[extra]])
        names += ["segment_bestsellers"] * add
    ids, scores, prov, names = _pin(engine, query, flt, ids, scores, prov, names, k, caps)
    reasons, reason_items = _reasons(
        engine, names, prov, plan, profile, ctx.country, ctx.device, q, ids
    )
    return Placed(
        Results(ids, scores, prov, plan_name),
        reasons,
        reason_items,
        st.name,
        plan.shopper_segment,
        plan.traffic_source,
        personal or bool(seeds.size),
    )


def _boosts(
    engine: Engine, rows: npt.NDArray[np.int64], query: RecommendQuery
) -> npt.NDArray[np.float64]:
    factor = np.ones(rows.shape[0])
    cat = engine.catalog
    rules = [(b.attribute, b.value, b.factor) for b in engine.strategies.boosts] + list(
        query.rules.boosts
    )
    for attribute, value, f in rules:
        if attribute == "brand":
            match = np.array(
                [cat.brand_names[b] == value for b in cat.brand[rows].tolist()], dtype=bool
            )
        elif attribute == "tag":
            bit = cat.tag_bit(value)
            if bit is None:
                continue
            match = (cat.tags[rows] >> np.uint64(bit)) & np.uint64(1) == 1
        else:
            c = cat.category_row(value)
            if c is None:
                continue
            match = np.array(
                [
                    c in engine.catalog.filters.ancestors(leaf)
                    for leaf in cat.category[rows].tolist()
                ],
                dtype=bool,
            )
        factor[match] *= f
    return factor


def _caps(query: RecommendQuery, st: Strategy) -> Caps:
    return Caps(
        query.diversity.max_per_category or st.max_per_category,
        query.diversity.max_per_brand or st.max_per_brand,
    )


def _diversify(
    engine: Engine,
    ids: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    query: RecommendQuery,
    st: Strategy,
    k: int,
) -> npt.NDArray[np.int64]:
    """Indexes into ids: caps per category/brand, then MMR if a level is set."""
    level = query.diversity.level or st.diversity
    none = np.empty(0, np.int64)
    idx = admit(engine.catalog, none, ids, _caps(query, st), ids.shape[0])
    if level <= 0 or idx.shape[0] <= 1:
        return idx[:k]
    # MMR: greedily pick argmax (1-level)*relevance - level*max cosine to the picked.
    vecs = engine.vectors.take(ids[idx])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    rel = scores[idx].astype(np.float64)
    rel = (rel - rel.min()) / max(float(rel.max() - rel.min()), 1e-9)
    picked: list[int] = []
    max_sim = np.full(idx.shape[0], -1.0)
    available = np.ones(idx.shape[0], dtype=bool)
    for _ in range(min(k, idx.shape[0])):
        value = (1 - level) * rel - level * np.maximum(max_sim, 0.0)
        value[~available] = -np.inf
        j = int(np.argmax(value))
        picked.append(j)
        available[j] = False
        max_sim = np.maximum(max_sim, vecs @ vecs[j])
    return idx[np.asarray(picked, dtype=np.int64)]


def _pin(
    engine: Engine,
    query: RecommendQuery,
    flt: Compiled,
    ids: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    prov: npt.NDArray[np.int8],
    names: list[str],
    k: int,
    caps: Caps,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int8], list[str]]:
    if not query.rules.pins:
        return ids[:k], scores[:k], prov[:k], names[:k]
    pins = [
        (p.position, int(r))
        for p, r in zip(
            query.rules.pins,
            engine.catalog.lookup([p.item_id for p in query.rules.pins]).tolist(),
            strict=True,
        )
        if r >= 0
    ]
    pinned_rows = np.asarray([r for _, r in pins], dtype=np.int64)
    ok = flt.passes(pinned_rows) if pinned_rows.size else np.zeros(0, dtype=bool)
    pins = [
        p for p, good in zip(pins, ok.tolist(), strict=True) if good
    ]  # rules never break filters
    pinned = {r for _, r in pins}
    rest = [i for i, r in enumerate(ids.tolist()) if r not in pinned]
    if caps:  # pins count toward the caps: drop what no longer fits beside them
        taken = np.asarray(sorted(pinned), dtype=np.int64)
        rest = [rest[j] for j in admit(engine.catalog, taken, ids[rest], caps, len(rest)).tolist()]
    slots: list[tuple[int, float, int, str] | None] = [None] * k
    for position, row in sorted(pins):
        pos = min(position, k) - 1
        while pos < k and slots[pos] is not None:
            pos += 1
        if pos < k:
            slots[pos] = (row, 0.0, int(Provenance.PINNED), "pinned")
    it = iter(rest)
    for s in range(k):
        if slots[s] is None:
            nxt = next(it, None)
            if nxt is None:
                break
            slots[s] = (int(ids[nxt]), float(scores[nxt]), int(prov[nxt]), names[nxt])
    filled = [s for s in slots if s is not None]
    top = max((s[1] for s in filled), default=1.0)
    out_scores = [s[1] if s[3] != "pinned" else top for s in filled]
    return (
        np.asarray([s[0] for s in filled], dtype=np.int64),
        np.asarray(out_scores, dtype=np.float32),
        np.asarray([s[2] for s in filled], dtype=np.int8),
        [s[3] for s in filled],
    )


def _reasons(
    engine: Engine,
    names: list[str],
    prov: npt.NDArray[np.int8],
    plan: Plan,
    profile: Profile,
    country: str,
    device: int,
    query_vec: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    where = _COUNTRY_NAMES.get(country, country) if country else ""
    seed = plan.seeds[0] if plan.seeds else ""
    recent = profile.recent[0][0] if profile.recent else ""
    st = plan.strategy.name
    # A reason depends only on (retriever, provenance) within a request: decide each
    # pair once (a list has one or a few), not once per item.
    decided: dict[tuple[str, int], tuple[str, str]] = {}
    reasons, refs = [], []
    for key in zip(names, prov.tolist(), strict=True):
        got = decided.get(key)
        if got is None:
            got = decided[key] = _reason(*key, st, seed, recent, where, device)
        reasons.append(got[0])
        refs.append(got[1])
    return tuple(reasons), tuple(refs)


def _reason(
    name: str, p: int, st: str, seed: str, recent: str, where: str, device: int
) -> tuple[str, str]:
    """(reason, reason item) of one retriever and provenance."""
    if name == "pinned":
        return "Featured", ""
    if name == "content_similar" and "cheaper" in st:
        return f"A cheaper alternative to {seed}", seed
    if name == "content_similar" and "upsell" in st:
        return f"An upgrade from {seed}", seed
    if name == "content_similar":
        return f"Similar to {seed}", seed
    if name == "also_bought":
        return f"Often bought with {seed}", seed
    if name == "trending":
        return (f"Trending in {where}" if where else "Trending now"), ""
    if name == "segment_bestsellers" or p in (
        Provenance.SEGMENT_POPULARITY,
        Provenance.GLOBAL_POPULARITY,
    ):
        if where:
            return f"Popular in {where}", ""
        if device:
            return f"Popular on {('', 'mobile', 'tablet', 'desktop')[device]}", ""
        return "Bestseller", ""
    if recent:
        return f"Because you viewed {recent}", recent
    return "Picked for you", ""
