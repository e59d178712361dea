"""Request mixes: personas (device, country, budget) with broad to restrictive filters.

Every planned request is serialised once up front, so the load generator only
sends bytes. Its filter selectivity (the fraction of the catalog passing) is
computed exactly with the server's own filter code on the same artifact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from endcap.v1 import recommender_pb2 as pb
from server.domain.engine import Engine
from server.domain.query import Filters

METHODS = ("Recommend", "Rerank", "SimilarItems")
# Selectivity levels of the sweep (fraction of the catalog passing the filters).
LEVELS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
K = 20

_CURRENCY = {
    "US": "USD", "CA": "CAD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR",
    "NL": "EUR", "PL": "PLN", "SE": "SEK", "CH": "CHF", "JP": "JPY", "AU": "AUD",
}  # fmt: skip
_COUNTRY_SHARE = {
    "US": 0.26, "CA": 0.05, "GB": 0.09, "DE": 0.13, "FR": 0.08, "ES": 0.05, "IT": 0.05,
    "NL": 0.04, "PL": 0.04, "SE": 0.03, "CH": 0.03, "JP": 0.10, "AU": 0.05,
}  # fmt: skip
# Device mix and budget factor (desktop shoppers spend more).
_DEVICES = ((pb.RequestContext.MOBILE, 0.55, 0.7), (pb.RequestContext.TABLET, 0.10, 1.0),
            (pb.RequestContext.DESKTOP, 0.35, 1.4))  # fmt: skip
_PLACEMENTS = (pb.RequestContext.HOME, pb.RequestContext.CATEGORY, pb.RequestContext.PRODUCT,
               pb.RequestContext.EMAIL, pb.RequestContext.SEARCH)  # fmt: skip
# Filter recipes for the mixed workload and their weights: mostly broad, some tight.
RECIPES = {
    "open": 0.05,
    "country": 0.25,
    "budget": 0.20,
    "band": 0.10,
    "root": 0.12,
    "leaf": 0.10,
    "leaf_budget": 0.08,
    "leaf_brand": 0.05,
    "brand": 0.05,
}


@dataclass(frozen=True, slots=True)
class Planned:
    """One serialised request and what it exercises."""

    method: str
    payload: bytes
    scenario: str
    recipe: str
    selectivity: float  # fraction of catalog items passing the filters (exact)


@dataclass(frozen=True, slots=True)
class Persona:
    user_id: str
    session_id: str
    country: str
    device: int
    budget: float  # multiple of a category's typical price
    placement: int

    def context(self) -> pb.RequestContext:
        return pb.RequestContext(
            user_id=self.user_id,
            session_id=self.session_id,
            country=self.country,
            currency=_CURRENCY.get(self.country, ""),
            device=self.device,  # type: ignore[arg-type]
            placement=self.placement,  # type: ignore[arg-type]
            os="ios" if self.device == pb.RequestContext.MOBILE else "windows",
            language="en",
            traffic_source="organic",
        )


def level_label(level: float) -> str:
    return f"{level * 100:g}%"


class Workload:
    """Draws personas and filters for one catalog (an in-process Engine on the artifact)."""

    def __init__(self, engine: Engine, seed: int = 0, anonymous_share: float = 0.2) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.anonymous_share = anonymous_share
        cat = engine.catalog
        n = cat.n_base
        self.n = n
        self.user_ids = np.asarray(engine.artifact["user_ids"])
        countries = [c for c in cat.country_codes if c in _CURRENCY]
        share = np.array([_COUNTRY_SHARE.get(c, 0.01) for c in countries])
        self.countries = countries
        self.country_p = share / share.sum()
        self.category_names = cat.category_names
        parent = np.asarray(engine.artifact["category_parent"])
        self.roots = np.flatnonzero(parent < 0)
        self.leaves = np.flatnonzero(parent >= 0)
        category = np.asarray(cat.category[:n])
        self.category = category
        self.price = np.asarray(cat.price[:n])
        self.brand = np.asarray(cat.brand[:n])
        # Typical (median) price per leaf and per root, base currency.
        self.leaf_median = np.zeros(len(cat.category_names))
        for c in np.unique(category):
            self.leaf_median[c] = float(np.median(self.price[category == c][:5000]))
        for r in self.roots:
            kids = self.leaves[parent[self.leaves] == r]
            self.leaf_median[r] = float(np.median(self.leaf_median[kids])) if kids.size else 30.0
        self.parent = parent
        self.by_category = np.argsort(category, kind="stable")
        self.cat_start = np.searchsorted(category[self.by_category], np.arange(parent.size))
        self.cat_end = np.searchsorted(
            category[self.by_category], np.arange(parent.size), side="right"
        )
        pop = np.asarray(engine.artifact["item_popularity"])
        self.popular = np.argsort(-pop, kind="stable")[: max(1000, n // 100)]
        self._session = 0

    # Personas.
    def persona(self, *, anonymous: bool | None = None, placement: int | None = None) -> Persona:
        rng = self.rng
        anon = rng.random() < self.anonymous_share if anonymous is None else anonymous
        d = rng.choice(len(_DEVICES), p=[p for _, p, _ in _DEVICES])
        device, _, budget = _DEVICES[d]
        self._session += 1
        return Persona(
            user_id="" if anon else str(self.user_ids[rng.integers(self.user_ids.size)]),
            session_id=f"bench-s{self._session:08d}",
            country=str(rng.choice(self.countries, p=self.country_p)),
            device=int(device),
            budget=float(budget * rng.lognormal(0.0, 0.4)),
            placement=int(rng.choice(_PLACEMENTS)) if placement is None else placement,
        )

    # Filters.
    def _rate(self, country: str) -> float:
        return self.engine.catalog.rates.get(_CURRENCY.get(country, ""), 1.0)

    def _leaf_items(self, leaf: int) -> npt.NDArray[np.int64]:
        return self.by_category[self.cat_start[leaf] : self.cat_end[leaf]].astype(np.int64)

    def filters(self, recipe: str, p: Persona) -> pb.Filters:
        rng = self.rng
        rate = self._rate(p.country)
        f = pb.Filters()
        if recipe == "open":
            f.in_stock_only = False
            return f
        leaf = int(rng.choice(self.leaves))
        root = int(rng.choice(self.roots))
        typical = self.leaf_median[leaf] if recipe.startswith("leaf") else 60.0
        if recipe in ("budget", "leaf_budget"):
            f.max_price = round(typical * p.budget * rate * rng.lognormal(0.0, 0.3), 2)
        if recipe == "band":
            lo = typical * rng.lognormal(-0.5, 0.6)
            f.min_price = round(lo * rate, 2)
            f.max_price = round(lo * rng.uniform(1.2, 2.5) * rate, 2)
        if recipe == "root":
            f.include_categories.append(self.category_names[root])
            if rng.random() < 0.5:
                f.max_price = round(self.leaf_median[root] * p.budget * 2 * rate, 2)
        if recipe.startswith("leaf"):
            f.include_categories.append(self.category_names[leaf])
        if recipe in ("leaf_brand", "brand"):
            pool = self._leaf_items(leaf) if recipe == "leaf_brand" else self.popular
            brands = np.unique(self.brand[rng.choice(pool, size=min(3, pool.size))])
            names = self.engine.catalog.brand_names
            f.brands.extend(names[int(b)] for b in brands[: int(rng.integers(1, 4))])
        if rng.random() < 0.1:
            f.exclude_categories.append(self.category_names[int(rng.choice(self.roots))])
            if f.include_categories and f.exclude_categories[0] in f.include_categories:
                del f.exclude_categories[:]
        return f

    def selectivity(self, p: Persona, f: pb.Filters) -> float:
        """Exact fraction of the catalog passing `f` for this persona."""
        from server.transport import validate

        cat = self.engine.catalog
        _, rate = cat.currency(_CURRENCY.get(p.country, ""))
        spec = cat.filter_spec(validate.filters(f), p.country, rate)
        compiled = cat.filters.compile(spec)
        return int(compiled.passing_ids().shape[0]) / self.n

    # Requests.
    def request(self, method: str, p: Persona, f: pb.Filters) -> bytes:
        ctx = p.context()
        if method == "Recommend":
            return pb.RecommendRequest(context=ctx, filters=f, num_results=K).SerializeToString()
        if method == "Rerank":
            return self.rerank(p, f, int(self.rng.integers(100, 501))).SerializeToString()
        seeds = self.rng.choice(self.popular, size=int(self.rng.integers(1, 4)), replace=False)
        return pb.SimilarItemsRequest(
            context=ctx,
            filters=f,
            seed_item_ids=self.engine.catalog.item_ids(np.sort(seeds)),
            num_results=K,
        ).SerializeToString()

    def live_events(
        self, n: int, *, hours: float = 6.0, batch: int = 1_000, seed: int = 0
    ) -> list[pb.TrackEventsRequest]:
        """`n` events a shop would have streamed over the past `hours`: anonymous sessions
        of ~5 events in the shoppers' countries and devices, on items drawn by catalog
        popularity (rank r weighs 1 / (r + 10)); 80% views, 15% add-to-carts, 5%
        purchases. Fills the live popularity segments that Recommend reads, as in
        production. A generator of its own: the other request streams do not move."""
        rng = np.random.default_rng([seed, 2])
        weights = 1.0 / (np.arange(self.popular.size) + 10.0)
        items = self.popular[rng.choice(self.popular.size, size=n, p=weights / weights.sum())]
        ids = self.engine.catalog.item_ids(items.astype(np.int64))
        kinds = rng.choice(
            [pb.Event.VIEW, pb.Event.ADD_TO_CART, pb.Event.PURCHASE], size=n, p=[0.8, 0.15, 0.05]
        )
        now = time.time()
        ages = rng.uniform(0.0, hours * 3_600.0, size=n)
        out: list[pb.TrackEventsRequest] = []
        ctx = pb.RequestContext()
        for i in range(n):
            if i % 5 == 0:
                country = str(rng.choice(self.countries, p=self.country_p))
                device = int(_DEVICES[rng.choice(len(_DEVICES), p=[q for _, q, _ in _DEVICES])][0])
                ctx = pb.RequestContext(
                    session_id=f"bench-live-{seed}-{i // 5}",
                    country=country,
                    device=device,  # type: ignore[arg-type]
                )
            if i % batch == 0:
                out.append(pb.TrackEventsRequest())
            ev = out[-1].events.add(type=int(kinds[i]), item_id=ids[i], context=ctx)
            ev.timestamp.FromNanoseconds(int((now - ages[i]) * 1e9))
            if kinds[i] == pb.Event.PURCHASE:
                ev.price, ev.quantity = 20.0, 1
        return out

    def rerank(self, p: Persona, f: pb.Filters, n_candidates: int) -> pb.RerankRequest:
        """Candidates like a search result page: mostly one leaf, some popular items."""
        leaf = int(self.rng.choice(self.leaves))
        items = self._leaf_items(leaf)
        n_leaf = min(items.size, n_candidates * 4 // 5)
        picked = self.rng.choice(items, size=n_leaf, replace=False) if n_leaf else items[:0]
        rest = self.rng.choice(self.popular, size=n_candidates - n_leaf, replace=False)
        ids = np.unique(np.concatenate([picked, rest]))[:n_candidates]
        self.rng.shuffle(ids)
        return pb.RerankRequest(
            context=p.context(),
            filters=f,
            candidate_item_ids=self.engine.catalog.item_ids(ids),
            num_results=K,
        )

    def mixed(
        self, count: int, weights: dict[str, float] | None = None, scenario: str = "mixed"
    ) -> list[Planned]:
        """A realistic mix: methods by `weights` (default 70/15/15), recipes by RECIPES."""
        w = weights or {"Recommend": 0.7, "Rerank": 0.15, "SimilarItems": 0.15}
        methods = list(w)
        mp = np.array([w[m] for m in methods])
        recipes = list(RECIPES)
        rp = np.array([RECIPES[r] for r in recipes])
        out = []
        for _ in range(count):
            method = str(self.rng.choice(methods, p=mp / mp.sum()))
            recipe = str(self.rng.choice(recipes, p=rp / rp.sum()))
            p = self.persona()
            f = self.filters(recipe, p)
            out.append(Planned(method, self.request(method, p, f), scenario, recipe, math.nan))
        return out

    def sweep(
        self, per_level: int, levels: tuple[float, ...] = LEVELS, method: str = "Recommend"
    ) -> dict[float, list[Planned]]:
        """Known shoppers' requests binned by exact selectivity (within 1.6x of each level)."""
        bins: dict[float, list[Planned]] = {lv: [] for lv in levels}
        tries = 0
        limit = per_level * len(levels) * 400
        while any(len(v) < per_level for v in bins.values()) and tries < limit:
            tries += 1
            need = [lv for lv, v in bins.items() if len(v) < per_level]
            recipe = self._recipe_for(need)
            p = self.persona(anonymous=False, placement=pb.RequestContext.PLACEMENT_UNSPECIFIED)
            if recipe == "open":
                p = dataclasses.replace(p, country="")
            f = self.filters(recipe, p)
            s = self.selectivity(p, f)
            for lv in need:
                ok = s >= 0.9 if lv >= 1.0 else lv / 1.6 <= s <= lv * 1.6
                if ok:
                    bins[lv].append(
                        Planned(method, self.request(method, p, f), level_label(lv), recipe, s)
                    )
                    break
        return bins

    def _recipe_for(self, need: list[float]) -> str:
        """A recipe likely to land in one of the needed levels."""
        lv = need[int(self.rng.integers(len(need)))]
        if lv >= 1.0:
            return "open"
        if lv >= 0.2:
            return str(self.rng.choice(["country", "budget"]))
        if lv >= 0.05:
            return str(self.rng.choice(["budget", "band", "root"]))
        if lv >= 0.015:
            return str(self.rng.choice(["root", "leaf", "band", "brand"]))
        if lv >= 0.004:
            return str(self.rng.choice(["leaf", "leaf_budget", "brand"]))
        return str(self.rng.choice(["leaf_budget", "leaf_brand", "brand"]))


def cycle(planned: list[Planned]) -> Iterator[Planned]:
    while True:
        yield from planned


def as_filters(f: pb.Filters) -> Filters:
    from server.transport import validate

    return validate.filters(f)
