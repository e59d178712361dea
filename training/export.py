"""Turn a trained model and its dataset into a server artifact (server/artifact.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from server.artifact import write_artifact
from server.infra.threads import faiss_threads
from training.data import ADD_TO_CART, PURCHASE, Dataset
from training.ivf import sq8_ivf, train_ivf
from training.protocol import Part
from training.sequential import ITEM_EMBEDDINGS, SequentialModel
from training.train import TrainedModel, collapse_events, last_items

logger = logging.getLogger(__name__)

FLAT_INDEX_MAX_ITEMS = 20_000  # below this an exact scan is fast enough to need no IVF
IVF_NPROBE = 64  # stored default (~0.98 recall@10 vs exact on the demo); servers override it
N_DEVICES = 4


def export_artifact(
    dataset: Dataset,
    model: TrainedModel,
    root: Path,
    *,
    model_version: str | None = None,
    segment_size: int = 500,
    half_life_days: float = 14.0,
    threads: int | None = None,
    extra_params: Mapping[str, Any] | None = None,
    make_latest: bool = True,
) -> Path:
    """Write `model` as a new artifact version under `root`; returns its directory.

    Popularity is time-decayed (weight halves every `half_life_days` before the
    last event) and weighted by event type as in training. `threads` caps FAISS
    OpenMP threads while the index is built (default: the training threads).
    """
    if segment_size < 1:
        raise ValueError(f"segment_size must be >= 1, got {segment_size}")
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    config = model.config
    if model.item_embeddings.shape[0] != dataset.n_items:
        raise ValueError(
            f"model has {model.item_embeddings.shape[0]} items, dataset {dataset.n_items}"
        )
    began = time.perf_counter()
    weights = _decayed_weights(dataset, config.event_weights, half_life_days)
    popularity = np.bincount(dataset.ev_item, weights=weights, minlength=dataset.n_items)
    top_items, top_scores = segment_top(dataset, weights, segment_size)
    history_indptr, history_items = last_items(
        collapse_events(dataset, config.event_weights), config.history_length
    )
    arrays: dict[str, npt.NDArray[Any]] = {
        "item_ids": dataset.item_ids.astype(np.str_),
        "item_category": dataset.item_category.astype(np.int32),
        "item_brand": dataset.item_brand.astype(np.int32),
        "item_price": dataset.item_price.astype(np.float64),
        "item_in_stock": dataset.item_in_stock.astype(np.bool_),
        "item_country_bits": pack_item_bits(dataset.item_countries.T),
        "category_parent": dataset.category_parent.astype(np.int32),
        "item_embeddings": model.item_embeddings,
        "item_tower_category": model.item_tower_category,
        "item_tower_brand": model.item_tower_brand,
        "item_tower_price": model.item_tower_price,
        "price_bucket_edges": model.price_bucket_edges,
        "user_ids": dataset.user_ids.astype(np.str_),
        "user_embeddings": model.user_embeddings,
        "user_history_indptr": history_indptr,
        "user_history_items": history_items,
        "history_projection": model.history_projection,
        "context_device": model.context_device,
        "context_country": model.context_country,
        "item_popularity": popularity.astype(np.float32),
        "segment_top_items": top_items,
        "segment_top_scores": top_scores,
    }
    arrays.update(purchase_stats(dataset))
    arrays.update(copurchase(dataset))
    if dataset.item_tags is not None:
        arrays["item_tags"] = dataset.item_tags.astype(np.uint64)
    index = build_index(model.item_embeddings, threads=threads or config.threads, seed=config.seed)
    version = model_version or _new_version(dataset, model)
    params: dict[str, Any] = config.to_dict()
    params.update(extra_params or {})
    metrics: dict[str, Any] = dict(model.metrics)
    metrics.update({f"popularity_{k}": v for k, v in model.baseline_metrics.items()})
    metrics.update({f"history_only_{k}": v for k, v in model.history_only_metrics.items()})
    metrics.update(
        best_epoch=model.best_epoch,
        validation_users=model.n_validation_users,
        train_examples=model.n_train_examples,
        train_seconds=round(model.seconds, 3),
    )
    path = write_artifact(
        root,
        model_version=version,
        dim=model.dim,
        base_currency=dataset.base_currency,
        currency_rates=dataset.currency_rates,
        country_codes=tuple(dataset.country_codes),
        category_names=tuple(dataset.category_names),
        brand_names=tuple(dataset.brand_names),
        history_length=config.history_length,
        arrays=arrays,
        index=index,
        params=params,
        metrics=metrics,
        data_fingerprint=dataset.fingerprint(),
        make_latest=make_latest,
        tag_names=dataset.tag_names if dataset.item_tags is not None else (),
    )
    logger.info(
        "wrote artifact %s (%s, %d items) in %.1fs",
        path,
        type(index).__name__,
        dataset.n_items,
        time.perf_counter() - began,
    )
    return path


def pack_item_bits(rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """uint64 (r, ceil(n/64)) from bool (r, n): bit i of word j is column 64*j + i."""
    n_rows, n = rows.shape
    words = (n + 63) // 64
    padded = np.zeros((n_rows, words * 64), dtype=np.bool_)
    padded[:, :n] = rows
    # Little bit order within a byte plus little-endian bytes within a word
    # puts column 64*j + i at bit i of word j.
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def _decayed_weights(
    dataset: Dataset, event_weights: tuple[float, float, float], half_life_days: float
) -> npt.NDArray[np.float64]:
    """float64 (e,): event-type weight halved every half_life_days before the last event."""
    if dataset.n_events == 0:
        return np.zeros(0)
    age_days = (int(dataset.ev_ts.max()) - dataset.ev_ts).astype(np.float64) / 86_400.0
    type_weight = np.asarray(event_weights, dtype=np.float64)[dataset.ev_type]
    return type_weight * np.exp2(-age_days / half_life_days)


def segment_top(
    dataset: Dataset, weights: npt.NDArray[np.float64], size: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """(items int32, scores float32), each (c+1, 4, size): bestsellers per (country, device).

    Row c (one past the last country) pools all countries and device 0 pools
    all devices, so [c, 0] is catalog-wide. Items with no weight in a segment
    are left out: -1 and 0.0 pad the short lists.
    """
    n_countries = len(dataset.country_codes)
    items = np.full((n_countries + 1, N_DEVICES, size), -1, dtype=np.int32)
    scores = np.zeros((n_countries + 1, N_DEVICES, size), dtype=np.float32)
    in_country = [dataset.ev_country == c for c in range(n_countries)]
    on_device = [dataset.ev_device == d for d in range(N_DEVICES)]
    for c in range(n_countries + 1):
        for d in range(N_DEVICES):
            mask: npt.NDArray[np.bool_] | None = None
            if c < n_countries:
                mask = in_country[c]
            if d > 0:
                mask = on_device[d] if mask is None else mask & on_device[d]
            segment = np.bincount(
                dataset.ev_item if mask is None else dataset.ev_item[mask],
                weights=weights if mask is None else weights[mask],
                minlength=dataset.n_items,
            ).astype(np.float64)
            top = _top(segment, size)
            items[c, d, : top.size] = top
            scores[c, d, : top.size] = segment[top]
    return items, scores


def purchase_stats(dataset: Dataset) -> dict[str, npt.NDArray[Any]]:
    """Per user: orders, money spent (base currency) and last purchase time (RFM)."""
    bought = dataset.ev_type == PURCHASE
    users = dataset.ev_user[bought]
    orders = np.bincount(users, minlength=dataset.n_users).astype(np.int32)
    spent = np.bincount(
        users, weights=dataset.item_price[dataset.ev_item[bought]], minlength=dataset.n_users
    )
    last = np.zeros(dataset.n_users, dtype=np.float64)
    np.maximum.at(last, users, dataset.ev_ts[bought].astype(np.float64))
    return {"user_orders": orders, "user_monetary": spent, "user_last_purchase_s": last}


def copurchase(
    dataset: Dataset, *, per_item: int = 20, max_lag: int = 3, window_s: int = 7 * 86_400
) -> dict[str, npt.NDArray[Any]]:
    """ "Customers also bought": for each item, the items carted or bought by the same
    shopper within `window_s` and `max_lag` steps of it, most frequent first (CSR)."""
    n = dataset.n_items
    intent = dataset.ev_type >= ADD_TO_CART
    order = np.lexsort((dataset.ev_ts[intent], dataset.ev_user[intent]))
    user = dataset.ev_user[intent][order].astype(np.int64)
    item = dataset.ev_item[intent][order].astype(np.int64)
    ts = dataset.ev_ts[intent][order]
    codes = []
    for lag in range(1, max_lag + 1):
        same = (user[lag:] == user[:-lag]) & (ts[lag:] - ts[:-lag] <= window_s)
        same &= item[lag:] != item[:-lag]
        a, b = item[:-lag][same], item[lag:][same]
        codes += [a * n + b, b * n + a]  # both directions: a pair is bought together
    if not codes:
        return {
            "copurchase_indptr": np.zeros(n + 1, dtype=np.int64),
            "copurchase_items": np.zeros(0, dtype=np.int32),
            "copurchase_scores": np.zeros(0, dtype=np.float32),
        }
    pairs, counts = np.unique(np.concatenate(codes), return_counts=True)
    src, dst = pairs // n, pairs % n
    rank = np.lexsort((dst, -counts, src))  # per source item: most frequent first
    src, dst, counts = src[rank], dst[rank], counts[rank]
    starts = np.searchsorted(src, np.arange(n + 1))
    position = np.arange(src.size) - starts[src]
    keep = position < per_item
    src, dst, counts = src[keep], dst[keep], counts[keep]
    indptr = np.searchsorted(src, np.arange(n + 1)).astype(np.int64)
    return {
        "copurchase_indptr": indptr,
        "copurchase_items": dst.astype(np.int32),
        "copurchase_scores": counts.astype(np.float32),
    }


def _top(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.int64]:
    """Indexes of the k highest positive scores, best first, ties to the smaller index."""
    positive = np.flatnonzero(scores > 0)
    if positive.size > k:
        # Partition first so the exact sort touches only k plus the ties at the edge.
        kth = np.partition(scores[positive], positive.size - k)[positive.size - k]
        positive = positive[scores[positive] >= kth]
    order = np.lexsort((positive, -scores[positive]))
    return positive[order][:k]


def build_index(
    embeddings: npt.NDArray[np.float32], *, threads: int = 1, seed: int = 0
) -> faiss.Index:
    """Inner-product FAISS index over item vectors; ids are item indexes.

    Exact (IndexFlatIP) below FLAT_INDEX_MAX_ITEMS items, else an IVF with
    ~4*sqrt(n) lists trained on a sample of the items, holding 8-bit scalar codes
    (64 B per 64-d vector instead of a second float copy of the embeddings: the
    server rescores what it fetches from the embeddings, with the recall of
    IVF-Flat; benchmarks/README.md).
    """
    n, dim = embeddings.shape
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    with faiss_threads(threads):
        index: faiss.Index
        if n < FLAT_INDEX_MAX_ITEMS:
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = round(4 * math.sqrt(n))
            index = sq8_ivf(faiss.IndexFlatIP(dim), dim, nlist)
            train_ivf(index, vectors, seed)
            index.nprobe = IVF_NPROBE
        index.add(vectors)
    return index


def _new_version(dataset: Dataset, model: TrainedModel) -> str:
    """v<UTC timestamp>-<6 hex>: sorts by time, unique even for two exports in one second."""
    now = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256()
    digest.update(dataset.fingerprint().encode())
    digest.update(model.item_embeddings.tobytes())
    digest.update(str(time.time_ns()).encode())
    return f"v{now:%Y%m%dT%H%M%SZ}-{digest.hexdigest()[:6]}"


def export_sequential(
    model: SequentialModel,
    root: Path,
    *,
    item_ids: Sequence[str],
    user_ids: Sequence[str],
    histories: Part,
    model_version: str | None = None,
    segment_size: int = 500,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    make_latest: bool = True,
) -> Path:
    """Write a sequential model as an artifact whose query encoder is the model's.

    For interaction data without a catalog (ML-100K): one category, one brand,
    price 0, every item in stock, no countries. `histories` (users as
    `user_ids`, item indexes, oldest first) become the trained histories (the
    last max_len items each) and the popularity counts; user, projection and
    context rows are zero, so the query is the encoder's output alone.
    """
    config = model.config
    table = np.ascontiguousarray(model.weights[ITEM_EMBEDDINGS], dtype=np.float32)
    n, dim = table.shape
    if len(item_ids) != n or len(user_ids) != histories.n_users:
        raise ValueError(
            f"expected {n} item ids and {histories.n_users} user ids, "
            f"got {len(item_ids)} and {len(user_ids)}"
        )
    lengths = histories.lengths()
    keep = np.minimum(lengths, config.max_len)
    pos = np.arange(len(histories)) - np.repeat(histories.indptr[:-1], lengths)
    recent = pos >= np.repeat(lengths - keep, lengths)
    counts = np.bincount(histories.items, minlength=n).astype(np.float64)
    top = _top(counts, segment_size)
    top_items = np.full((1, N_DEVICES, segment_size), -1, dtype=np.int32)
    top_scores = np.zeros((1, N_DEVICES, segment_size), dtype=np.float32)
    top_items[:, :, : top.size] = top
    top_scores[:, :, : top.size] = counts[top]
    zeros = np.zeros((1, dim), dtype=np.float32)
    arrays: dict[str, npt.NDArray[Any]] = {
        "item_ids": np.asarray(item_ids, dtype=np.str_),
        "item_category": np.zeros(n, dtype=np.int32),
        "item_brand": np.zeros(n, dtype=np.int32),
        "item_price": np.zeros(n, dtype=np.float64),
        "item_in_stock": np.ones(n, dtype=np.bool_),
        "item_country_bits": pack_item_bits(np.zeros((0, n), dtype=np.bool_)),
        "category_parent": np.full(1, -1, dtype=np.int32),
        "item_embeddings": table,
        "item_tower_category": zeros,
        "item_tower_brand": zeros,
        "item_tower_price": zeros,
        "price_bucket_edges": np.zeros(0, dtype=np.float64),
        "user_ids": np.asarray(user_ids, dtype=np.str_),
        "user_embeddings": np.zeros((histories.n_users, dim), dtype=np.float32),
        "user_history_indptr": np.concatenate([[0], np.cumsum(keep)]).astype(np.int64),
        "user_history_items": histories.items[recent].astype(np.int32),
        "history_projection": np.zeros((dim, dim), dtype=np.float32),
        "context_device": np.zeros((N_DEVICES, dim), dtype=np.float32),
        "context_country": zeros,
        "item_popularity": counts.astype(np.float32),
        "segment_top_items": top_items,
        "segment_top_scores": top_scores,
    }
    encoder = {
        "kind": "sequential",
        "layers": config.layers,
        "heads": config.heads,
        "inner": config.inner,
        "max_len": config.max_len,
    }
    weights = {k: v for k, v in model.weights.items() if k != ITEM_EMBEDDINGS}
    if model_version is None:
        digest = hashlib.sha256(table.tobytes() + str(time.time_ns()).encode()).hexdigest()
        model_version = f"v{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{digest[:6]}"
    return write_artifact(
        root,
        model_version=model_version,
        dim=dim,
        base_currency="USD",
        currency_rates={"USD": 1.0},
        country_codes=(),
        category_names=("all",),
        brand_names=("",),
        history_length=config.max_len,
        arrays=arrays,
        index=build_index(table, threads=config.threads, seed=0),
        params={"model": "sequential", **dataclasses.asdict(config), **(params or {})},
        metrics={"best_epoch": model.best_epoch, "valid_ndcg@10": model.valid_ndcg10}
        | dict(metrics or {}),
        encoder=encoder,
        encoder_weights=weights,
        make_latest=make_latest,
    )
