"""Train the two-tower model on a Dataset, validating on each shopper's latest new item."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from training.data import Dataset
from training.model import Adam, Batch, TwoTower

logger = logging.getLogger(__name__)

METRIC_NAMES = ("recall@10", "recall@50", "ndcg@10")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters of one training run; the defaults train the demo store."""

    dim: int = 64
    # One pass over the demo store's ~760k interactions: a second measured no
    # better (NDCG@10 0.0964-0.0970 vs 0.0977) at twice the time. Small stores want more.
    epochs: int = 1
    batch_size: int = 1024
    lr: float = 0.005
    lr_floor: float = 0.1  # final lr as a fraction of lr (linear decay)
    weight_decay: float = 0.0  # decoupled; id rows decay only when a batch touches them
    history_length: int = 20
    # Shared uniform negatives per batch, on top of the in-batch ones: they
    # reach the long tail, which in-batch negatives (popularity-sampled) rarely do.
    uniform_negatives: int = 256
    logq_weight: float = 1.0
    # Fractions of examples trained without an item id vector, a user id,
    # a device, a country: what the server meets as new items, anonymous
    # shoppers and requests without context.
    id_dropout: float = 0.25
    user_dropout: float = 0.2
    device_dropout: float = 0.15
    country_dropout: float = 0.15
    event_weights: tuple[float, float, float] = (1.0, 2.0, 4.0)  # view, cart, purchase
    price_buckets: int = 16
    min_user_items: int = 3  # shoppers with fewer distinct items are not held out
    max_eval_users: int | None = 5000  # validation shoppers sampled (None: all)
    patience: int = 1
    seed: int = 0
    # One thread: on the 2-vCPU target box two OpenMP threads spin-wait on each
    # other and an epoch took ~5x longer (measured: tiny store 29 s vs 4.5 s).
    threads: int = 1
    # False never reads device or country (training or validation): the
    # ablation that shows what context is worth.
    context: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_size", "history_length", "price_buckets", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.uniform_negatives < 0:
            raise ValueError(f"uniform_negatives must be >= 0, got {self.uniform_negatives}")
        for name in ("id_dropout", "user_dropout", "device_dropout", "country_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.event_weights) != 3 or min(self.event_weights) <= 0.0:
            raise ValueError(f"event_weights must be 3 positive numbers, got {self.event_weights}")

    def to_dict(self) -> dict[str, Any]:
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name in self.__dataclass_fields__
            for value in (getattr(self, name),)
        }


@dataclass(frozen=True, slots=True)
class EpochStats:
    """One epoch: mean training loss, validation metrics, wall time, and the loss curve
    (mean loss over each of up to ~100 equal runs of batches, in order)."""

    epoch: int
    loss: float
    metrics: dict[str, float]
    seconds: float
    batch_losses: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """Weights of the best epoch as float32 numpy arrays, shaped as server/artifact.py wants.

    item_embeddings       (n, d)   id + content vector of every item
    item_tower_category   (k, d)   category vector incl. its ancestors
    item_tower_brand      (b, d)
    item_tower_price      (p, d)
    price_bucket_edges    float64 (p-1,) ascending, base currency
    user_embeddings       (u, d)   zero for shoppers never trained on
    history_projection    (d, d)   applied as history_projection @ mean
    context_device        (4, d)   rows follow RequestContext.Device
    context_country       (c+1, d) last row: unknown country
    """

    config: TrainConfig
    item_embeddings: npt.NDArray[np.float32]
    item_tower_category: npt.NDArray[np.float32]
    item_tower_brand: npt.NDArray[np.float32]
    item_tower_price: npt.NDArray[np.float32]
    price_bucket_edges: npt.NDArray[np.float64]
    user_embeddings: npt.NDArray[np.float32]
    history_projection: npt.NDArray[np.float32]
    context_device: npt.NDArray[np.float32]
    context_country: npt.NDArray[np.float32]
    history: tuple[EpochStats, ...]
    best_epoch: int
    metrics: dict[str, float]  # validation metrics of the best epoch
    baseline_metrics: dict[str, float]  # catalog popularity on the same validation set
    history_only_metrics: dict[str, float]  # best epoch without user vectors (new shoppers)
    n_train_examples: int
    n_validation_users: int
    seconds: float

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])


@dataclass(frozen=True, slots=True)
class Interactions:
    """Events collapsed per shopper: consecutive events on one item are one interaction.

    A view, add-to-cart and purchase of one item in a row are one step of a
    visit, so they are one interaction weighted by the strongest event; the
    history a model reads then never repeats the item it is asked to predict.
    Rows are grouped by user (CSR over `indptr`), oldest first.

    indptr int64 (u+1,); user, item int64; weight float32; device, country int64; ts int64.
    """

    indptr: npt.NDArray[np.int64]
    user: npt.NDArray[np.int64]
    item: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]
    device: npt.NDArray[np.int64]
    country: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]


def collapse_events(dataset: Dataset, event_weights: tuple[float, float, float]) -> Interactions:
    """Per-shopper interaction sequences from the (time-sorted) event log."""
    order = np.lexsort((np.arange(dataset.n_events), dataset.ev_ts, dataset.ev_user))
    user = dataset.ev_user[order].astype(np.int64)
    item = dataset.ev_item[order].astype(np.int64)
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    first = np.flatnonzero(starts)
    weights = np.asarray(event_weights, dtype=np.float32)[dataset.ev_type[order]]
    weight = np.maximum.reduceat(weights, first) if first.size else weights[:0]
    counts = np.bincount(user[first], minlength=dataset.n_users)
    return Interactions(
        indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        user=user[first],
        item=item[first],
        weight=weight.astype(np.float32),
        device=dataset.ev_device[order][first].astype(np.int64),
        country=dataset.ev_country[order][first].astype(np.int64),
        ts=dataset.ev_ts[order][first].astype(np.int64),
    )


def last_items(
    inter: Interactions, length: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """(indptr int64 (u+1,), items int32): each shopper's last `length` interactions, oldest first."""
    counts = np.diff(inter.indptr)
    keep = np.minimum(counts, length)
    pos = np.arange(inter.item.size) - inter.indptr[inter.user]
    mask = pos >= (counts - keep)[inter.user]
    indptr = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    return indptr, inter.item[mask].astype(np.int32)


@dataclass(frozen=True, slots=True)
class _Split:
    """Training rows (positions into Interactions) and one held-out item per validation user."""

    train_pos: npt.NDArray[np.int64]  # interaction rows used as training targets
    val_user: npt.NDArray[np.int64]
    val_pos: npt.NDArray[np.int64]  # the held-out interaction row of each validation user
    seen_indptr: npt.NDArray[np.int64]  # per validation user, items they had before (CSR)
    seen_items: npt.NDArray[np.int64]


def _split(
    inter: Interactions,
    min_user_items: int,
    max_users: int | None = None,
    rng: np.random.Generator | None = None,
) -> _Split:
    """Leave-last-out: each shopper's latest item that is new to them is held out.

    Everything from that interaction on is kept out of training, so the model
    never sees the future; what remains is the history the shopper had when
    the held-out item came up. Shoppers with fewer distinct items stay whole in
    training, and so do all but a random `max_users` of the others (drawn
    with `rng`): validating on a sample needs no more held out, and a
    shopper's latest items are the most telling ones to train on. The
    held-out item is new to the shopper, so excluding the items they already
    had (as the server does) never excludes the answer.
    """
    n = inter.item.size
    pos_in_user = np.arange(n) - inter.indptr[inter.user]
    by_pair = np.lexsort((pos_in_user, inter.item, inter.user))
    first = np.ones(n, dtype=bool)
    pu, pi = inter.user[by_pair], inter.item[by_pair]
    first[1:] = (pu[1:] != pu[:-1]) | (pi[1:] != pi[:-1])
    is_new = np.zeros(n, dtype=bool)
    is_new[by_pair[first]] = True
    n_users = inter.indptr.size - 1
    distinct = np.bincount(inter.user[is_new], minlength=n_users)
    # The latest new-item row per user: rows are grouped by user and time-ordered.
    latest = np.full(n_users, -1, dtype=np.int64)
    rows = np.flatnonzero(is_new)
    np.maximum.at(latest, inter.user[rows], rows)
    held = (distinct >= min_user_items) & (latest >= 0)
    eligible = np.flatnonzero(held)
    if max_users is not None and eligible.size > max_users:
        picked = np.sort(
            (rng or np.random.default_rng(0)).choice(eligible.size, max_users, replace=False)
        )
        held[:] = False
        held[eligible[picked]] = True
    cutoff = np.where(held, latest, inter.indptr[1:])  # first row not trained on, per user
    train_pos = np.flatnonzero(np.arange(n) < cutoff[inter.user])
    val_user = np.flatnonzero(held).astype(np.int64)
    val_pos = latest[val_user]
    seen_counts = val_pos - inter.indptr[val_user]
    seen_indptr = np.concatenate([[0], np.cumsum(seen_counts)]).astype(np.int64)
    seen_rows = np.repeat(inter.indptr[val_user], seen_counts) + (
        np.arange(int(seen_indptr[-1])) - np.repeat(seen_indptr[:-1], seen_counts)
    )
    return _Split(
        train_pos=train_pos,
        val_user=val_user,
        val_pos=val_pos,
        seen_indptr=seen_indptr,
        seen_items=inter.item[seen_rows],
    )


def price_bucket_edges(prices: npt.NDArray[np.float64], buckets: int) -> npt.NDArray[np.float64]:
    """float64 (buckets-1,): catalog price quantiles, strictly ascending where possible."""
    qs = np.quantile(prices, np.linspace(0.0, 1.0, buckets + 1)[1:-1])
    return np.asarray(np.maximum.accumulate(qs), dtype=np.float64)


def category_ancestry(parent: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
    """float32 (k, k): row i is 1 at i and at each of its ancestors."""
    k = parent.size
    ancestry = np.eye(k, dtype=np.float32)
    node = np.arange(k)
    for _ in range(k):  # depth is bounded by k; a cycle would be a broken tree
        node = np.where(node >= 0, parent[np.maximum(node, 0)], -1)
        live = node >= 0
        if not live.any():
            break
        ancestry[np.flatnonzero(live), node[live]] = 1.0
    return ancestry


def _csr_take(
    indptr: npt.NDArray[np.int64], values: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The CSR (indptr, values) of the given rows of a CSR matrix."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    out = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    idx = np.repeat(starts - out[:-1], counts) + np.arange(int(out[-1]))
    return out, values[idx]


# Scores held at once while ranking (floats): 128 MB, so a 1M-item catalog
# scores ~32 rows at a time instead of 1024 (4 GB, plus as much for top-k).
SCORE_BUDGET = 1 << 25


def score_rows(n_items: int, most: int = 1024) -> int:
    """Rows to score at once so that rows x n_items stays within SCORE_BUDGET."""
    return max(1, min(most, SCORE_BUDGET // max(n_items, 1)))


def _evaluate(
    scores_fn: Callable[[npt.NDArray[np.int64]], torch.Tensor],
    seen_indptr: npt.NDArray[np.int64],
    seen_items: npt.NDArray[np.int64],
    targets: npt.NDArray[np.int64],
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@10/@50 and NDCG@10 of one held-out item per row, ranked among all items.

    scores_fn(rows) -> float tensor (len(rows), n_items); each row's earlier
    items (seen_*, CSR) are excluded from its ranking, as the server does.
    """
    hits10 = hits50 = ndcg = 0.0
    for lo in range(0, targets.size, chunk):
        rows = np.arange(lo, min(lo + chunk, targets.size), dtype=np.int64)
        scores = scores_fn(rows)
        seen_ptr, seen = _csr_take(seen_indptr, seen_items, rows)
        local = np.repeat(np.arange(rows.size), np.diff(seen_ptr))
        scores[torch.from_numpy(local), torch.from_numpy(seen)] = float("-inf")
        top = torch.topk(scores, min(50, scores.shape[1]), dim=1).indices.numpy()
        hit = top == targets[rows][:, None]
        rank = np.where(hit.any(axis=1), hit.argmax(axis=1), 50)
        hits10 += float((rank < 10).sum())
        hits50 += float((rank < 50).sum())
        ndcg += float(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0).sum())
    n = max(targets.size, 1)
    return {"recall@10": hits10 / n, "recall@50": hits50 / n, "ndcg@10": ndcg / n}


class _Batches:
    """Training examples as tensors; `make` turns a slice of them into a Batch.

    An example is an interaction: its shopper, the `history_length`
    interactions before it, its device and country, and its item as target.
    """

    def __init__(
        self,
        inter: Interactions,
        rows: npt.NDArray[np.int64],
        n_items: int,
        n_countries: int,
        config: TrainConfig,
    ) -> None:
        self.config = config
        self.n_items, self.n_countries = n_items, n_countries
        self.rows = rows
        self.items = torch.from_numpy(inter.item)
        self.start = torch.from_numpy(inter.indptr[inter.user])
        self.users = torch.from_numpy(inter.user)
        self.weights = torch.from_numpy(inter.weight)
        self.device = torch.from_numpy(inter.device)
        self.country = torch.from_numpy(inter.country)
        if not config.context:
            self.device = torch.zeros_like(self.device)
            self.country = torch.full_like(self.country, n_countries)
        # Expected count of each item among a batch's targets: the logQ correction.
        freq = np.bincount(inter.item[rows], minlength=n_items) / max(rows.size, 1)
        expected = freq * min(config.batch_size, rows.size)
        self.log_q = torch.from_numpy(np.log(np.maximum(expected, 1e-12)).astype(np.float32))
        self.negative_log_q = math.log(max(config.uniform_negatives, 1) / n_items)

    def history(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(items int64 (B, H), mask bool (B, H)): the interactions before each row."""
        length = self.config.history_length
        idx = rows.unsqueeze(1) - length + torch.arange(length)
        return self.items[idx.clamp(min=0)], idx >= self.start[rows].unsqueeze(1)

    def make(self, rows: torch.Tensor, gen: torch.Generator) -> Batch:
        """The Batch of these interaction rows, with this batch's random drops and negatives."""
        config, size = self.config, rows.shape[0]
        history, mask = self.history(rows)
        drop = torch.rand((4, size), generator=gen)
        targets = self.items[rows]
        negatives = torch.randint(0, self.n_items, (config.uniform_negatives,), generator=gen)
        keep_negative = torch.rand(config.uniform_negatives, generator=gen) >= config.id_dropout
        return Batch(
            users=self.users[rows],
            keep_user=drop[0] >= config.user_dropout,
            history=history,
            history_mask=mask,
            device=torch.where(drop[1] < config.device_dropout, 0, self.device[rows]),
            country=torch.where(
                drop[2] < config.country_dropout, self.n_countries, self.country[rows]
            ),
            targets=targets,
            keep_target_id=drop[3] >= config.id_dropout,
            target_log_q=self.log_q[targets],
            negatives=negatives,
            keep_negative_id=keep_negative,
            weights=self.weights[rows],
        )


class _Validation:
    """Each validation shopper's held-out item, ranked among all items by a model."""

    def __init__(self, batches: _Batches, split: _Split, rng: np.random.Generator) -> None:
        config = batches.config
        picked = np.arange(split.val_user.size, dtype=np.int64)
        if config.max_eval_users is not None and picked.size > config.max_eval_users:
            picked = np.sort(rng.choice(picked.size, config.max_eval_users, replace=False))
        self.batches = batches
        self.rows = torch.from_numpy(split.val_pos[picked])
        self.targets = batches.items[self.rows].numpy()
        self.seen_indptr, self.seen_items = _csr_take(split.seen_indptr, split.seen_items, picked)
        self.history, self.mask = batches.history(self.rows)
        self.train_counts = torch.from_numpy(
            np.bincount(batches.items[batches.rows].numpy(), minlength=batches.n_items).astype(
                np.float32
            )
        )

    @property
    def size(self) -> int:
        return int(self.targets.size)

    def popularity(self) -> dict[str, float]:
        """The baseline: every shopper gets the training bestsellers."""
        counts = self.train_counts
        return _evaluate(
            lambda rows: counts.expand(rows.size, counts.shape[0]).clone(),
            self.seen_indptr,
            self.seen_items,
            self.targets,
            chunk=score_rows(self.batches.n_items),
        )

    @torch.no_grad()
    def model(self, model: TwoTower, *, with_user: bool = True) -> dict[str, float]:
        """The model's metrics; without the user vector, the query a new shopper gets."""
        b = self.batches
        items = model.all_items()
        keep = torch.full((self.size,), with_user)

        def scores(rows: npt.NDArray[np.int64]) -> torch.Tensor:
            at = self.rows[rows]
            query = model.query(
                b.users[at],
                keep[rows],
                self.history[rows],
                self.mask[rows],
                b.device[at],
                b.country[at],
            )
            return query @ items.T

        return _evaluate(
            scores,
            self.seen_indptr,
            self.seen_items,
            self.targets,
            chunk=score_rows(self.batches.n_items),
        )


def train(
    dataset: Dataset,
    config: TrainConfig,
    *,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    sync: Callable[[TwoTower], None] | None = None,
) -> TrainedModel:
    """Train on all but each shopper's latest new item; keep the epoch best on NDCG@10.

    Data parallel (training.distributed): with shard=(rank, world), each epoch
    this process trains on its 1/world of the shuffled examples (every rank
    draws the same permutation) in batches of config.batch_size, and
    sync(model) runs between backward and the optimizer step to average the
    gradients across processes. Model init and validation are identical on
    every rank, so every rank keeps the same weights and stops together.
    """
    began = time.perf_counter()
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    # Each rank draws its own dropout masks and negatives.
    gen = torch.Generator().manual_seed(config.seed + rank)
    if dataset.n_items < 2:
        raise ValueError(f"training needs at least 2 items, got {dataset.n_items}")

    inter = collapse_events(dataset, config.event_weights)
    # The validation sample is drawn here, first from rng, as _Validation did before.
    split = _split(inter, config.min_user_items, config.max_eval_users, rng)
    if split.train_pos.size == 0:
        raise ValueError("the dataset has no events to train on")
    if split.val_user.size == 0:
        raise ValueError(f"no shopper has {config.min_user_items} distinct items to validate on")
    edges = price_bucket_edges(dataset.item_price, config.price_buckets)
    model = TwoTower(
        item_category=torch.from_numpy(dataset.item_category.astype(np.int64)),
        item_brand=torch.from_numpy(dataset.item_brand.astype(np.int64)),
        item_price_bucket=torch.from_numpy(
            np.searchsorted(edges, dataset.item_price, side="right").astype(np.int64)
        ),
        category_ancestry=torch.from_numpy(category_ancestry(dataset.category_parent)),
        n_users=dataset.n_users,
        n_brands=len(dataset.brand_names),
        n_price_buckets=config.price_buckets,
        n_countries=len(dataset.country_codes),
        dim=config.dim,
    )
    optimizer = Adam(list(model.parameters()), lr=config.lr, weight_decay=config.weight_decay)
    batches = _Batches(inter, split.train_pos, dataset.n_items, len(dataset.country_codes), config)
    validation = _Validation(batches, split, rng)
    baseline = validation.popularity()
    logger.info(
        "training on %d interactions, validating on %d shoppers; popularity ndcg@10 %.4f",
        split.train_pos.size,
        validation.size,
        baseline["ndcg@10"],
    )

    history: list[EpochStats] = []
    best_state: dict[str, torch.Tensor] = {}
    best_ndcg, stale = -1.0, 0
    n_train = split.train_pos.size
    n_local = n_train // world if world > 1 else n_train  # equal shards: equal step counts
    n_batches = math.ceil(n_local / config.batch_size)
    log_every = max(1, n_batches // 100)
    for epoch in range(1, config.epochs + 1):
        epoch_began = time.perf_counter()
        model.train()
        shuffled = split.train_pos[rng.permutation(n_train)]
        order = torch.from_numpy(np.ascontiguousarray(shuffled[rank::world][:n_local]))
        curve: list[float] = []
        run_total = 0.0
        total = 0.0
        bar = tqdm(
            range(n_batches),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for b in bar:
            # Linear decay to lr_floor * lr over the whole run: big steps while
            # the vectors find their places, small ones once they are there.
            done = ((epoch - 1) * n_batches + b) / (config.epochs * n_batches)
            optimizer.lr = config.lr * (1.0 - (1.0 - config.lr_floor) * done)
            batch = batches.make(order[b * config.batch_size : (b + 1) * config.batch_size], gen)
            loss = model.loss(
                batch, negative_log_q=batches.negative_log_q, logq_weight=config.logq_weight
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if sync is not None:
                sync(model)
            optimizer.step()
            step_loss = float(loss.detach())
            total += step_loss
            run_total += step_loss
            if (b + 1) % log_every == 0 or b + 1 == n_batches:
                curve.append(run_total / ((b % log_every) + 1))
                run_total = 0.0
            if b % 50 == 0:
                bar.set_postfix(loss=f"{total / (b + 1):.4f}")
        bar.close()
        model.eval()
        metrics = validation.model(model)
        stats = EpochStats(
            epoch, total / n_batches, metrics, time.perf_counter() - epoch_began, tuple(curve)
        )
        history.append(stats)
        summary = (
            f"epoch {epoch}: loss {stats.loss:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + f" ({stats.seconds:.1f}s)"
        )
        if progress:
            tqdm.write(summary)
        logger.info(summary)
        if metrics["ndcg@10"] > best_ndcg:
            best_ndcg, stale = metrics["ndcg@10"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                logger.info("no NDCG@10 gain for %d epochs: stopping", stale)
                break
    model.load_state_dict(best_state)
    best = max(history, key=lambda h: h.metrics["ndcg@10"])
    return _trained_model(
        model,
        config,
        edges,
        history=tuple(history),
        best_epoch=best.epoch,
        baseline=baseline,
        history_only=validation.model(model, with_user=False),
        n_train=n_train,
        n_val=validation.size,
        seconds=time.perf_counter() - began,
    )


def _trained_model(
    model: TwoTower,
    config: TrainConfig,
    edges: npt.NDArray[np.float64],
    *,
    history: tuple[EpochStats, ...],
    best_epoch: int,
    baseline: dict[str, float],
    history_only: dict[str, float],
    n_train: int,
    n_val: int,
    seconds: float,
) -> TrainedModel:
    def f32(t: torch.Tensor) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(t.detach().numpy().astype(np.float32))

    with torch.no_grad():
        return TrainedModel(
            config=config,
            item_embeddings=f32(model.all_items()),
            item_tower_category=f32(model.category_table()),
            item_tower_brand=f32(model.brand.weight),
            item_tower_price=f32(model.price.weight),
            price_bucket_edges=edges,
            user_embeddings=f32(model.user.weight),
            history_projection=f32(model.history.weight),
            context_device=f32(model.device.weight),
            context_country=f32(model.country.weight),
            history=history,
            best_epoch=best_epoch,
            metrics=dict(history[best_epoch - 1].metrics),
            baseline_metrics=baseline,
            history_only_metrics=history_only,
            n_train_examples=n_train,
            n_validation_users=n_val,
            seconds=seconds,
        )
