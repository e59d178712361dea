"""A synthetic online store with the structure a recommender should find: the demo's data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.data import (
    ADD_TO_CART,
    DESKTOP,
    MOBILE,
    PURCHASE,
    TABLET,
    VIEW,
    Dataset,
)

# Root category -> (share of the catalog and of shopper interest, price spread
# sigma of log price, ((leaf, median price in USD), ...)).
_TREE: tuple[tuple[str, float, float, tuple[tuple[str, float], ...]], ...] = (
    (
        "electronics",
        0.15,
        0.55,
        (
            ("phones", 450.0),
            ("phone-accessories", 20.0),
            ("laptops", 900.0),
            ("computer-accessories", 35.0),
            ("tv-audio", 300.0),
            ("cameras", 500.0),
            ("gaming", 60.0),
            ("smart-home", 80.0),
        ),
    ),
    (
        "fashion",
        0.20,
        0.50,
        (
            ("womens-clothing", 45.0),
            ("mens-clothing", 45.0),
            ("shoes", 80.0),
            ("bags", 70.0),
            ("jewelry", 60.0),
            ("watches", 150.0),
            ("kids-clothing", 25.0),
        ),
    ),
    (
        "home",
        0.15,
        0.60,
        (
            ("furniture", 250.0),
            ("kitchen", 40.0),
            ("bedding", 55.0),
            ("decor", 30.0),
            ("lighting", 45.0),
            ("garden", 50.0),
        ),
    ),
    (
        "beauty",
        0.11,
        0.45,
        (
            ("skincare", 25.0),
            ("makeup", 18.0),
            ("fragrance", 60.0),
            ("haircare", 15.0),
            ("personal-care", 12.0),
        ),
    ),
    (
        "sports",
        0.10,
        0.55,
        (
            ("fitness", 50.0),
            ("cycling", 120.0),
            ("running", 40.0),
            ("outdoor", 70.0),
            ("team-sports", 30.0),
            ("sportswear", 35.0),
        ),
    ),
    (
        "books",
        0.10,
        0.35,
        (
            ("fiction", 14.0),
            ("non-fiction", 18.0),
            ("childrens-books", 10.0),
            ("comics", 12.0),
            ("textbooks", 60.0),
        ),
    ),
    (
        "toys",
        0.09,
        0.50,
        (
            ("building-sets", 40.0),
            ("dolls", 20.0),
            ("board-games", 30.0),
            ("outdoor-toys", 35.0),
            ("baby", 25.0),
        ),
    ),
    (
        "grocery",
        0.10,
        0.40,
        (
            ("coffee-tea", 12.0),
            ("snacks", 5.0),
            ("pantry", 6.0),
            ("beverages", 8.0),
        ),
    ),
)

# Leaves whose buyers go on to look at another leaf: the co-purchase structure.
_COMPLEMENTS: dict[str, str] = {
    "electronics/phones": "electronics/phone-accessories",
    "electronics/laptops": "electronics/computer-accessories",
    "electronics/cameras": "electronics/computer-accessories",
    "electronics/tv-audio": "electronics/gaming",
    "electronics/gaming": "electronics/tv-audio",
    "fashion/womens-clothing": "fashion/shoes",
    "fashion/mens-clothing": "fashion/shoes",
    "fashion/shoes": "fashion/bags",
    "fashion/watches": "fashion/jewelry",
    "home/furniture": "home/lighting",
    "home/kitchen": "grocery/coffee-tea",
    "home/bedding": "home/decor",
    "beauty/makeup": "beauty/skincare",
    "beauty/skincare": "beauty/makeup",
    "beauty/haircare": "beauty/personal-care",
    "sports/fitness": "sports/sportswear",
    "sports/running": "fashion/shoes",
    "sports/cycling": "sports/outdoor",
    "toys/baby": "books/childrens-books",
    "toys/building-sets": "toys/board-games",
    "grocery/coffee-tea": "grocery/snacks",
}

# Country, share of shoppers, region, price level (log), device mix (mobile, tablet, desktop).
_COUNTRIES: tuple[tuple[str, float, str, float, tuple[float, float, float]], ...] = (
    ("US", 0.26, "na", 0.20, (0.55, 0.10, 0.35)),
    ("CA", 0.05, "na", 0.10, (0.55, 0.10, 0.35)),
    ("GB", 0.09, "eu", 0.10, (0.60, 0.10, 0.30)),
    ("DE", 0.13, "eu", 0.10, (0.45, 0.10, 0.45)),
    ("FR", 0.08, "eu", 0.05, (0.55, 0.10, 0.35)),
    ("ES", 0.05, "eu", -0.05, (0.65, 0.08, 0.27)),
    ("IT", 0.05, "eu", -0.05, (0.65, 0.08, 0.27)),
    ("NL", 0.04, "eu", 0.15, (0.55, 0.10, 0.35)),
    ("PL", 0.04, "eu", -0.35, (0.65, 0.05, 0.30)),
    ("SE", 0.03, "eu", 0.15, (0.55, 0.12, 0.33)),
    ("CH", 0.03, "eu", 0.40, (0.50, 0.10, 0.40)),
    ("JP", 0.10, "apac", 0.05, (0.72, 0.08, 0.20)),
    ("AU", 0.05, "apac", 0.10, (0.58, 0.12, 0.30)),
)
_REGIONS = ("na", "eu", "apac")
_REGION_SHARE = (0.40, 0.45, 0.15)  # where brands come from

# Units of each currency per 1 USD.
_CURRENCY_RATES: dict[str, float] = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "CHF": 0.88,
    "SEK": 10.6,
    "PLN": 3.98,
    "JPY": 151.0,
    "CAD": 1.37,
    "AUD": 1.52,
}

# Device -> root-category interest multiplier, roots in _TREE order, and the
# budget factor: mobile shoppers browse fashion/beauty and cheaper items,
# desktop shoppers electronics/home and pricier ones.
_DEVICE_ROOT_MULT: dict[int, tuple[float, ...]] = {
    MOBILE: (0.55, 1.8, 0.65, 1.8, 1.0, 0.8, 1.0, 1.3),
    TABLET: (0.9, 1.0, 1.1, 1.0, 0.9, 1.7, 1.5, 1.0),
    DESKTOP: (1.9, 0.65, 1.6, 0.6, 1.1, 1.0, 0.85, 0.8),
}
_DEVICE_BUDGET = {MOBILE: 0.7, TABLET: 1.0, DESKTOP: 1.4}

_BRAND_HEADS = (
    "Nor", "Vel", "Ast", "Bri", "Cal", "Dex", "Elo", "Fen", "Gal", "Hal", "Iso", "Jun", "Kor",
    "Lum", "Mav", "Nex", "Orb", "Pol", "Qui", "Rav", "Sol", "Tor", "Ulm", "Vox", "Wex", "Xan",
    "Yor", "Zen", "Aur", "Bel",
)  # fmt: skip
_BRAND_TAILS = (
    "a", "ex", "ora", "ium", "ix", "on", "ella", "ar", "ic", "o", "us", "wave", "line", "craft",
    "works", "io",
)  # fmt: skip

_LATENT_DIM = 16
_START_TS = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Size and shape of a synthetic store; the same config always yields the same store."""

    n_items: int = 50_000
    n_users: int = 20_000
    n_events: int = 1_000_000
    seed: int = 0
    n_brands: int = 300
    days: int = 90
    zipf_exponent: float = 0.9  # item popularity ~ 1 / rank**exponent
    in_stock_rate: float = 0.9
    mean_session_steps: float = 5.0  # item views per session
    usual_device_rate: float = 0.75  # sessions on the shopper's usual device
    candidates_per_step: int = 8  # items a shopper weighs before viewing one
    name: str = "synthetic"

    def __post_init__(self) -> None:
        for field in ("n_items", "n_users", "n_events", "n_brands", "days"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 < self.in_stock_rate <= 1.0:
            raise ValueError(f"in_stock_rate must be in (0, 1], got {self.in_stock_rate}")
        if not 0.0 <= self.usual_device_rate <= 1.0:
            raise ValueError(f"usual_device_rate must be in [0, 1], got {self.usual_device_rate}")
        if self.mean_session_steps < 1.0:
            raise ValueError(f"mean_session_steps must be >= 1, got {self.mean_session_steps}")
        if self.candidates_per_step < 1:
            raise ValueError(f"candidates_per_step must be >= 1, got {self.candidates_per_step}")


@dataclass(frozen=True, slots=True)
class _Catalog:
    """Category tree, brands and items, plus the hidden structure behind them."""

    category_names: tuple[str, ...]
    category_parent: npt.NDArray[np.int32]
    leaf_ids: npt.NDArray[np.int64]  # category indexes of the leaves, (l,)
    leaf_root: npt.NDArray[np.int64]  # root position (0..7) of each leaf, (l,)
    leaf_complement: npt.NDArray[np.int64]  # leaf position or -1, (l,)
    brand_names: tuple[str, ...]
    brand_region: npt.NDArray[np.int64]
    item_leaf: npt.NDArray[np.int64]  # leaf position (0..l-1), (n,)
    item_brand: npt.NDArray[np.int64]
    item_price: npt.NDArray[np.float64]
    item_rel_price: npt.NDArray[np.float64]  # price / leaf median
    item_in_stock: npt.NDArray[np.bool_]
    item_countries: npt.NDArray[np.bool_]
    item_pop: npt.NDArray[np.float64]
    item_latent: npt.NDArray[np.float32]  # (n, L)
    root_latent: npt.NDArray[np.float64]  # (r, L)


def _categorical(
    rng: np.random.Generator, weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """One draw per row of a (m, k) non-negative weight matrix (rows need a positive sum)."""
    cum = np.cumsum(weights, axis=1)
    u = rng.random(weights.shape[0]) * cum[:, -1]
    picks: npt.NDArray[np.int64] = (cum <= u[:, None]).sum(axis=1)
    last = int(weights.shape[1]) - 1
    return np.minimum(picks, last)


def _searchsorted(
    cum: npt.NDArray[np.float64], draws: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """np.searchsorted(cum, draws, side="right"), faster: sorted queries stay in cache."""
    flat = draws.ravel()
    by_value = np.argsort(flat)
    pos = np.empty(flat.size, dtype=np.int64)
    pos[by_value] = np.searchsorted(cum, flat[by_value], side="right")
    return pos.reshape(draws.shape)


def _build_catalog(config: StoreConfig, rng: np.random.Generator) -> _Catalog:
    n, n_roots, n_countries = config.n_items, len(_TREE), len(_COUNTRIES)
    names: list[str] = []
    parent: list[int] = []
    leaf_ids: list[int] = []
    leaf_root: list[int] = []
    leaf_median: list[float] = []
    root_sigma = np.array([sigma for _, _, sigma, _ in _TREE])
    root_share = np.array([share for _, share, _, _ in _TREE])
    root_share = root_share / root_share.sum()
    for r, (root, _, _, leaves) in enumerate(_TREE):
        root_idx = len(names)
        names.append(root)
        parent.append(-1)
        for leaf, leaf_price in leaves:
            leaf_ids.append(len(names))
            leaf_root.append(r)
            leaf_median.append(leaf_price)
            names.append(f"{root}/{leaf}")
            parent.append(root_idx)
    n_leaves = len(leaf_ids)
    leaf_pos = {names[c]: p for p, c in enumerate(leaf_ids)}
    complement = np.array(
        [leaf_pos.get(_COMPLEMENTS.get(names[c], ""), -1) for c in leaf_ids], dtype=np.int64
    )
    leaf_root_arr = np.array(leaf_root, dtype=np.int64)

    # Leaf sizes: the root's share split unevenly among its leaves.
    leaf_share = np.empty(n_leaves)
    for r in range(n_roots):
        mask = leaf_root_arr == r
        leaf_share[mask] = root_share[r] * rng.dirichlet(np.full(int(mask.sum()), 4.0))
    item_leaf = rng.choice(n_leaves, size=n, p=leaf_share / leaf_share.sum()).astype(np.int64)
    item_root = leaf_root_arr[item_leaf]

    # Brands: allotted to roots by share, each with a home region and a price tier.
    n_brands = max(config.n_brands, n_roots)
    per_root = np.maximum(1, np.floor(root_share * n_brands)).astype(np.int64)
    per_root[np.argmax(root_share)] += n_brands - int(per_root.sum())
    brand_root = np.repeat(np.arange(n_roots), per_root)
    heads = np.array(_BRAND_HEADS)
    tails = np.array(_BRAND_TAILS)
    combos = np.char.add(np.repeat(heads, tails.size), np.tile(tails, heads.size))
    combos = combos[rng.permutation(combos.size)]
    if n_brands <= combos.size:
        brand_names = tuple(str(b) for b in combos[:n_brands])
    else:
        brand_names = tuple(
            f"{combos[i % combos.size]} {i // combos.size + 1}" for i in range(n_brands)
        )
    region_p = np.array(_REGION_SHARE)
    brand_region = rng.choice(len(_REGIONS), size=n_brands, p=region_p).astype(np.int64)
    brand_tier = rng.lognormal(0.0, 0.35, size=n_brands)
    item_brand = np.empty(n, dtype=np.int64)
    for r in range(n_roots):
        members = np.flatnonzero(brand_root == r)
        rows = np.flatnonzero(item_root == r)
        # A few big brands make most of a root's items.
        brand_size = 1.0 / (1.0 + np.arange(members.size)) ** 0.8
        item_brand[rows] = rng.choice(members, size=rows.size, p=brand_size / brand_size.sum())

    median = np.array(leaf_median)[item_leaf]
    rel_price = brand_tier[item_brand] * rng.lognormal(0.0, root_sigma[item_root])
    # Shop prices end in .99 or .49: cosmetic, but it keeps every price > 0.
    price = np.maximum(
        np.floor(median * rel_price) + np.where(rng.random(n) < 0.7, 0.99, 0.49), 0.49
    )

    # Availability: most items ship within their brand's region, some everywhere,
    # some to only one to three countries of that region.
    country_region = np.array([_REGIONS.index(c[2]) for c in _COUNTRIES])
    home = brand_region[item_brand]
    in_region = country_region[None, :] == home[:, None]
    kind = rng.random(n)
    everywhere = kind < 0.25
    few = kind >= 0.85
    countries = in_region | (rng.random((n, n_countries)) < 0.08)
    countries[everywhere] = True
    # Few-country items: keep a random 1..3 of their region's countries.
    keys = np.where(in_region[few], rng.random((int(few.sum()), n_countries)), 2.0)
    ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
    countries[few] = ranks < rng.integers(1, 4, size=(int(few.sum()), 1))
    for c in range(n_countries):  # a country with no items at all would be a broken store
        if not countries[:, c].any():
            countries[rng.integers(n), c] = True

    in_stock = rng.random(n) < config.in_stock_rate
    pop = np.power(1.0 + rng.permutation(n), -config.zipf_exponent, dtype=np.float64)

    # Latent taste space: root centers, leaves near their root, brands and items nearby.
    root_latent = rng.normal(0.0, 1.0, size=(n_roots, _LATENT_DIM))
    leaf_latent = root_latent[leaf_root_arr] + 0.7 * rng.normal(size=(n_leaves, _LATENT_DIM))
    brand_latent = 0.6 * rng.normal(size=(n_brands, _LATENT_DIM))
    latent = (
        leaf_latent[item_leaf]
        + brand_latent[item_brand]
        + 0.5 * rng.standard_normal(size=(n, _LATENT_DIM), dtype=np.float32)
    ).astype(np.float32)
    return _Catalog(
        category_names=tuple(names),
        category_parent=np.array(parent, dtype=np.int32),
        leaf_ids=np.array(leaf_ids, dtype=np.int64),
        leaf_root=leaf_root_arr,
        leaf_complement=complement,
        brand_names=brand_names,
        brand_region=brand_region,
        item_leaf=item_leaf,
        item_brand=item_brand,
        item_price=price,
        item_rel_price=price / median,
        item_in_stock=in_stock,
        item_countries=countries,
        item_pop=pop,
        item_latent=latent,
        root_latent=root_latent,
    )


@dataclass(frozen=True, slots=True)
class _Shoppers:
    country: npt.NDArray[np.int64]
    device: npt.NDArray[np.int64]  # usual device, 1..3
    activity: npt.NDArray[np.float64]
    budget: npt.NDArray[np.float64]  # multiple of a leaf's median price they accept
    taste: npt.NDArray[np.float64]  # (u, roots), rows sum to 1
    latent: npt.NDArray[np.float32]  # (u, L)


def _build_shoppers(config: StoreConfig, cat: _Catalog, rng: np.random.Generator) -> _Shoppers:
    u, n_roots = config.n_users, len(_TREE)
    share = np.array([c[1] for c in _COUNTRIES])
    country = rng.choice(len(_COUNTRIES), size=u, p=share / share.sum()).astype(np.int64)
    device_mix = np.array([c[4] for c in _COUNTRIES])[country]
    device = 1 + _categorical(rng, device_mix)
    activity = rng.lognormal(0.0, 1.0, size=u)
    price_level = np.array([c[3] for c in _COUNTRIES])[country]
    budget = 1.6 * np.exp(price_level + rng.normal(0.0, 0.4, size=u))
    # Taste: 1-3 root categories (Gumbel top-k without replacement), plus a little of everything.
    root_share = np.array([s for _, s, _, _ in _TREE])
    keys = np.log(root_share)[None, :] + rng.gumbel(size=(u, n_roots))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    n_taste = rng.choice(3, size=(u, 1), p=(0.35, 0.4, 0.25)) + 1
    weights = np.where(rank < n_taste, rng.gamma(1.0, size=(u, n_roots)), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    taste = 0.88 * weights + 0.12 * (root_share / root_share.sum())[None, :]
    latent = (
        weights @ cat.root_latent
        + 0.8 * rng.normal(size=(u, _LATENT_DIM))
        + 0.6 * rng.normal(size=(len(_COUNTRIES), _LATENT_DIM))[country]
    ).astype(np.float32)
    return _Shoppers(country, device, activity, budget, taste, latent)


def _ids(prefix: str, count: int, width: int) -> npt.NDArray[np.str_]:
    digits = np.strings.zfill(np.arange(count).astype(np.str_), width)
    return np.strings.add(prefix, digits)


def generate_store(config: StoreConfig) -> Dataset:
    """A deterministic synthetic store: catalog, shoppers and ~90 days of sessions.

    Shoppers browse in sessions that drift within a leaf category (item-to-item
    structure), sometimes add to cart and buy, and after a purchase often move to
    a complementary category. Device and country shift which categories, brands
    and price levels they favour. Every event is on an item sold in the shopper's
    country; views of out-of-stock items are rare and never end in a cart or sale.
    """
    rng = np.random.default_rng(config.seed)
    cat = _build_catalog(config, rng)
    shoppers = _build_shoppers(config, cat, rng)
    user, item, ts, kind, device = _simulate(config, cat, shoppers, rng)
    country = shoppers.country[user]
    # Items are listed in category order, as a shop exports them (Dataset.clustered).
    return Dataset(
        name=f"{config.name}-{config.seed}",
        item_ids=_ids("sku-", config.n_items, 7),
        item_category=cat.leaf_ids[cat.item_leaf].astype(np.int32),
        item_brand=cat.item_brand.astype(np.int32),
        item_price=cat.item_price,
        item_in_stock=cat.item_in_stock,
        item_countries=cat.item_countries,
        category_names=cat.category_names,
        category_parent=cat.category_parent,
        brand_names=cat.brand_names,
        country_codes=tuple(c[0] for c in _COUNTRIES),
        base_currency="USD",
        currency_rates=dict(_CURRENCY_RATES),
        user_ids=_ids("user-", config.n_users, 6),
        user_country=shoppers.country.astype(np.int16),
        user_device=shoppers.device.astype(np.int8),
        ev_user=user.astype(np.int32),
        ev_item=item.astype(np.int32),
        ev_ts=ts,
        ev_type=kind,
        ev_device=device.astype(np.int8),
        ev_country=country.astype(np.int16),
        item_tags=_tags(config, cat),
        tag_names=TAG_NAMES,
    ).clustered()


TAG_NAMES = ("high_margin", "clearance")


def _tags(config: StoreConfig, cat: _Catalog) -> npt.NDArray[np.uint64]:
    """Merchandising tags, from a stream of their own (the rest of the store does not
    move): high_margin for about a quarter of items, most from brands with fat
    margins; clearance for about 4%, mostly slow sellers."""
    rng = np.random.default_rng([config.seed, 1])
    n = cat.item_brand.shape[0]
    brand_margin = rng.beta(2.0, 4.0, size=int(cat.item_brand.max()) + 1)
    margin = brand_margin[cat.item_brand] + rng.normal(0.0, 0.08, size=n)
    high = margin >= np.quantile(margin, 0.75)
    slow = cat.item_pop <= np.quantile(cat.item_pop, 0.3)
    clearance = rng.random(n) < np.where(slow, 0.1, 0.01)
    return (high.astype(np.uint64) << np.uint64(0)) | (clearance.astype(np.uint64) << np.uint64(1))


_Events = tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int8],
    npt.NDArray[np.int64],
]


def _simulate(
    config: StoreConfig, cat: _Catalog, shoppers: _Shoppers, rng: np.random.Generator
) -> _Events:
    """Sessions until there are n_events events, truncated to exactly that many and sorted."""
    n_countries, n_roots, n_leaves = len(_COUNTRIES), len(_TREE), cat.leaf_ids.size
    # Per-country sampling weights: popularity, brand appeal in that country
    # (home-region brands and a random per-country liking), availability, stock.
    country_region = np.array([_REGIONS.index(c[2]) for c in _COUNTRIES])
    brand_appeal = rng.lognormal(0.0, 0.5, size=(n_countries, cat.brand_region.size))
    brand_appeal *= np.where(cat.brand_region[None, :] == country_region[:, None], 2.0, 1.0)
    country_root = rng.lognormal(0.0, 0.35, size=(n_countries, n_roots))
    country_leaf = rng.lognormal(0.0, 0.3, size=(n_countries, n_leaves))
    device_latent = 0.5 * rng.normal(size=(4, _LATENT_DIM))
    device_root = np.ones((4, n_roots))
    for dev, mult in _DEVICE_ROOT_MULT.items():
        device_root[dev] = mult
    device_budget = np.ones(4)
    for dev, factor in _DEVICE_BUDGET.items():
        device_budget[dev] = factor
    order = np.argsort(cat.item_leaf, kind="stable")
    leaf_start = np.searchsorted(cat.item_leaf[order], np.arange(n_leaves))
    leaf_end = np.searchsorted(cat.item_leaf[order], np.arange(n_leaves), side="right")
    # Expected events per view: 1 + P(cart) * (1 + P(buy)); ~1.15.
    per_session = config.mean_session_steps * 1.15
    users_p = shoppers.activity / shoppers.activity.sum()

    chunks: list[tuple[npt.NDArray[np.int64], ...]] = []
    total, next_session = 0, 0
    while total < config.n_events:
        n_sessions = max(64, math.ceil((config.n_events - total) / per_session * 1.08))
        s_user = rng.choice(config.n_users, size=n_sessions, p=users_p).astype(np.int64)
        usual = shoppers.device[s_user]
        other = 1 + (usual - 1 + rng.integers(1, 3, size=n_sessions)) % 3
        s_device = np.where(rng.random(n_sessions) < config.usual_device_rate, usual, other)
        s_steps = np.minimum(rng.geometric(1.0 / config.mean_session_steps, n_sessions), 40)
        # Start times: uniform days, evening-heavy hours.
        hour_w = 1.0 + np.sin(np.linspace(-np.pi / 2, 3 * np.pi / 2, 24, endpoint=False)) ** 2
        hour_w[18:23] += 1.5
        s_start = (
            _START_TS
            + 86_400 * rng.integers(0, config.days, size=n_sessions)
            + 3_600 * rng.choice(24, size=n_sessions, p=hour_w / hour_w.sum())
            + rng.integers(0, 3_600, size=n_sessions)
        )
        s_country = shoppers.country[s_user]
        for c in range(n_countries):
            sess = np.flatnonzero(s_country == c)
            if sess.size == 0:
                continue
            weight = cat.item_pop * brand_appeal[c, cat.item_brand] * cat.item_countries[:, c]
            weight = (
                weight * np.where(cat.item_in_stock, 1.0, 0.05) * country_leaf[c, cat.item_leaf]
            )
            cum = np.cumsum(weight[order])
            chunk = _simulate_country(
                rng=rng,
                cat=cat,
                shoppers=shoppers,
                sess=sess,
                country=c,
                user=s_user[sess],
                device=s_device[sess],
                steps=s_steps[sess],
                start=s_start[sess],
                root_weight=shoppers.taste[s_user[sess]]
                * device_root[s_device[sess]]
                * country_root[c],
                leaf_weight=country_leaf[c],
                order=order,
                cum=cum,
                leaf_start=leaf_start,
                leaf_end=leaf_end,
                fallback=int(np.argmax(weight)),
                device_latent=device_latent,
                device_budget=device_budget,
                k=config.candidates_per_step,
            )
            chunks.append((chunk[0] + next_session, *chunk[1:]))
            total += chunk[0].size
        next_session += n_sessions

    sess_id, step, sub, user, item, ts, kind, device = (
        np.concatenate(col) for col in zip(*chunks, strict=True)
    )
    # Keep whole sessions in generation order (their times are random, so this
    # is an unbiased cut), then the first events of the last one.
    keep = np.lexsort((sub, step, sess_id))[: config.n_events]
    by_time = keep[np.argsort(ts[keep], kind="stable")]
    return (
        user[by_time],
        item[by_time],
        ts[by_time],
        kind[by_time].astype(np.int8),
        device[by_time],
    )


def _simulate_country(
    *,
    rng: np.random.Generator,
    cat: _Catalog,
    shoppers: _Shoppers,
    sess: npt.NDArray[np.int64],
    country: int,
    user: npt.NDArray[np.int64],
    device: npt.NDArray[np.int64],
    steps: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    root_weight: npt.NDArray[np.float64],
    leaf_weight: npt.NDArray[np.float64],
    order: npt.NDArray[np.int64],
    cum: npt.NDArray[np.float64],
    leaf_start: npt.NDArray[np.int64],
    leaf_end: npt.NDArray[np.int64],
    fallback: int,
    device_latent: npt.NDArray[np.float64],
    device_budget: npt.NDArray[np.float64],
    k: int,
) -> tuple[npt.NDArray[np.int64], ...]:
    """All sessions of one country's shoppers, one vectorised step at a time.

    Returns (session, step, sub-event, user, item, ts, type, device) columns.
    """
    m = sess.size
    leaf_in_root = cat.leaf_root[None, :] == np.arange(root_weight.shape[1])[:, None]  # (r, l)

    def leaf_of_root(roots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return _categorical(rng, leaf_in_root[roots] * leaf_weight[None, :])

    scale = 1.5 / math.sqrt(_LATENT_DIM)
    taste = shoppers.latent[user] + device_latent[device].astype(np.float32)
    budget = shoppers.budget[user] * device_budget[device]
    leaf = leaf_of_root(_categorical(rng, root_weight))
    prev_item = np.full(m, -1, dtype=np.int64)
    bought = np.zeros(m, dtype=bool)
    clock = start.astype(np.int64)
    cols: list[tuple[npt.NDArray[np.int64], ...]] = []
    for t in range(int(steps.max())):
        live = np.flatnonzero(steps > t)
        if live.size == 0:
            break
        if t > 0:
            # Drift: stay in the leaf, move to a sibling, jump to another root of
            # the shopper's taste; after a purchase, often a complementary leaf.
            lv = leaf[live]
            u = rng.random(live.size)
            sibling = leaf_of_root(cat.leaf_root[lv])
            jump = leaf_of_root(_categorical(rng, root_weight[live]))
            comp = cat.leaf_complement[lv]
            new = np.where(u < 0.6, lv, np.where(u < 0.87, sibling, jump))
            go_comp = bought[live] & (comp >= 0) & (rng.random(live.size) < 0.6)
            leaf[live] = np.where(go_comp, comp, new)
        lv = leaf[live]
        lo = np.where(leaf_start[lv] > 0, cum[np.maximum(leaf_start[lv] - 1, 0)], 0.0)
        hi = cum[np.maximum(leaf_end[lv] - 1, 0)]
        empty = (leaf_end[lv] <= leaf_start[lv]) | (hi <= lo)
        # Nothing of this leaf sells here: browse the whole country's catalog instead.
        lo = np.where(empty, 0.0, lo)
        hi = np.where(empty, cum[-1], hi)
        draws = lo[:, None] + rng.random((live.size, k)) * (hi - lo)[:, None]
        pos = _searchsorted(cum, draws)
        first = np.where(empty, 0, leaf_start[lv])[:, None]
        last = np.where(empty, cum.size - 1, leaf_end[lv] - 1)[:, None]
        cand = order[np.clip(pos, first, last)]
        # Score the candidates: shopper taste (shifted by device), similarity to
        # the previous item, and a steep penalty above the shopper's budget.
        vec = cat.item_latent[cand]  # (a, k, L)
        score = scale * np.einsum("akl,al->ak", vec, taste[live])
        prev = prev_item[live]
        has_prev = prev >= 0
        if has_prev.any():
            sim = np.einsum("akl,al->ak", vec, cat.item_latent[np.maximum(prev, 0)])
            score += np.where(has_prev[:, None], scale * sim, 0.0)
        over = np.log(cat.item_rel_price[cand] / budget[live, None])
        score -= 4.0 * np.maximum(over, 0.0)
        score += rng.gumbel(size=score.shape)
        pick = np.argmax(score, axis=1)
        item = cand[np.arange(live.size), pick]
        within = over[np.arange(live.size), pick] <= 0.0
        # Clamping at a leaf edge can land on an item not sold here; never emit it.
        item = np.where(cat.item_countries[item, country], item, fallback)
        stock = cat.item_in_stock[item]
        p_cart = np.where(within, 0.13, 0.03) * stock
        carted = rng.random(live.size) < p_cart
        buy = carted & (rng.random(live.size) < 0.45)
        view_ts = clock[live]
        cart_ts = view_ts + rng.integers(5, 60, size=live.size)
        buy_ts = cart_ts + rng.integers(30, 300, size=live.size)
        n_live = live.size
        for sub, kind, mask, when in (
            (0, VIEW, np.ones(n_live, dtype=bool), view_ts),
            (1, ADD_TO_CART, carted, cart_ts),
            (2, PURCHASE, buy, buy_ts),
        ):
            sel = np.flatnonzero(mask)
            cols.append(
                (
                    sess[live[sel]],
                    np.full(sel.size, t, dtype=np.int64),
                    np.full(sel.size, sub, dtype=np.int64),
                    user[live[sel]],
                    item[sel],
                    when[sel],
                    np.full(sel.size, kind, dtype=np.int64),
                    device[live[sel]],
                )
            )
        clock[live] = (
            np.where(buy, buy_ts, view_ts) + rng.exponential(50.0, n_live).astype(np.int64) + 5
        )
        prev_item[live] = item
        bought[live] = buy
    return tuple(np.concatenate(col) for col in zip(*cols, strict=True))
