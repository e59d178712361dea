"""`endcap evaluate`: the PROTOCOL.md split on any Dataset, endcap's model against baselines.

On a Dataset (the synthetic store or a shop's files) each shopper's first
interaction with each item is one protocol interaction; the per-user temporal
80/10/10 split, full ranking over every item and the metrics are those of
shared/eval/PROTOCOL.md (training.protocol). The two-tower model trains only
on events before each shopper's first validation interaction, and is scored
from numpy arrays with the server's query formula (server/artifact.py SCHEMA):
q = user + P @ mean(history) + device + country. Serving fidelity scores the
same queries through the exported artifact and its FAISS index.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from training.data import DEVICE_NAMES, Dataset
from training.protocol import Part, Phase, ScoreFn, Split, temporal_split
from training.train import TrainConfig, TrainedModel, collapse_events, last_items

if TYPE_CHECKING:
    from rich.console import Console

    from server.artifact import Artifact

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
REPORT_METRICS = ("recall@10", "ndcg@10", "hit@10", "recall@50", "coverage@10", "pop_pct@10")
# Scores held at once while ranking (float32): 64 MB.
_RANK_BUDGET = 1 << 24
EASE_MAX_ITEMS = 5_000  # EASE inverts an items x items matrix


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """What `evaluate_dataset` trains and measures."""

    train: TrainConfig = field(default_factory=TrainConfig)
    ks: tuple[int, ...] = (10, 50)
    baselines: tuple[str, ...] = ("MostPop", "SegmentPop", "ALS", "EASE")
    als_iterations: int = 5
    context_ablation: bool = True
    cold_start: bool = True
    cold_item_fraction: float = 0.05
    new_user_fraction: float = 0.05
    new_user_targets: int = 5  # next distinct items a new shopper is scored on
    fidelity: bool = True
    fidelity_users: int | None = 50_000  # test shoppers queried through FAISS (sampled above)
    bestseller_list: int = 20
    placements: bool = True  # replay held-out shopping through the Engine per placement
    placement_cases: int = 1_000  # sampled cases per placement
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        for name in ("cold_item_fraction", "new_user_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        known = {"MostPop", "SegmentPop", "ALS", "EASE"}
        unknown = sorted(set(self.baselines) - known)
        if unknown:
            raise ValueError(f"baselines must be among {sorted(known)}, got {unknown}")


# ---- the protocol split of a Dataset --------------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolData:
    """A Dataset cut by the protocol, with what the two-tower model needs around it.

    split        over items 0..n-1 (= dataset item indexes) and the users that
                 have events; split user j is dataset user `users[j]`
    device, country  int64 (u,) per phase: the context of each user's first
                 ground-truth interaction (the request context at that time);
                 country len(country_codes) = unknown
    train_events bool (e,): dataset events before each user's first valid
                 interaction (what models may learn from)
    history_events  per phase, bool (e,): events a model may read as input
    """

    dataset: Dataset
    split: Split
    users: npt.NDArray[np.int64]
    device: dict[str, npt.NDArray[np.int64]]
    country: dict[str, npt.NDArray[np.int64]]
    train_events: npt.NDArray[np.bool_]
    history_events: dict[str, npt.NDArray[np.bool_]]
    part_device: dict[str, npt.NDArray[np.int64]]  # per part row ("train", ...)
    part_country: dict[str, npt.NDArray[np.int64]]

    def subset(self, events: npt.NDArray[np.bool_]) -> Dataset:
        """The dataset with only the flagged events (still time-sorted)."""
        return restrict_events(self.dataset, events)


def restrict_events(dataset: Dataset, keep: npt.NDArray[np.bool_]) -> Dataset:
    """`dataset` with only the events where `keep` is True."""
    return dataclasses.replace(
        dataset,
        ev_user=dataset.ev_user[keep],
        ev_item=dataset.ev_item[keep],
        ev_ts=dataset.ev_ts[keep],
        ev_type=dataset.ev_type[keep],
        ev_device=dataset.ev_device[keep],
        ev_country=dataset.ev_country[keep],
    )


def protocol_data(dataset: Dataset, event_weights: tuple[float, float, float]) -> ProtocolData:
    """Split `dataset` as PROTOCOL.md does, on each shopper's first interaction per item."""
    inter = collapse_events(dataset, event_weights)
    n_items = dataset.n_items
    key = inter.user * n_items + inter.item
    _, first = np.unique(key, return_index=True)
    first.sort()  # rows stay grouped by user, oldest first
    d_user, d_item, d_ts = inter.user[first], inter.item[first], inter.ts[first]
    d_dev, d_cty = inter.device[first], inter.country[first]
    split = temporal_split(d_user, d_item, d_ts, np.arange(n_items, dtype=np.int64))
    users = split.user_ids
    # The protocol's row order (user, timestamp, item), to line extra columns up with its parts.
    uidx = np.searchsorted(users, d_user)
    order = np.lexsort((d_item, d_ts, uidx))
    u_sorted = uidx[order]
    start = np.concatenate([[0], np.cumsum(np.bincount(u_sorted, minlength=users.size))])[:-1]
    pos = np.arange(order.size) - start[u_sorted]
    n_train = split.train.lengths()[u_sorted]
    n_valid = split.valid.lengths()[u_sorted]
    which = (pos >= n_train).astype(np.int8) + (pos >= n_train + n_valid).astype(np.int8)
    part_device: dict[str, npt.NDArray[np.int64]] = {}
    part_country: dict[str, npt.NDArray[np.int64]] = {}
    parts = {"train": split.train, "valid": split.valid, "test": split.test}
    for code, (name, part) in enumerate(parts.items()):
        rows = order[which == code]
        if not np.array_equal(d_item[rows], part.items):
            raise AssertionError(f"protocol row order mismatch in {name}")
        part_device[name], part_country[name] = d_dev[rows], d_cty[rows]
    unknown_country = len(dataset.country_codes)
    device: dict[str, npt.NDArray[np.int64]] = {}
    country: dict[str, npt.NDArray[np.int64]] = {}
    for phase in ("valid", "test"):
        truth = parts[phase]
        has = truth.lengths() > 0
        first_row = np.minimum(truth.indptr[:-1], max(len(truth) - 1, 0))
        dev = np.zeros(users.size, dtype=np.int64)
        cty = np.full(users.size, unknown_country, dtype=np.int64)
        if len(truth):
            dev[has] = part_device[phase][first_row[has]]
            cty[has] = part_country[phase][first_row[has]]
        device[phase], country[phase] = dev, cty
    # Event cut: a raw event is the shopper's past at phase p if its (user, item)
    # first appeared in an earlier part and it happened no later than the
    # shopper's first phase-p interaction.
    part_of_key = np.empty(first.size, dtype=np.int8)
    part_of_key[order] = which
    keys_sorted = key[first]
    key_order = np.argsort(keys_sorted, kind="stable")
    ev_key = dataset.ev_user.astype(np.int64) * n_items + dataset.ev_item
    at = key_order[np.searchsorted(keys_sorted[key_order], ev_key)]
    ev_part = part_of_key[at]
    ev_uidx = np.searchsorted(users, dataset.ev_user)
    history: dict[str, npt.NDArray[np.bool_]] = {}
    for code, phase in ((1, "valid"), (2, "test")):
        truth = parts[phase]
        cut = np.full(users.size, np.iinfo(np.int64).max, dtype=np.int64)
        has = truth.lengths() > 0
        cut[has] = truth.timestamps[truth.indptr[:-1][has]]
        history[phase] = (ev_part < code) & (dataset.ev_ts <= cut[ev_uidx])
    return ProtocolData(
        dataset=dataset,
        split=split,
        users=users,
        device=device,
        country=country,
        train_events=history["valid"],
        history_events=history,
        part_device=part_device,
        part_country=part_country,
    )


# ---- ranking and metrics (PROTOCOL.md, as training.protocol.evaluate) --------------


def popularity_percentile(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Mid-rank percentile of each item's train count: 0 least, 1 most popular."""
    n = counts.shape[0]
    ordered = np.sort(counts)
    below = np.searchsorted(ordered, counts, side="left")
    equal = np.searchsorted(ordered, counts, side="right") - below
    result: npt.NDArray[np.float64] = (below + 0.5 * (equal - 1)) / max(n - 1, 1)
    return result


def csr_rows(
    indptr: npt.NDArray[np.int64], values: Array, rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], Array]:
    """The (indptr, values) of some rows of a CSR array."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    out = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    idx = np.repeat(starts - out[:-1], counts) + np.arange(int(out[-1]))
    return out, values[idx]


def top_k(
    scores: npt.NDArray[np.floating[Any]],
    exclude_indptr: npt.NDArray[np.int64],
    exclude_items: Array,
    k: int,
) -> npt.NDArray[np.int64]:
    """int64 (b, k): top-k columns per row by score, ties to the smaller index, excluded
    columns (CSR) never chosen; -1 pads rows with fewer than k candidates.

    The same lists as training.protocol.top_k, without sorting whole rows.
    """
    b, n = scores.shape
    masked = np.array(scores, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(b), np.diff(exclude_indptr))
    masked[rows, exclude_items] = -np.inf
    kk = min(k, n)
    part = np.argpartition(-masked, kk - 1, axis=1)[:, :kk]
    vals = np.take_along_axis(masked, part, axis=1)
    kth = vals.min(axis=1)
    ties = (masked >= kth[:, None]).sum(axis=1)
    order = np.lexsort((part, -vals), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    for r in np.flatnonzero(ties > kk):
        # More items tie at the k-th score than fit: the smaller indexes win.
        cand = np.flatnonzero(masked[r] >= kth[r])
        top[r] = cand[np.lexsort((cand, -masked[r, cand]))][:kk]
    picked = np.take_along_axis(masked, top, axis=1)
    top = np.where(np.isneginf(picked), -1, top)
    if kk < k:
        top = np.concatenate([top, np.full((b, k - kk), -1, dtype=np.int64)], axis=1)
    return top.astype(np.int64)


@dataclass(frozen=True, slots=True)
class Ranked:
    """Top lists of the evaluated users of one phase.

    users int64 (m,) split user indexes; top int64 (m, K), -1 padded.
    """

    users: npt.NDArray[np.int64]
    top: npt.NDArray[np.int64]


def rank(
    score: ScoreFn,
    split: Split,
    phase: Phase,
    k: int,
    *,
    users: npt.NDArray[np.int64] | None = None,
    batch_size: int | None = None,
) -> Ranked:
    """Each user's top-k over all items minus their history (PROTOCOL.md candidates)."""
    history, truth = split.history(phase), split.ground_truth(phase)
    if users is None:
        users = np.flatnonzero(truth.lengths() > 0).astype(np.int64)
    n = split.n_items
    batch = batch_size or max(1, min(1024, _RANK_BUDGET // max(n, 1)))
    tops = [np.zeros((0, k), dtype=np.int64)]
    for lo in range(0, users.size, batch):
        chunk = users[lo : lo + batch]
        scores = np.asarray(score(chunk))
        if scores.shape != (chunk.size, n):
            raise ValueError(f"score must return shape ({chunk.size}, {n}), got {scores.shape}")
        if np.isnan(scores).any():
            raise ValueError("score returned NaN")
        ptr, seen = csr_rows(history.indptr, history.items, chunk)
        tops.append(top_k(scores, ptr, seen, k))
    return Ranked(users=users, top=np.concatenate(tops))


def per_user_metrics(
    ranked: Ranked, truth: Part, ks: Sequence[int]
) -> dict[str, npt.NDArray[np.float64]]:
    """recall@K, ndcg@K, hit@K of each ranked user against `truth` (PROTOCOL.md)."""
    users, top = ranked.users, ranked.top
    max_k = top.shape[1]
    ptr, items = csr_rows(truth.indptr, truth.items, users)
    n_truth = np.diff(ptr).astype(np.float64)
    row = np.repeat(np.arange(users.size, dtype=np.int64), np.diff(ptr))
    n = np.int64(max(int(top.max(initial=0)), int(items.max(initial=0))) + 1)
    truth_keys = np.sort(row * n + items)
    top_keys = np.arange(users.size, dtype=np.int64)[:, None] * n + top
    hits = np.isin(top_keys, truth_keys) & (top >= 0)
    discount = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))
    ideal = np.cumsum(discount)
    out: dict[str, npt.NDArray[np.float64]] = {}
    safe = np.maximum(n_truth, 1.0)
    for k in ks:
        hk = hits[:, :k]
        n_hit = hk.sum(axis=1)
        idcg = ideal[np.clip(np.minimum(n_truth, k).astype(np.int64) - 1, 0, None)]
        out[f"recall@{k}"] = n_hit / safe
        out[f"ndcg@{k}"] = (hk * discount[:k]).sum(axis=1) / idcg
        out[f"hit@{k}"] = (n_hit > 0).astype(np.float64)
    return out


def aggregate(
    ranked: Ranked,
    per_user: Mapping[str, npt.NDArray[np.float64]],
    ks: Sequence[int],
    pop_pct: npt.NDArray[np.float64],
    n_items: int,
    mask: npt.NDArray[np.bool_] | None = None,
) -> dict[str, float]:
    """Means over users (or the masked ones), plus coverage@K and pop_pct@K of their lists."""
    take = np.ones(ranked.users.size, dtype=np.bool_) if mask is None else mask
    count = max(int(take.sum()), 1)
    result = {name: float(values[take].sum()) / count for name, values in per_user.items()}
    for k in ks:
        slots = ranked.top[take, :k]
        slots = slots[slots >= 0]
        result[f"coverage@{k}"] = float(np.unique(slots).size) / n_items
        result[f"pop_pct@{k}"] = float(pop_pct[slots].mean()) if slots.size else 0.0
    return dict(sorted(result.items(), key=lambda kv: _metric_order(kv[0])))


def _metric_order(name: str) -> tuple[int, int]:
    metric, k = name.split("@")
    return ("recall", "ndcg", "hit", "coverage", "pop_pct").index(metric), int(k)


def evaluate_fast(
    score: ScoreFn, split: Split, phase: Phase, ks: Sequence[int] = (10, 50)
) -> dict[str, float]:
    """training.protocol.evaluate's numbers, ranking with a partial sort (big catalogs)."""
    ranked = rank(score, split, phase, max(ks))
    per_user = per_user_metrics(ranked, split.ground_truth(phase), ks)
    pop = popularity_percentile(split.train_counts())
    return aggregate(ranked, per_user, ks, pop, split.n_items)


# ---- the two-tower model as the server scores it ----------------------------------


@dataclass(frozen=True, slots=True)
class Tower:
    """The query side and item table of server/artifact.py's SCHEMA, float32.

    item_embeddings (n, d), user_embeddings (u, d), history_projection (d, d),
    context_device (4, d), context_country (c+1, d).
    """

    item_embeddings: npt.NDArray[np.float32]
    user_embeddings: npt.NDArray[np.float32]
    history_projection: npt.NDArray[np.float32]
    context_device: npt.NDArray[np.float32]
    context_country: npt.NDArray[np.float32]

    @classmethod
    def of_model(cls, model: TrainedModel) -> Tower:
        return cls(
            item_embeddings=model.item_embeddings,
            user_embeddings=model.user_embeddings,
            history_projection=model.history_projection,
            context_device=model.context_device,
            context_country=model.context_country,
        )

    @classmethod
    def of_artifact(cls, artifact: Artifact) -> Tower:
        def f32(name: str) -> npt.NDArray[np.float32]:
            return np.ascontiguousarray(artifact[name], dtype=np.float32)

        return cls(
            item_embeddings=f32("item_embeddings"),
            user_embeddings=f32("user_embeddings"),
            history_projection=f32("history_projection"),
            context_device=f32("context_device"),
            context_country=f32("context_country"),
        )

    def queries(
        self,
        users: npt.NDArray[np.int64],
        history_indptr: npt.NDArray[np.int64],
        history_items: Array,
        device: npt.NDArray[np.int64],
        country: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.float32]:
        """float32 (b, d): q = user + P @ mean(history) + device + country.

        users: dataset user rows, -1 for a shopper without a trained vector;
        history CSR over the b queries (no history contributes zero).
        """
        q = self.context_device[device] + self.context_country[country]
        known = users >= 0
        q[known] += self.user_embeddings[users[known]]
        counts = np.diff(history_indptr)
        if history_items.size:
            row = np.repeat(np.arange(users.size), counts)
            sums = np.zeros_like(q)
            np.add.at(sums, row, self.item_embeddings[history_items])
            mean = sums / np.maximum(counts, 1)[:, None].astype(np.float32)
            q += mean @ self.history_projection.T
        return np.asarray(q, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Histories:
    """Each dataset user's last `length` collapsed interactions (CSR), as the server keeps them."""

    indptr: npt.NDArray[np.int64]
    items: npt.NDArray[np.int32]

    @classmethod
    def of(cls, dataset: Dataset, events: npt.NDArray[np.bool_], config: TrainConfig) -> Histories:
        inter = collapse_events(restrict_events(dataset, events), config.event_weights)
        indptr, items = last_items(inter, config.history_length)
        return cls(indptr, items)

    def rows(self, users: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], Array]:
        return csr_rows(self.indptr, self.items, users)


def tower_scorer(
    tower: Tower,
    data: ProtocolData,
    phase: Phase,
    histories: Histories,
    *,
    context: bool = True,
    with_user: bool = True,
) -> ScoreFn:
    """ScoreFn over split users: the server's query for each user's phase context."""
    unknown_country = len(data.dataset.country_codes)

    def score(split_users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        rows = data.users[split_users]
        ptr, items = histories.rows(rows)
        device = data.device[phase][split_users] if context else np.zeros_like(rows)
        country = (
            data.country[phase][split_users] if context else np.full_like(rows, unknown_country)
        )
        q = tower.queries(
            rows if with_user else np.full_like(rows, -1), ptr, items, device, country
        )
        result: npt.NDArray[np.float32] = q @ tower.item_embeddings.T
        return result

    return score


def content_vectors(model: TrainedModel, dataset: Dataset) -> npt.NDArray[np.float32]:
    """float32 (n, d): every item's content-tower vector (category + brand + price bucket),
    the vector the server gives an item it has no trained row for."""
    bucket = np.searchsorted(model.price_bucket_edges, dataset.item_price, side="right")
    vectors = (
        model.item_tower_category[dataset.item_category]
        + model.item_tower_brand[dataset.item_brand]
        + model.item_tower_price[bucket]
    )
    return np.asarray(vectors, dtype=np.float32)


# ---- baselines --------------------------------------------------------------------


def segment_counts(
    data: ProtocolData,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(segment of each (country, device) pair, counts (s, n)): train interactions per
    segment the server's bestseller fallback uses (country x device), plus row s-1 = all."""
    n_countries = len(data.dataset.country_codes) + 1
    seg = data.part_country["train"] * 4 + data.part_device["train"]
    present = np.unique(seg)
    counts = np.zeros((present.size + 1, data.split.n_items), dtype=np.float64)
    at = np.searchsorted(present, seg)
    np.add.at(counts, (at, data.split.train.items), 1.0)
    counts[-1] = counts[:-1].sum(axis=0)
    lookup = np.full(n_countries * 4, present.size, dtype=np.int64)
    lookup[present] = np.arange(present.size)
    return lookup, counts


def segment_pop_scorer(
    data: ProtocolData,
    phase: Phase,
    fitted: tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None = None,
) -> ScoreFn:
    """Bestsellers of the user's segment (country x device of the request), ties broken by
    catalog-wide bestsellers: the server's answer for shoppers it does not know.
    `fitted` is segment_counts(data), computed once for both phases."""
    lookup, counts = fitted or segment_counts(data)
    overall = counts[-1] / (counts[-1].max() + 1.0)

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        seg = lookup[data.country[phase][users] * 4 + data.device[phase][users]]
        result: npt.NDArray[np.float64] = counts[seg] + overall[None, :]
        return result

    return score


@dataclass(frozen=True, slots=True)
class ModelResult:
    """One model's protocol metrics (valid and test) and its training time."""

    name: str
    valid: dict[str, float]
    test: dict[str, float]
    train_s: float
    params: dict[str, object] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "valid": self.valid,
            "test": self.test,
            "train_s": round(self.train_s, 3),
            "params": self.params,
            "note": self.note,
        }


# ---- the evaluation -----------------------------------------------------------------


class _Run:
    """Shared state of one evaluate_dataset call."""

    def __init__(self, data: ProtocolData, config: EvalConfig, say: Callable[[str], None]):
        self.data, self.config, self.say = data, config, say
        self.split = data.split
        self.ks = config.ks
        self.k = max(config.ks)
        self.pop = popularity_percentile(self.split.train_counts())
        self.rankings: dict[tuple[str, str], Ranked] = {}

    def measure(self, name: str, phase: Phase, score: ScoreFn) -> dict[str, float]:
        ranked = rank(score, self.split, phase, self.k)
        self.rankings[(name, phase)] = ranked
        per_user = per_user_metrics(ranked, self.split.ground_truth(phase), self.ks)
        return aggregate(ranked, per_user, self.ks, self.pop, self.split.n_items)

    def by_segment(
        self, name: str, labels: npt.NDArray[np.int64], names: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """Test metrics of a measured model per segment label of each split user."""
        ranked = self.rankings[(name, "test")]
        per_user = per_user_metrics(ranked, self.split.test, self.ks)
        label = labels[ranked.users]
        out: dict[str, dict[str, float]] = {}
        for code, seg_name in enumerate(names):
            mask = label == code
            if mask.any():
                metrics = aggregate(ranked, per_user, self.ks, self.pop, self.split.n_items, mask)
                out[seg_name] = {"users": int(mask.sum()), **metrics}
        return out


def evaluate_dataset(
    dataset: Dataset,
    config: EvalConfig | None = None,
    *,
    artifacts: Path | None = None,
    progress: Callable[[str], None] | None = None,
    show_training: bool = False,
) -> dict[str, Any]:
    """Train endcap's two-tower model and the baselines on the protocol split of `dataset`,
    score valid and test, and measure context, cold start and serving fidelity.

    Returns a JSON-ready report (see print_report). `artifacts`: where the
    fidelity check exports the model (default: a temporary directory).
    """
    from training.train import train

    config = config or EvalConfig()
    say = progress or (lambda message: None)
    began = time.perf_counter()
    tcfg = config.train
    say(f"splitting {dataset.name}: {dataset.n_events:,} events")
    data = protocol_data(dataset, tcfg.event_weights)
    split = data.split
    run = _Run(data, config, say)
    report: dict[str, Any] = {
        "dataset": {
            "name": dataset.name,
            "items": dataset.n_items,
            "users": dataset.n_users,
            "events": dataset.n_events,
            "fingerprint": dataset.fingerprint(),
        },
        "protocol": "shared/eval/PROTOCOL.md: first interaction per (user, item), per-user "
        "temporal 80/10/10 split, full ranking over all items, history excluded",
        "split": {
            "users": split.n_users,
            "items": split.n_items,
            "train": len(split.train),
            "valid": len(split.valid),
            "test": len(split.test),
            "train_events": int(data.train_events.sum()),
        },
        "config": {"eval": _plain(config), "train": tcfg.to_dict()},
    }
    histories = {
        phase: Histories.of(dataset, data.history_events[phase], tcfg)
        for phase in ("valid", "test")
    }
    train_set = data.subset(data.train_events)
    models: list[ModelResult] = []

    def two_tower(name: str, cfg: TrainConfig, ds: Dataset) -> tuple[TrainedModel, float]:
        say(f"training {name}")
        t0 = time.perf_counter()
        model = train(ds, cfg, progress=show_training)
        return model, time.perf_counter() - t0

    main, main_s = two_tower("endcap two-tower", tcfg, train_set)
    tower = Tower.of_model(main)
    models.append(
        ModelResult(
            "endcap two-tower",
            run.measure("endcap", "valid", tower_scorer(tower, data, "valid", histories["valid"])),
            run.measure("endcap", "test", tower_scorer(tower, data, "test", histories["test"])),
            main_s,
            {"dim": tcfg.dim, "epochs_run": len(main.history), "best_epoch": main.best_epoch},
        )
    )
    if config.context_ablation:
        plain_cfg = dataclasses.replace(tcfg, context=False)
        plain, plain_s = two_tower("endcap two-tower without context", plain_cfg, train_set)
        ptower = Tower.of_model(plain)
        models.append(
            ModelResult(
                "endcap, no context",
                run.measure(
                    "no-context",
                    "valid",
                    tower_scorer(ptower, data, "valid", histories["valid"], context=False),
                ),
                run.measure(
                    "no-context",
                    "test",
                    tower_scorer(ptower, data, "test", histories["test"], context=False),
                ),
                plain_s,
                {"context": False},
            )
        )
    models.extend(_baselines(run))
    report["models"] = [m.to_json() for m in models]
    by_name = {m.name: m for m in models}
    if "endcap, no context" in by_name:
        with_ctx = by_name["endcap two-tower"].test
        without = by_name["endcap, no context"].test
        report["context"] = {
            metric: {
                "with_context": with_ctx[metric],
                "without_context": without[metric],
                "lift": with_ctx[metric] / without[metric] - 1.0 if without[metric] else None,
            }
            for metric in ("ndcg@10", "recall@10", "recall@50")
        }
    report["segments"] = _segments(run, [m.name for m in models])
    report["segment_bestsellers"] = _bestseller_overlap(train_set, tcfg, config.bestseller_list)
    if config.fidelity:
        say("exporting the artifact and scoring through FAISS")
        report["fidelity"], served = _fidelity(run, main, train_set, histories["test"], artifacts)
        report["models"].insert(1, served.to_json())
    if config.cold_start:
        report["cold_start"] = _cold_start(run, data, train_set, two_tower)
    if config.placements:
        from training.placement_eval import evaluate_placements

        say("replaying held-out shopping through the served Engine, per placement")
        report["placements"] = evaluate_placements(
            dataset, data.train_events, main, max_cases=config.placement_cases, seed=config.seed
        )
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def _plain(config: EvalConfig) -> dict[str, object]:
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "train"
    }


def _baselines(run: _Run) -> list[ModelResult]:
    from training.baselines import ALS, EASE, MostPop

    data, split, config = run.data, run.split, run.config
    out: list[ModelResult] = []
    for name in config.baselines:
        t0 = time.perf_counter()
        if name == "MostPop":
            model = MostPop.fit(split)
            fitted = time.perf_counter() - t0
            valid = run.measure(name, "valid", model.scorer(split.history("valid")))
            test = run.measure(name, "test", model.scorer(split.history("test")))
            out.append(ModelResult(name, valid, test, fitted))
        elif name == "SegmentPop":
            counts = segment_counts(data)
            fitted = time.perf_counter() - t0
            valid = run.measure(name, "valid", segment_pop_scorer(data, "valid", counts))
            test = run.measure(name, "test", segment_pop_scorer(data, "test", counts))
            out.append(
                ModelResult(name, valid, test, fitted, note="bestsellers of country x device")
            )
        elif name == "ALS":
            run.say(f"training ALS ({config.als_iterations} iterations)")
            als = ALS.fit(split, iterations=config.als_iterations, seed=config.seed)
            fitted = time.perf_counter() - t0
            valid = run.measure(name, "valid", als.scorer(split.history("valid")))
            test = run.measure(name, "test", als.scorer(split.history("test")))
            params: dict[str, object] = {
                "factors": 64,
                "reg": als.reg,
                "alpha": als.alpha,
                "iterations": config.als_iterations,
            }
            out.append(ModelResult(name, valid, test, fitted, params))
        elif name == "EASE":
            if split.n_items > EASE_MAX_ITEMS:
                run.say(f"EASE skipped: {split.n_items:,} items > {EASE_MAX_ITEMS:,}")
                continue
            ease = EASE.fit(split)
            fitted = time.perf_counter() - t0
            valid = run.measure(name, "valid", ease.scorer(split.history("valid")))
            test = run.measure(name, "test", ease.scorer(split.history("test")))
            out.append(ModelResult(name, valid, test, fitted, {"l2": 100.0}))
    return out


def _segments(run: _Run, models: Sequence[str]) -> dict[str, Any]:
    """Test metrics per request device and per shopper country, where the data has them."""
    data = run.data
    names = {"endcap two-tower": "endcap", "endcap, no context": "no-context"}
    out: dict[str, Any] = {}
    device = data.device["test"]
    country = data.country["test"]
    groups: list[tuple[str, npt.NDArray[np.int64], Sequence[str]]] = []
    if np.unique(device).size > 1:
        groups.append(("device", device, DEVICE_NAMES))
    if len(data.dataset.country_codes) > 1:
        groups.append(("country", country, (*data.dataset.country_codes, "unknown")))
    for group, labels, label_names in groups:
        out[group] = {
            model: run.by_segment(names.get(model, model), labels, label_names)
            for model in models
            if (names.get(model, model), "test") in run.rankings
        }
    return out


def jaccard(a: Array, b: Array) -> float:
    sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def _pairwise(lists: Sequence[Array]) -> dict[str, float]:
    values = [jaccard(a, b) for i, a in enumerate(lists) for b in lists[i + 1 :]]
    if not values:
        return {}
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "pairs": len(values),
    }


def _bestseller_overlap(train_set: Dataset, config: TrainConfig, size: int) -> dict[str, Any]:
    """How much the top-`size` bestsellers of countries and devices overlap (Jaccard)."""
    from training.export import segment_top

    weights = np.asarray(config.event_weights, dtype=np.float64)[train_set.ev_type]
    top, _ = segment_top(train_set, weights, size)
    n_countries = len(train_set.country_codes)
    overall = top[n_countries, 0]
    countries = [top[c, 0] for c in range(n_countries) if (train_set.ev_country == c).any()]
    devices = [top[n_countries, d] for d in (1, 2, 3) if (train_set.ev_device == d).any()]
    return {
        "list": size,
        "countries": _pairwise(countries),
        "devices": _pairwise(devices),
        "country_vs_overall": float(np.mean([jaccard(c, overall) for c in countries]))
        if countries
        else None,
        "device_vs_overall": float(np.mean([jaccard(d, overall) for d in devices]))
        if devices
        else None,
    }


def _fidelity(
    run: _Run,
    model: TrainedModel,
    train_set: Dataset,
    histories: Histories,
    artifacts: Path | None,
) -> tuple[dict[str, Any], ModelResult]:
    """Test queries through the exported artifact: its arrays and its FAISS index."""
    import faiss

    from server.artifact import load_artifact
    from server.infra.threads import faiss_threads
    from training.export import export_artifact

    data, split, config = run.data, run.split, run.config
    users = np.flatnonzero(split.test.lengths() > 0).astype(np.int64)
    if config.fidelity_users is not None and users.size > config.fidelity_users:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, config.fidelity_users, replace=False))
    with tempfile.TemporaryDirectory(prefix="endcap-eval-") as tmp:
        root = artifacts or Path(tmp)
        t0 = time.perf_counter()
        path = export_artifact(train_set, model, root, make_latest=artifacts is not None)
        export_s = time.perf_counter() - t0
        artifact = load_artifact(path)
        served = Tower.of_artifact(artifact)
        trained = Tower.of_model(model)
        rows = data.users[users]
        ptr, items = histories.rows(rows)
        args = (ptr, items, data.device["test"][users], data.country["test"][users])
        q = served.queries(rows, *args)
        q_model = trained.queries(rows, *args)
        index = artifact.index
        seen_ptr, seen = csr_rows(split.history("test").indptr, split.history("test").items, users)
        k = run.k
        t0 = time.perf_counter()
        with faiss_threads(1):
            ann = _ann_top(index, q, seen_ptr, seen, k, served.item_embeddings)
        ann_s = time.perf_counter() - t0
        exact = rank(
            lambda u: q[np.searchsorted(users, u)] @ served.item_embeddings.T,
            split,
            "test",
            k,
            users=users,
        ).top
        description = type(index).__name__
        nprobe = (
            int(getattr(faiss.extract_index_ivf(index), "nprobe", 0))
            if "IVF" in description
            else None
        )
        nlist = (
            int(getattr(faiss.extract_index_ivf(index), "nlist", 0))
            if "IVF" in description
            else None
        )
        version = path.name
    recall = {}
    for kk in config.ks:
        overlap = [
            len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(int((e >= 0).sum()), 1)
            for a, e in zip(ann[:, :kk], exact[:, :kk], strict=True)
        ]
        recall[f"recall@{kk}"] = float(np.mean(overlap)) if overlap else 1.0
    served_rank = Ranked(users=users, top=ann)
    per_user = per_user_metrics(served_rank, split.test, config.ks)
    metrics = aggregate(served_rank, per_user, config.ks, run.pop, split.n_items)
    exact_rank = Ranked(users=users, top=exact)
    exact_metrics = aggregate(
        exact_rank,
        per_user_metrics(exact_rank, split.test, config.ks),
        config.ks,
        run.pop,
        split.n_items,
    )
    fidelity = {
        "artifact": str(path) if artifacts is not None else f"(temporary) {version}",
        "index": description,
        "nlist": nlist,
        "nprobe": nprobe,
        "users": int(users.size),
        "query_max_abs_diff_vs_trained": float(np.abs(q - q_model).max()) if q.size else 0.0,
        "ann_vs_exact": recall,
        "exact_ndcg@10": exact_metrics.get("ndcg@10"),
        "served_ndcg@10": metrics.get("ndcg@10"),
        "export_s": round(export_s, 2),
        "ann_search_ms_per_query": round(1000 * ann_s / max(users.size, 1), 4),
    }
    note = "test users sampled" if users.size < int((split.test.lengths() > 0).sum()) else ""
    result = ModelResult(
        "endcap served (artifact + FAISS)",
        {},
        metrics,
        0.0,
        {"index": description, "nprobe": nprobe},
        note,
    )
    return fidelity, result


def _ann_top(
    index: Any,
    queries: npt.NDArray[np.float32],
    seen_ptr: npt.NDArray[np.int64],
    seen: Array,
    k: int,
    vectors: npt.NDArray[np.float32],
    batch: int = 4096,
) -> npt.NDArray[np.int64]:
    """Top-k by the index's own search: over-fetch by the history size, drop history and
    -1 ids, truncate (as the server does; compressed codes are over-fetched again and
    rescored with `vectors`, the item embeddings). int64 (b, k), -1 padded."""
    from server.domain.retrieval import rescore_overfetch

    n_items = int(vectors.shape[0])
    overfetch = rescore_overfetch(index)
    step = batch if overfetch == 1 else max(1, batch // 16)  # bounds the gathered vectors
    out = np.full((queries.shape[0], k), -1, dtype=np.int64)
    counts = np.diff(seen_ptr)
    for lo in range(0, queries.shape[0], step):
        hi = min(lo + step, queries.shape[0])
        fetch = min(n_items, (k + int(counts[lo:hi].max(initial=0))) * overfetch)
        _, ids = index.search(np.ascontiguousarray(queries[lo:hi]), fetch)
        ids = ids.astype(np.int64)
        if overfetch > 1:
            exact = np.einsum("bd,bfd->bf", queries[lo:hi], vectors[np.maximum(ids, 0)])
            order = np.argsort(np.where(ids >= 0, -exact, np.inf), axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
        rows = np.arange(hi - lo, dtype=np.int64)
        ptr, items = csr_rows(seen_ptr, seen, np.arange(lo, hi))
        seen_keys = np.sort(np.repeat(rows, np.diff(ptr)) * n_items + items.astype(np.int64))
        ok = (ids >= 0) & ~np.isin(rows[:, None] * n_items + ids, seen_keys)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(ids, order, axis=1)
        valid = np.take_along_axis(ok, order, axis=1)
        out[lo:hi, : picked.shape[1]] = np.where(valid, picked, -1)
    return out


def _user_sequences(
    data: ProtocolData, users: npt.NDArray[np.int64]
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """(indptr, items, device, country): the users' whole first-interaction sequences."""
    split = data.split
    parts = (("train", split.train), ("valid", split.valid), ("test", split.test))
    pieces: list[tuple[Array, ...]] = []
    for name, part in parts:
        ptr, items = csr_rows(part.indptr, part.items, users)
        _, dev = csr_rows(part.indptr, data.part_device[name], users)
        _, cty = csr_rows(part.indptr, data.part_country[name], users)
        pieces.append((ptr, items, dev, cty))
    lengths = sum(np.diff(p[0]) for p in pieces)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = [np.empty(int(indptr[-1]), dtype=np.int64) for _ in range(3)]
    offset = indptr[:-1].copy()
    for ptr, *cols in pieces:
        counts = np.diff(ptr)
        dest = np.repeat(offset - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        for target, col in zip(out, cols, strict=True):
            target[dest] = col
        offset += counts
    return indptr, out[0], out[1], out[2]


def _part(lists: Sequence[Array]) -> Part:
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = (
        np.concatenate([np.asarray(x, dtype=np.int32) for x in lists])
        if lists
        else np.zeros(0, np.int32)
    )
    return Part(indptr=indptr, items=items, timestamps=np.zeros(items.size, dtype=np.int64))


def _cold_start(
    run: _Run,
    data: ProtocolData,
    train_set: Dataset,
    two_tower: Callable[[str, TrainConfig, Dataset], tuple[TrainedModel, float]],
) -> dict[str, Any]:
    """Items and shoppers held out of training entirely, scored by a model trained without them."""
    config, split, dataset = run.config, run.split, data.dataset
    tcfg = config.train
    rng = np.random.default_rng(config.seed + 1)
    n = dataset.n_items
    active = np.flatnonzero(np.bincount(dataset.ev_item, minlength=n) > 0)
    cold = np.sort(
        rng.choice(active, max(1, round(config.cold_item_fraction * active.size)), replace=False)
    )
    is_cold = np.zeros(n, dtype=np.bool_)
    is_cold[cold] = True
    whole = split.train.lengths() + split.valid.lengths() + split.test.lengths()
    eligible = np.flatnonzero(whole >= 4)
    n_new = max(1, round(config.new_user_fraction * eligible.size)) if eligible.size else 0
    new = np.sort(rng.choice(eligible, n_new, replace=False)) if n_new else eligible
    is_new = np.zeros(dataset.n_users, dtype=np.bool_)
    is_new[data.users[new]] = True
    keep = data.train_events & ~is_cold[dataset.ev_item] & ~is_new[dataset.ev_user]
    model, seconds = two_tower(
        "cold-start model (without held-out items and shoppers)", tcfg, data.subset(keep)
    )
    content = content_vectors(model, dataset)
    items = model.item_embeddings.copy()
    items[cold] = content[cold]
    tower = dataclasses.replace(Tower.of_model(model), item_embeddings=items)
    # Popularity as the held-out model saw it: train rows of everyone else.
    new_row = np.repeat(np.isin(np.arange(split.n_users), new), split.train.lengths())
    warm_rows = ~new_row & ~is_cold[split.train.items]
    counts = np.bincount(split.train.items[warm_rows], minlength=n).astype(np.float64)
    out: dict[str, Any] = {
        "train_s": round(seconds, 1),
        "items": _cold_items(run, data, tower, counts, is_cold, is_new, cold),
        "users": _new_users(run, data, tower, counts, new, warm_rows),
    }
    return out


def _cold_items(
    run: _Run,
    data: ProtocolData,
    tower: Tower,
    counts: npt.NDArray[np.float64],
    is_cold: npt.NDArray[np.bool_],
    is_new: npt.NDArray[np.bool_],
    cold: npt.NDArray[np.int64],
) -> dict[str, Any]:
    """Rank only the held-out items for shoppers who met them in test."""
    split, dataset, config = run.split, data.dataset, run.config
    local = np.full(dataset.n_items, -1, dtype=np.int64)
    local[cold] = np.arange(cold.size)
    test_cold = is_cold[split.test.items]
    users = np.flatnonzero(
        np.bincount(split.test.users()[test_cold], minlength=split.n_users) > 0
    ).astype(np.int64)
    users = users[~is_new[data.users[users]]]
    if users.size == 0:
        return {"held_out_items": int(cold.size), "users": 0}
    hist = Histories.of(
        dataset, data.history_events["test"] & ~is_cold[dataset.ev_item], run.config.train
    )
    rows = data.users[users]
    ptr, h_items = hist.rows(rows)
    q = tower.queries(rows, ptr, h_items, data.device["test"][users], data.country["test"][users])
    scores = q @ tower.item_embeddings[cold].T
    seen_ptr, seen = csr_rows(split.history("test").indptr, split.history("test").items, users)
    seen_local = local[seen]
    keep = seen_local >= 0
    kept_counts = np.add.reduceat(keep, seen_ptr[:-1]) if seen.size else np.zeros(users.size, int)
    kept_counts = np.where(np.diff(seen_ptr) > 0, kept_counts, 0)
    ex_ptr = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)
    ex = seen_local[keep]
    t_ptr, t_items = csr_rows(split.test.indptr, split.test.items, users)
    truths = [local[t_items[a:b]][local[t_items[a:b]] >= 0] for a, b in itertools.pairwise(t_ptr)]
    truth = _part(truths)
    ks = config.ks
    k = max(ks)
    ids = np.arange(users.size, dtype=np.int64)
    endcap = Ranked(ids, top_k(scores, ex_ptr, ex, k))
    category = np.bincount(
        dataset.item_category, weights=counts, minlength=len(dataset.category_names)
    )
    brand = np.bincount(dataset.item_brand, weights=counts, minlength=len(dataset.brand_names))
    pop_score = category[dataset.item_category[cold]] + brand[dataset.item_brand[cold]] / (
        brand.max() + 1.0
    )
    popular = Ranked(ids, top_k(np.broadcast_to(pop_score, scores.shape), ex_ptr, ex, k))
    candidates = cold.size - kept_counts
    result: dict[str, Any] = {
        "held_out_items": int(cold.size),
        "users": int(users.size),
        "test_interactions": int(sum(len(t) for t in truths)),
        "candidates": "the held-out items (their vectors: content tower only)",
    }
    for name, ranked in (("endcap", endcap), ("category popularity", popular)):
        per_user = per_user_metrics(ranked, truth, ks)
        result[name] = {m: float(v.mean()) for m, v in per_user.items()}
    result["random"] = {
        f"recall@{kk}": float(np.mean(np.minimum(kk, candidates) / np.maximum(candidates, 1)))
        for kk in ks
    }
    return result


def _new_users(
    run: _Run,
    data: ProtocolData,
    tower: Tower,
    counts: npt.NDArray[np.float64],
    new: npt.NDArray[np.int64],
    warm_rows: npt.NDArray[np.bool_],
) -> dict[str, Any]:
    """Shoppers never trained on, given their first 1-3 items: their next items."""
    split, config = run.split, run.config
    if new.size == 0:
        return {"users": 0}
    indptr, items, device, country = _user_sequences(data, new)
    ks = config.ks
    k = max(ks)
    seg_rows = warm_rows
    seg = data.part_country["train"][seg_rows] * 4 + data.part_device["train"][seg_rows]
    n = split.n_items
    seg_keys = np.unique(seg)
    seg_counts = np.zeros((seg_keys.size, n))
    np.add.at(seg_counts, (np.searchsorted(seg_keys, seg), split.train.items[seg_rows]), 1.0)
    overall = counts / (counts.max() + 1.0)
    out: dict[str, Any] = {
        "users": int(new.size),
        "targets": f"next {config.new_user_targets} items",
    }
    no_user = np.full(new.size, -1, dtype=np.int64)
    for given in (1, 2, 3):
        starts = indptr[:-1]
        h_ptr = np.arange(new.size + 1, dtype=np.int64) * given
        h_items = items[(starts[:, None] + np.arange(given)[None, :]).ravel()]
        at = starts + given
        ctx_dev, ctx_cty = device[at], country[at]
        truths = [
            items[a + given : min(b, a + given + config.new_user_targets)]
            for a, b in itertools.pairwise(indptr)
        ]
        truth = _part(truths)
        ids = np.arange(new.size, dtype=np.int64)
        q = tower.queries(no_user, h_ptr, h_items, ctx_dev, ctx_cty)
        scores = q @ tower.item_embeddings.T
        rankings = {
            "endcap": Ranked(ids, top_k(scores, h_ptr, h_items, k)),
            "MostPop": Ranked(ids, top_k(np.broadcast_to(counts, scores.shape), h_ptr, h_items, k)),
        }
        seg_at = np.searchsorted(seg_keys, ctx_cty * 4 + ctx_dev)
        found = (seg_at < seg_keys.size) & (
            seg_keys[np.minimum(seg_at, seg_keys.size - 1)] == ctx_cty * 4 + ctx_dev
        )
        seg_scores = (
            np.where(found[:, None], seg_counts[np.minimum(seg_at, seg_keys.size - 1)], 0.0)
            + overall
        )
        rankings["SegmentPop"] = Ranked(ids, top_k(seg_scores, h_ptr, h_items, k))
        out[f"{given}_items"] = {
            name: {m: float(v.mean()) for m, v in per_user_metrics(r, truth, ks).items()}
            for name, r in rankings.items()
        }
    return out


# ---- output ---------------------------------------------------------------------------


def _f(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Render evaluate_dataset's report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    out = console or Console()
    ds, sp = report["dataset"], report["split"]
    out.print(
        f"{ds['name']}: {ds['items']:,} items, {ds['users']:,} users, {ds['events']:,} events "
        f"(fingerprint {ds['fingerprint']}); split train {sp['train']:,} / valid {sp['valid']:,} "
        f"/ test {sp['test']:,} first interactions of {sp['users']:,} users"
    )
    table = Table(title="test metrics (valid for selection only)")
    table.add_column("model")
    table.add_column("valid ndcg@10", justify="right")
    for metric in REPORT_METRICS:
        table.add_column(metric, justify="right")
    table.add_column("train s", justify="right")
    for model in report["models"]:
        table.add_row(
            model["name"] + (f" ({model['note']})" if model.get("note") else ""),
            _f(model["valid"].get("ndcg@10")),
            *(_f(model["test"].get(m)) for m in REPORT_METRICS),
            _f(model["train_s"], 1) if model["train_s"] else "",
        )
    out.print(table)
    context = report.get("context")
    if context:
        ndcg = context["ndcg@10"]
        out.print(
            f"context (device, country): test ndcg@10 {ndcg['with_context']:.4f} with vs "
            f"{ndcg['without_context']:.4f} without = {100 * (ndcg['lift'] or 0):+.1f}%; "
            f"recall@10 {100 * (context['recall@10']['lift'] or 0):+.1f}%"
        )
    for group, per_model in report.get("segments", {}).items():
        seg = Table(title=f"test ndcg@10 by {group}")
        seg.add_column(group)
        seg.add_column("users", justify="right")
        models = list(per_model)
        for model in models:
            seg.add_column(model, justify="right")
        first = per_model[models[0]] if models else {}
        for name in first:
            seg.add_row(
                name,
                f"{first[name]['users']:,}",
                *(_f(per_model[m].get(name, {}).get("ndcg@10")) for m in models),
            )
        out.print(seg)
    best = report.get("segment_bestsellers")
    if best and best.get("countries"):
        c, d = best["countries"], best.get("devices") or {}
        out.print(
            f"top-{best['list']} bestsellers, Jaccard overlap: between countries mean "
            f"{c['mean']:.2f} (min {c['min']:.2f}, max {c['max']:.2f}); between devices mean "
            f"{_f(d.get('mean'), 2)}; country vs all {_f(best['country_vs_overall'], 2)}, "
            f"device vs all {_f(best['device_vs_overall'], 2)}"
        )
    fidelity = report.get("fidelity")
    if fidelity:
        ann = fidelity["ann_vs_exact"]
        out.print(
            f"serving fidelity: {fidelity['index']} (nlist {fidelity['nlist']}, nprobe "
            f"{fidelity['nprobe']}), {fidelity['users']:,} test queries; ANN vs exact "
            + ", ".join(f"{k} {v:.4f}" for k, v in ann.items())
            + f"; ndcg@10 served {_f(fidelity['served_ndcg@10'])} vs exact "
            f"{_f(fidelity['exact_ndcg@10'])}; query |Δ| vs trained model "
            f"{fidelity['query_max_abs_diff_vs_trained']:.1e}"
        )
    cold = report.get("cold_start")
    if cold:
        items = cold["items"]
        if items.get("users"):
            t = Table(
                title=f"cold items: {items['held_out_items']:,} held out of training, ranked "
                f"among themselves for {items['users']:,} shoppers"
            )
            t.add_column("model")
            for metric in ("recall@10", "recall@50", "ndcg@10"):
                t.add_column(metric, justify="right")
            for name in ("endcap", "category popularity", "random"):
                row = items[name]
                t.add_row(name, *(_f(row.get(m)) for m in ("recall@10", "recall@50", "ndcg@10")))
            out.print(t)
        users = cold["users"]
        if users.get("users"):
            t = Table(
                title=f"new shoppers ({users['users']:,}, never trained on): {users['targets']} "
                "after their first items"
            )
            t.add_column("first items")
            t.add_column("model")
            for metric in ("recall@10", "ndcg@10", "hit@10"):
                t.add_column(metric, justify="right")
            for given in (1, 2, 3):
                for name, row in users[f"{given}_items"].items():
                    t.add_row(
                        str(given), name, *(_f(row[m]) for m in ("recall@10", "ndcg@10", "hit@10"))
                    )
            out.print(t)
    if "placements" in report:
        from training.placement_eval import print_placements

        print_placements(report["placements"], out)
    out.print(f"evaluated in {report['seconds']:.0f}s")


# ---- `endcap evaluate` --------------------------------------------------------------


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(
            f"endcap evaluate: {flag} must be comma-separated integers, got {text!r}"
        ) from None


def _rates(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    rates: dict[str, float] = {}
    for pair in text.split(","):
        code, _, value = pair.partition("=")
        try:
            rates[code.strip().upper()] = float(value)
        except ValueError:
            raise SystemExit(
                f"endcap evaluate: --currency-rates must look like EUR=1,USD=1.08, got {pair!r}"
            ) from None
    return rates


def run_command(args: argparse.Namespace) -> int:
    """`endcap evaluate`: see endcap/cli.py for the flags."""
    import json
    import os
    import sys

    from rich.console import Console

    from training.loaders import Loaded, LoadError, ShopFiles, SyntheticSource
    from training.synthetic import StoreConfig

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and pipes: whole tables, not 80 columns

    def say(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')} {message}[/dim]")

    report: dict[str, Any]
    if args.dataset == "ml100k":
        from training.ml100k import DatasetUnavailable, cache_dir_from_env
        from training.protocol import evaluate_ml100k
        from training.protocol import print_report as print_protocol_report

        if args.interactions or args.items:
            print(
                "endcap evaluate: --dataset ml100k takes no --interactions/--items", file=sys.stderr
            )
            return 2
        kwargs: dict[str, Any] = {
            "seeds": tuple(_ints(args.seeds, "--seeds")),
            "cache_dir": cache_dir_from_env(os.environ),
            "progress": say,
        }
        if args.models:
            kwargs["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
        try:
            report = evaluate_ml100k(**kwargs)
        except (DatasetUnavailable, ValueError) as exc:
            print(f"endcap evaluate: {exc}", file=sys.stderr)
            return 2
        print_protocol_report(report, console)
    else:
        train_overrides: dict[str, Any] = {"dim": args.dim, "seed": args.seed}
        if args.epochs is not None:
            train_overrides["epochs"] = args.epochs
        try:
            config = EvalConfig(
                train=TrainConfig(**train_overrides),
                baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
                context_ablation=not args.no_context_ablation,
                cold_start=not args.no_cold_start,
                fidelity=not args.no_fidelity,
                placements=not args.no_placements,
                seed=args.seed,
            )
        except ValueError as exc:
            print(f"endcap evaluate: {exc}", file=sys.stderr)
            return 2
        shop = args.dataset is None and args.interactions is not None
        try:
            loaded: Loaded
            if shop:
                loaded = ShopFiles(
                    interactions=Path(args.interactions),
                    items=Path(args.items) if args.items else None,
                    on_invalid="skip" if args.skip_invalid else "raise",
                    min_rating=args.min_rating,
                    base_currency=args.base_currency,
                    currency_rates=_rates(args.currency_rates),
                ).load()
            else:
                counts = _ints(
                    f"{args.items or 50_000},{args.interactions or 1_000_000}",
                    "--items/--interactions",
                )
                store = StoreConfig(
                    n_items=counts[0], n_users=args.users, n_events=counts[1], seed=args.seed
                )
                say(
                    f"generating the synthetic store ({store.n_items:,} items, {store.n_events:,} events)"
                )
                loaded = SyntheticSource(store).load()
        except (LoadError, ValueError) as exc:
            print(f"endcap evaluate: {exc}", file=sys.stderr)
            return 2
        for load_report in loaded.reports:
            for line in load_report.lines():
                console.print(line)
        report = evaluate_dataset(loaded.dataset, config, artifacts=args.artifacts, progress=say)
        report["load"] = [r.to_json() for r in loaded.reports]
        print_report(report, console)
        if args.plot:
            from training.report import plot_evaluation

            console.print(f"wrote {plot_evaluation(report, args.plot)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
