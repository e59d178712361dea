"""The bench catalog: a synthetic store with clustered embeddings, written as a real artifact.

Attributes come from training.synthetic (categories, brands, prices, country
availability and stock, correlated as in a real shop). Embeddings are not
trained: each item is its leaf category's centre plus brand, availability-region
and price directions plus noise, so filters on category, country or budget pick
regions of the embedding space, which is what makes filtered ANN hard. Built
artifacts are cached by spec under ~/.cache/endcap/bench (ENDCAP_BENCH_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from benchmarks.options import INDEX_KINDS, LAYOUTS
from server.artifact import resolve, write_artifact
from server.domain.filters import pack
from server.infra.threads import faiss_threads
from training.ivf import sq8_ivf, train_ivf

# Bump when the generator changes: cached catalogs of another version are rebuilt.
GENERATOR_VERSION = 5
SEGMENT_SIZE = 200
PRICE_BUCKETS = 16


@dataclass(frozen=True, slots=True)
class CatalogSpec:
    """What to build; equal specs share one cached artifact."""

    n_items: int = 100_000
    dim: int = 64
    n_users: int = 20_000
    seed: int = 0
    index: str = "ivf_sq8"  # ivf_sq8 | ivf_flat | ivf_pq | flat
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(n_items)
    pq_m: int = 16  # IVF-PQ sub-quantizers (bytes per vector at 8 bits)
    build_threads: int = 0  # FAISS threads for the build; 0 = all cores
    layout: str = "category"  # category: rows in category order (as training exports) | shuffled

    def __post_init__(self) -> None:
        if self.n_items < 100:
            raise ValueError(f"n_items must be >= 100, got {self.n_items}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.dim % max(self.pq_m, 1) and self.index == "ivf_pq":
            raise ValueError(f"dim {self.dim} must be a multiple of pq_m {self.pq_m}")

    @property
    def key(self) -> str:
        body = asdict(self) | {"generator": GENERATOR_VERSION}
        body.pop("build_threads")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
        return f"n{self.n_items}-{self.index}-{digest}"

    @property
    def effective_nlist(self) -> int:
        return self.nlist or max(1, round(4 * math.sqrt(self.n_items)))


@dataclass(frozen=True, slots=True)
class BuiltCatalog:
    """A cached artifact root (LATEST inside) and what it cost to build."""

    spec: CatalogSpec
    root: Path
    generate_s: float
    index_build_s: float
    write_s: float
    embedding_bytes: int
    metadata_bytes: int
    index_bytes: int
    cached: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "root": str(self.root),
            "generate_s": round(self.generate_s, 3),
            "index_build_s": round(self.index_build_s, 3),
            "write_s": round(self.write_s, 3),
            "embedding_bytes": self.embedding_bytes,
            "metadata_bytes": self.metadata_bytes,
            "index_bytes": self.index_bytes,
            "cached": self.cached,
        }


def cache_root() -> Path:
    env = os.environ.get("ENDCAP_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "endcap" / "bench"


def ensure_catalog(spec: CatalogSpec, *, rebuild: bool = False) -> BuiltCatalog:
    """The cached artifact for `spec`, building it first if needed."""
    root = cache_root() / spec.key
    info = root / "build.json"
    if not rebuild and info.is_file():
        try:
            resolve(root)
            raw = json.loads(info.read_text())
            return BuiltCatalog(
                spec=spec,
                root=root,
                generate_s=float(raw["generate_s"]),
                index_build_s=float(raw["index_build_s"]),
                write_s=float(raw["write_s"]),
                embedding_bytes=int(raw["embedding_bytes"]),
                metadata_bytes=int(raw["metadata_bytes"]),
                index_bytes=int(raw["index_bytes"]),
                cached=True,
            )
        except Exception:
            pass
    shutil.rmtree(root, ignore_errors=True)
    built = build_catalog(spec, root)
    info.write_text(json.dumps(built.to_json(), indent=2) + "\n")
    return built


def build_catalog(spec: CatalogSpec, root: Path, *, version: str = "bench-v1") -> BuiltCatalog:
    """Generate the store, embed it, build the index and write the artifact under `root`."""
    t0 = time.perf_counter()
    arrays, meta = generate_arrays(spec)
    t1 = time.perf_counter()
    index = build_index(arrays["item_embeddings"], spec)
    t2 = time.perf_counter()
    path = write_artifact(
        root,
        model_version=version,
        dim=spec.dim,
        base_currency=meta["base_currency"],
        currency_rates=meta["currency_rates"],
        country_codes=meta["country_codes"],
        category_names=meta["category_names"],
        brand_names=meta["brand_names"],
        history_length=20,
        arrays=arrays,
        index=index,
        params={"bench": asdict(spec), "generator": GENERATOR_VERSION},
    )
    t3 = time.perf_counter()
    emb = arrays["item_embeddings"].nbytes
    meta_bytes = sum(
        a.nbytes
        for name, a in arrays.items()
        if name.startswith("item_") and name != "item_embeddings"
    )
    return BuiltCatalog(
        spec=spec,
        root=root,
        generate_s=t1 - t0,
        index_build_s=t2 - t1,
        write_s=t3 - t2,
        embedding_bytes=emb,
        metadata_bytes=meta_bytes,
        index_bytes=(path / "index.faiss").stat().st_size,
        cached=False,
    )


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: npt.NDArray[np.float32] = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def generate_arrays(spec: CatalogSpec) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """Every artifact array (server/artifact.py SCHEMA) plus the manifest vocabularies."""
    from training.synthetic import StoreConfig, generate_store

    # A few events only: the bench needs the catalog, not a trained model.
    ds = generate_store(
        StoreConfig(
            n_items=spec.n_items,
            n_users=max(spec.n_users // 10, 100),
            n_events=max(spec.n_users, 1_000),
            seed=spec.seed,
        )
    )
    if spec.layout == "shuffled":  # generate_store lists items in category order
        ds = ds.reordered(np.random.default_rng(spec.seed + 2).permutation(ds.n_items))
    rng = np.random.default_rng(spec.seed + 1)
    n, d = ds.n_items, spec.dim
    n_cat, n_brand, n_country = len(ds.category_names), len(ds.brand_names), len(ds.country_codes)
    parent = ds.category_parent.astype(np.int64)
    # Directions are scaled by norm, not per coordinate, so the structure (category
    # ~1, brand 0.3, availability region 0.3, price 0.15) dominates the noise (0.45).
    noise = 0.45 / math.sqrt(d)
    cat_centre = _unit(rng.normal(size=(n_cat, d)).astype(np.float32))
    leaves = np.flatnonzero(parent >= 0)
    cat_centre[leaves] = _unit(cat_centre[parent[leaves]] + 0.7 * cat_centre[leaves])
    brand_dir = (0.3 * _unit(rng.normal(size=(n_brand, d)).astype(np.float32))).astype(np.float32)
    country_dir = (0.3 * _unit(rng.normal(size=(n_country, d)).astype(np.float32))).astype(
        np.float32
    )
    price_dir = _unit(rng.normal(size=(1, d)).astype(np.float32))[0]
    cat = ds.item_category.astype(np.int64)
    countries = ds.item_countries.astype(np.float32)  # (n, c)
    region = countries @ country_dir / np.maximum(countries.sum(axis=1, keepdims=True), 1.0)
    log_price = np.log(ds.item_price)
    leaf_mean = np.bincount(cat, weights=log_price, minlength=n_cat) / np.maximum(
        np.bincount(cat, minlength=n_cat), 1
    )
    rel_price = (log_price - leaf_mean[cat]).astype(np.float32)
    emb = np.empty((n, d), dtype=np.float32)
    step = 200_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = (
            cat_centre[cat[lo:hi]]
            + brand_dir[ds.item_brand[lo:hi]]
            + region[lo:hi]
            + 0.15 * rel_price[lo:hi, None] * price_dir[None, :]
            + noise * rng.standard_normal(size=(hi - lo, d), dtype=np.float32)
        )
        emb[lo:hi] = _unit(block)

    # Shoppers: a taste over 1-3 leaves, a home country, history from their leaves.
    u = spec.n_users
    user_country = rng.integers(0, n_country, size=u)
    n_taste = rng.integers(1, 4, size=u)
    taste_leaf = leaves[rng.integers(0, leaves.size, size=(u, 3))]
    weight = (np.arange(3)[None, :] < n_taste[:, None]).astype(np.float32)
    weight /= weight.sum(axis=1, keepdims=True)
    user_emb = (
        np.einsum("uk,ukd->ud", weight, cat_centre[taste_leaf])
        + country_dir[user_country]
        + (0.4 / math.sqrt(d)) * rng.standard_normal(size=(u, d), dtype=np.float32)
    ).astype(np.float32)
    order = np.argsort(cat, kind="stable")
    starts = np.searchsorted(cat[order], np.arange(n_cat))
    ends = np.searchsorted(cat[order], np.arange(n_cat), side="right")
    hist_len = rng.integers(0, 21, size=u)
    indptr = np.zeros(u + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(hist_len)
    pick_leaf = taste_leaf[np.repeat(np.arange(u), hist_len), rng.integers(0, 3, indptr[-1])]
    span = np.maximum(ends[pick_leaf] - starts[pick_leaf], 1)
    offset = (rng.random(int(indptr[-1])) * span).astype(np.int64)
    history = order[np.minimum(starts[pick_leaf] + offset, n - 1)]

    popularity = np.power(1.0 + rng.permutation(n), -0.9).astype(np.float32)
    pop_order = np.argsort(-popularity, kind="stable")
    seg_items = np.full((n_country + 1, 4, SEGMENT_SIZE), -1, dtype=np.int32)
    seg_scores = np.zeros((n_country + 1, 4, SEGMENT_SIZE), dtype=np.float32)
    head = pop_order[: max(SEGMENT_SIZE * 40, 1)]
    for c in range(n_country + 1):
        ships = head if c == n_country else head[ds.item_countries[head, c]]
        for dev in range(4):
            jitter = popularity[ships] * rng.lognormal(0.0, 0.3, size=ships.size)
            top = ships[np.argsort(-jitter, kind="stable")][:SEGMENT_SIZE]
            seg_items[c, dev, : top.size] = top
            seg_scores[c, dev, : top.size] = popularity[top]

    edges = np.quantile(ds.item_price, np.linspace(0, 1, PRICE_BUCKETS + 1)[1:-1])
    tower_price = (
        0.3 * np.linspace(-1.5, 1.5, PRICE_BUCKETS, dtype=np.float32)[:, None] * price_dir[None, :]
    )
    arrays: dict[str, npt.NDArray[Any]] = {
        "item_ids": ds.item_ids.astype(np.str_),
        "item_category": ds.item_category.astype(np.int32),
        "item_brand": ds.item_brand.astype(np.int32),
        "item_price": ds.item_price.astype(np.float64),
        "item_in_stock": ds.item_in_stock.astype(np.bool_),
        "item_country_bits": np.stack([pack(col) for col in ds.item_countries.T]),
        "category_parent": ds.category_parent.astype(np.int32),
        "item_embeddings": emb,
        "item_tower_category": cat_centre.astype(np.float32),
        "item_tower_brand": brand_dir,
        "item_tower_price": tower_price.astype(np.float32),
        "price_bucket_edges": edges.astype(np.float64),
        "user_ids": np.strings.add("user-", np.strings.zfill(np.arange(u).astype(np.str_), 7)),
        "user_embeddings": user_emb,
        "user_history_indptr": indptr,
        "user_history_items": history.astype(np.int32),
        "history_projection": (0.5 * np.eye(d)).astype(np.float32),
        "context_device": (0.1 * _unit(rng.normal(size=(4, d)).astype(np.float32))).astype(
            np.float32
        ),
        "context_country": np.vstack([country_dir, np.zeros((1, d), np.float32)]).astype(
            np.float32
        ),
        "item_popularity": popularity,
        "segment_top_items": seg_items,
        "segment_top_scores": seg_scores,
    }
    meta: dict[str, Any] = {
        "base_currency": ds.base_currency,
        "currency_rates": dict(ds.currency_rates),
        "country_codes": tuple(ds.country_codes),
        "category_names": tuple(ds.category_names),
        "brand_names": tuple(ds.brand_names),
        "user_country": user_country,
    }
    return arrays, meta


def build_index(embeddings: npt.NDArray[np.float32], spec: CatalogSpec) -> faiss.Index:
    """Inner-product index over the item vectors; ids are item rows."""
    d = int(embeddings.shape[1])
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    with faiss_threads(spec.build_threads or os.cpu_count() or 1):
        index: faiss.Index
        if spec.index == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = spec.effective_nlist
            quantizer = faiss.IndexFlatIP(d)
            if spec.index == "ivf_pq":
                index = faiss.IndexIVFPQ(
                    quantizer, d, nlist, spec.pq_m, 8, faiss.METRIC_INNER_PRODUCT
                )
            elif spec.index == "ivf_sq8":
                index = sq8_ivf(quantizer, d, nlist)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            train_ivf(index, x, spec.seed)
            index.nprobe = 32
        index.add(x)
    return index
