"""The offline quality protocol (shared/eval/PROTOCOL.md): temporal split and evaluator."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from rich.console import Console

    from training.sequential import SeqConfig

Phase = Literal["valid", "test"]
# Users batch (int64 user indexes) -> scores (batch, n_items); higher is better.
ScoreFn = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.floating]]

# md5 of the TSV rendering of each part of the ML-100K split (PROTOCOL.md).
PROTOCOL_MD5 = {
    "train": "7d535f3fdcce7fe5368e7faabc780537",
    "valid": "2c67a7b3119deeb8437143c70f9ef4a2",
    "test": "d0d4eeb75a01ec15a4a84fb37a36ac56",
}
MIN_SPLIT_LENGTH = 5  # users with fewer interactions stay entirely in train
DEFAULT_KS = (10, 50)


@dataclass(frozen=True, slots=True)
class Part:
    """Interactions grouped by user (CSR), each user's rows in protocol order.

    indptr      int64 (u+1,)  rows of user j are [indptr[j], indptr[j+1])
    items       int32 (e,)    item indexes
    timestamps  int64 (e,)    unix seconds
    """

    indptr: npt.NDArray[np.int64]
    items: npt.NDArray[np.int32]
    timestamps: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.indptr.shape[0]) - 1

    def lengths(self) -> npt.NDArray[np.int64]:
        """Rows per user, int64 (u,)."""
        return np.diff(self.indptr)

    def users(self) -> npt.NDArray[np.int32]:
        """The user index of every row, int32 (e,)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int32), self.lengths())

    def row(self, user: int) -> npt.NDArray[np.int32]:
        """The items of one user, oldest first."""
        return self.items[self.indptr[user] : self.indptr[user + 1]]


@dataclass(frozen=True, slots=True)
class Split:
    """A per-user temporal split over an explicit item universe.

    user_ids  int64 (u,)  raw user ids, ascending; user index j is user_ids[j]
    item_ids  int64 (n,)  raw item ids, ascending; item index i is item_ids[i]
    train, valid, test    Part each over all u users
    """

    user_ids: npt.NDArray[np.int64]
    item_ids: npt.NDArray[np.int64]
    train: Part
    valid: Part
    test: Part

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    def history(self, phase: Phase) -> Part:
        """What a model may read as input: train for valid, train + valid for test."""
        if phase == "valid":
            return self.train
        return _concat(self.train, self.valid)

    def ground_truth(self, phase: Phase) -> Part:
        return self.valid if phase == "valid" else self.test

    def train_counts(self) -> npt.NDArray[np.int64]:
        """Train interactions per item, int64 (n,)."""
        return np.bincount(self.train.items, minlength=self.n_items).astype(np.int64)


def _concat(first: Part, second: Part) -> Part:
    """Per user, the rows of `first` followed by the rows of `second`."""
    lengths = first.lengths() + second.lengths()
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Row r of `first` lands after the second-part rows of earlier users.
    dest_first = np.arange(len(first)) + np.repeat(second.indptr[:-1], first.lengths())
    dest_second = np.arange(len(second)) + np.repeat(first.indptr[1:], second.lengths())
    items = np.empty(int(indptr[-1]), dtype=np.int32)
    stamps = np.empty(int(indptr[-1]), dtype=np.int64)
    items[dest_first], items[dest_second] = first.items, second.items
    stamps[dest_first], stamps[dest_second] = first.timestamps, second.timestamps
    return Part(indptr=indptr, items=items, timestamps=stamps)


def temporal_split(
    user_id: npt.NDArray[np.int64],
    item_id: npt.NDArray[np.int64],
    timestamp: npt.NDArray[np.int64],
    item_ids: npt.NDArray[np.int64] | None = None,
) -> Split:
    """Split interactions per user by time, exactly as PROTOCOL.md says.

    Each user's rows are sorted by (timestamp, item id as an integer); with n
    rows, the last max(1, n // 10) are test, the max(1, n // 10) before them
    valid, the rest train; users with n < 5 stay entirely in train. Items are
    indexed over `item_ids` (default: the items that occur), ascending, so a
    smaller index is a smaller item id.
    """
    user_id = np.asarray(user_id, dtype=np.int64)
    item_id = np.asarray(item_id, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    if not user_id.shape == item_id.shape == timestamp.shape or user_id.ndim != 1:
        raise ValueError("user_id, item_id and timestamp must be 1-d arrays of one length")
    universe = np.unique(item_id if item_ids is None else np.asarray(item_ids, dtype=np.int64))
    item_index = np.searchsorted(universe, item_id)
    if np.any(item_index >= universe.shape[0]) or np.any(
        universe[np.minimum(item_index, universe.shape[0] - 1)] != item_id
    ):
        raise ValueError("item_id holds ids that are not in item_ids")
    user_ids, user_index = np.unique(user_id, return_inverse=True)
    order = np.lexsort((item_id, timestamp, user_index))
    users = user_index[order]
    counts = np.bincount(users, minlength=user_ids.shape[0]).astype(np.int64)
    n_hold = np.where(counts >= MIN_SPLIT_LENGTH, np.maximum(1, counts // 10), 0)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = np.arange(order.shape[0], dtype=np.int64) - start[users]  # rank within user
    n_train = (counts - 2 * n_hold)[users]
    which = (pos >= n_train).astype(np.int8) + (pos >= n_train + n_hold[users]).astype(np.int8)
    items = item_index[order].astype(np.int32)
    stamps = timestamp[order]

    def part(code: int) -> Part:
        keep = which == code
        lengths = np.bincount(users[keep], minlength=user_ids.shape[0])
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Part(indptr=indptr, items=items[keep], timestamps=stamps[keep])

    return Split(
        user_ids=user_ids.astype(np.int64),
        item_ids=universe,
        train=part(0),
        valid=part(1),
        test=part(2),
    )


def part_tsv(split: Split, part: Part) -> bytes:
    """The TSV rendering PROTOCOL.md fingerprints: raw ids, integer timestamps."""
    users = split.user_ids[part.users()]
    items = split.item_ids[part.items]
    lines = ["user_id\titem_id\ttimestamp\n"]
    lines.extend(
        f"{u}\t{i}\t{t}\n"
        for u, i, t in zip(users.tolist(), items.tolist(), part.timestamps.tolist(), strict=True)
    )
    return "".join(lines).encode("ascii")


def fingerprints(split: Split) -> dict[str, str]:
    """md5 of each part's TSV; equal to PROTOCOL_MD5 for the protocol's ML-100K split."""
    return {
        name: hashlib.md5(part_tsv(split, part), usedforsecurity=False).hexdigest()
        for name, part in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }


def seen_mask(part: Part, users: npt.NDArray[np.int64], n_items: int) -> npt.NDArray[np.bool_]:
    """bool (len(users), n_items): True where the user has a row in `part`."""
    mask = np.zeros((users.shape[0], n_items), dtype=np.bool_)
    lo, hi = part.indptr[users], part.indptr[users + 1]
    counts = hi - lo
    rows = np.repeat(np.arange(users.shape[0]), counts)
    offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts)
    cols = part.items[np.arange(rows.shape[0]) + offsets]
    mask[rows, cols] = True
    return mask


def top_k(
    scores: npt.NDArray[np.floating], exclude: npt.NDArray[np.bool_], k: int
) -> npt.NDArray[np.int64]:
    """(item_ids) the top-k candidates per row: score descending, ties by smaller index.

    scores float (b, n), exclude bool (b, n). Returns int64 (b, k); -1 pads
    rows with fewer than k candidates.
    """
    masked = np.where(exclude, -np.inf, scores.astype(np.float64))
    # A stable sort keeps equal scores in index order: ties go to the smaller id.
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    taken = np.take_along_axis(exclude, order, axis=1)
    return np.where(taken, -1, order).astype(np.int64)


def _popularity_percentile(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Mid-rank percentile of each item's train count: 0 least, 1 most popular."""
    n = counts.shape[0]
    sorted_counts = np.sort(counts)
    below = np.searchsorted(sorted_counts, counts, side="left")
    equal = np.searchsorted(sorted_counts, counts, side="right") - below
    result: npt.NDArray[np.float64] = (below + 0.5 * (equal - 1)) / max(n - 1, 1)
    return result


def evaluate(
    score: ScoreFn,
    split: Split,
    phase: Phase,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
) -> dict[str, float]:
    """Full-ranking metrics of `score` on one phase, as PROTOCOL.md defines them.

    Candidates are all items minus the user's history (train for valid, train +
    valid for test); ground truth is the phase's items. Means are over users
    with at least one ground-truth item. Per K: recall@K, ndcg@K, hit@K;
    coverage@K (distinct recommended items / n_items) and pop_pct@K (mean
    train-popularity percentile of recommended items, 1 = most popular).
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    history, truth = split.history(phase), split.ground_truth(phase)
    users = np.flatnonzero(truth.lengths() > 0).astype(np.int64)
    n_items, max_k = split.n_items, max(ks)
    pop_pct = _popularity_percentile(split.train_counts())
    discount = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))
    ideal = np.cumsum(discount)
    sums: dict[str, float] = {}
    recommended = {k: np.zeros(n_items, dtype=np.bool_) for k in ks}
    pop_sum = dict.fromkeys(ks, 0.0)
    pop_count = dict.fromkeys(ks, 0)
    for lo in range(0, users.shape[0], batch_size):
        batch = users[lo : lo + batch_size]
        scores = np.asarray(score(batch))
        if scores.shape != (batch.shape[0], n_items):
            raise ValueError(
                f"score must return shape ({batch.shape[0]}, {n_items}), got {scores.shape}"
            )
        if np.isnan(scores).any():
            raise ValueError("score returned NaN")
        top = top_k(scores, seen_mask(history, batch, n_items), max_k)
        valid_slot = top >= 0
        gt = seen_mask(truth, batch, n_items)
        hits = np.take_along_axis(gt, np.maximum(top, 0), axis=1) & valid_slot
        n_truth = truth.lengths()[batch].astype(np.float64)
        for k in ks:
            hk = hits[:, :k]
            n_hit = hk.sum(axis=1)
            dcg = (hk * discount[:k]).sum(axis=1)
            idcg = ideal[np.minimum(n_truth, k).astype(np.int64) - 1]
            for name, values in (
                (f"recall@{k}", n_hit / n_truth),
                (f"ndcg@{k}", dcg / idcg),
                (f"hit@{k}", (n_hit > 0).astype(np.float64)),
            ):
                sums[name] = sums.get(name, 0.0) + float(values.sum())
            slots = top[:, :k][valid_slot[:, :k]]
            recommended[k][slots] = True
            pop_sum[k] += float(pop_pct[slots].sum())
            pop_count[k] += int(slots.shape[0])
    n_users = max(int(users.shape[0]), 1)
    result = {name: total / n_users for name, total in sums.items()}
    for k in ks:
        result[f"coverage@{k}"] = float(recommended[k].sum()) / n_items
        result[f"pop_pct@{k}"] = pop_sum[k] / max(pop_count[k], 1)
    return dict(sorted(result.items(), key=lambda kv: _metric_order(kv[0])))


def _metric_order(name: str) -> tuple[int, int]:
    metric, k = name.split("@")
    names = ("recall", "ndcg", "hit", "coverage", "pop_pct")
    return names.index(metric), int(k)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{mean, std} with the sample standard deviation (ddof=1; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.shape[0] > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std if math.isfinite(std) else 0.0}


# ---- the ML-100K comparison ---------------------------------------------------

# PROTOCOL.md: NDCG@10 >= 1.05 x the best peer (GRU4Rec 0.1463), Recall@10 > 0.1437.
TARGET_NDCG10 = 0.1536
TARGET_RECALL10 = 0.1437
REPORT_METRICS = ("recall@10", "ndcg@10", "hit@10", "recall@50", "coverage@10", "pop_pct@10")


@dataclass(frozen=True, slots=True)
class _Fitted:
    """One model fitted for one seed, ready to score test."""

    score: ScoreFn  # reads train + valid history
    params: dict[str, object]
    valid_ndcg10: float
    extras: dict[str, float]  # per-run facts, e.g. the early-stopping epoch


def _run_model(
    name: str, fit: Callable[[int], _Fitted], split: Split, seeds: Sequence[int]
) -> dict[str, object]:
    """Fit once per seed, score test; aggregate mean and std per metric."""
    runs: list[dict[str, float]] = []
    params: dict[str, object] = {}
    for seed in seeds:
        start, start_cpu = time.perf_counter(), time.process_time()
        fitted = fit(seed)
        train_s = time.perf_counter() - start
        train_cpu_s = time.process_time() - start_cpu
        params = fitted.params
        runs.append(
            {"seed": seed}
            | evaluate(fitted.score, split, "test")
            | {
                "valid_ndcg@10": fitted.valid_ndcg10,
                "train_s": train_s,
                "train_cpu_s": train_cpu_s,
            }
            | fitted.extras
        )
    return {
        "name": name,
        "params": params,
        "test": {m: mean_std([r[m] for r in runs]) for m in REPORT_METRICS},
        "valid_ndcg@10": mean_std([r["valid_ndcg@10"] for r in runs]),
        "train_s": mean_std([r["train_s"] for r in runs]),
        "train_cpu_s": mean_std([r["train_cpu_s"] for r in runs]),
        "runs": runs,
    }


def evaluate_ml100k(
    seeds: Sequence[int] = (0, 1, 2),
    cache_dir: Path | None = None,
    models: Sequence[str] = ("MostPop", "EASE", "ALS", "SASRec"),
    progress: Callable[[str], None] | None = None,
    sequential_config: SeqConfig | None = None,
) -> dict[str, object]:
    """Run the PROTOCOL.md comparison; a JSON-ready report.

    Each model is trained on train (hyper-parameters are the ones tuned on
    valid, see baselines.tune_* and sequential.SeqConfig) once per seed and
    scored on test; metrics are mean and sample std over seeds. train_s
    (wall clock) and train_cpu_s (process CPU time, stable on a shared
    machine) include fitting and the valid evaluation used for early stopping.
    `sequential_config` overrides the tuned SeqConfig (e.g. fewer epochs).
    """
    from dataclasses import asdict

    from training.baselines import ALS, EASE, MostPop
    from training.ml100k import load_ml100k
    from training.sequential import SeqConfig, SequentialModel, train_sequential

    say = progress or (lambda message: None)
    data = load_ml100k(cache_dir)
    split = temporal_split(data.user_id, data.item_id, data.timestamp, data.item_ids)
    prints = fingerprints(split)
    valid_history, test_history = split.history("valid"), split.history("test")

    def valid_ndcg(score: ScoreFn) -> float:
        return evaluate(score, split, "valid")["ndcg@10"]

    def fit_mostpop(seed: int) -> _Fitted:
        model = MostPop.fit(split)
        return _Fitted(model.scorer(test_history), {}, valid_ndcg(model.scorer(valid_history)), {})

    def fit_ease(seed: int) -> _Fitted:
        l2 = 100.0  # baselines.tune_ease
        model = EASE.fit(split, l2=l2)
        return _Fitted(
            model.scorer(test_history), {"l2": l2}, valid_ndcg(model.scorer(valid_history)), {}
        )

    def fit_als(seed: int) -> _Fitted:
        factors, reg, alpha, iterations = 64, 10.0, 1.0, 15  # baselines.tune_als
        model = ALS.fit(split, factors, reg, alpha, iterations, seed)
        params: dict[str, object] = {
            "factors": factors,
            "reg": reg,
            "alpha": alpha,
            "iterations": iterations,
        }
        return _Fitted(
            model.scorer(test_history), params, valid_ndcg(model.scorer(valid_history)), {}
        )

    sequential_models: dict[int, SequentialModel] = {}

    def fit_sasrec(seed: int) -> _Fitted:
        config = sequential_config or SeqConfig()
        model = train_sequential(split, config, seed)
        sequential_models[seed] = model
        return _Fitted(
            model.scorer(test_history),
            dict(asdict(config)),
            model.valid_ndcg10,
            {"best_epoch": model.best_epoch, "epochs": len(model.curve)},
        )

    def fit_served(seed: int) -> _Fitted:
        model = sequential_models[seed]
        served = serve_sequential(model, split)
        return _Fitted(served.score, {}, model.valid_ndcg10, served.extras)

    fits = {"MostPop": fit_mostpop, "EASE": fit_ease, "ALS": fit_als, "SASRec": fit_sasrec}
    unknown = sorted(set(models) - set(fits))
    if unknown:
        raise ValueError(f"models must be among {sorted(fits)}, got {unknown}")
    results = []
    for name in models:
        say(f"{name}: {len(seeds)} seeds")
        results.append(_run_model(name, fits[name], split, seeds))
        if name == "SASRec":
            say(f"{SERVED_NAME}: {len(seeds)} seeds")
            served = _run_model(SERVED_NAME, fit_served, split, seeds)
            results.append(served | {"served": True})
    return {
        "dataset": "ml100k",
        "protocol": "PROTOCOL.md (per-user temporal split, full ranking)",
        "fingerprints": prints,
        "fingerprints_match_protocol": prints == PROTOCOL_MD5,
        "counts": {
            "users": split.n_users,
            "items": split.n_items,
            "train": len(split.train),
            "valid": len(split.valid),
            "test": len(split.test),
        },
        "seeds": list(seeds),
        "target": {"ndcg@10": TARGET_NDCG10, "recall@10": TARGET_RECALL10},
        "models": results,
    }


SERVED_NAME = "endcap served: artifact + FAISS"


@dataclass(frozen=True, slots=True)
class Served:
    """A model's test ranking as the server computes it (see serve_sequential)."""

    score: ScoreFn  # rank-derived scores: the served top list, best first
    extras: dict[str, float]


def serve_sequential(model: Any, split: Split, k: int = 50) -> Served:
    """Test rankings through the server's own path: export `model`
    (a training.sequential.SequentialModel) to an artifact in a temp dir,
    load it with server.artifact, build each test user's query with
    server.domain.engine.Engine.encode (trained history = train, the valid
    items as live session views, newest first, as TrackEvents leaves them),
    then search the artifact's FAISS index: over-fetch by the history size,
    drop seen items, keep the top k.

    extras: ann_recall@10/@50 (overlap with the exact top lists of the same
    queries), query_max_abs_diff (served vs offline encoder vectors), and
    encode_us (mean Engine.encode time per user).
    """
    import tempfile

    from server.artifact import load_artifact
    from server.domain.engine import Engine
    from server.domain.query import Context, Profile
    from server.infra.threads import faiss_threads
    from training.export import export_sequential
    from training.sequential import ITEM_EMBEDDINGS, encode_history

    users = np.flatnonzero(split.test.lengths() > 0).astype(np.int64)
    item_names = [str(i) for i in split.item_ids.tolist()]
    user_names = [str(u) for u in split.user_ids.tolist()]
    seen = seen_mask(split.history("test"), users, split.n_items)
    with tempfile.TemporaryDirectory(prefix="endcap-ml100k-") as tmp:
        path = export_sequential(
            model, Path(tmp), item_ids=item_names, user_ids=user_names, histories=split.train
        )
        artifact = load_artifact(path)
        engine = Engine(artifact)
        queries = np.zeros((users.shape[0], artifact.manifest.dim), dtype=np.float32)
        encode_s = 0.0
        for j, u in enumerate(users.tolist()):
            valid = split.valid.row(u)
            stamps = split.valid.timestamps[split.valid.indptr[u] : split.valid.indptr[u + 1]]
            recent = tuple(
                (item_names[i], float(t))
                for i, t in zip(valid[::-1].tolist(), stamps[::-1].tolist(), strict=True)
            )
            start = time.perf_counter()
            q, _ = engine.encode(Context(user_id=user_names[u]), Profile(recent=recent), 0.0)
            encode_s += time.perf_counter() - start
            queries[j] = q
        fetch = min(split.n_items, k + int(seen.sum(axis=1).max(initial=0)))
        with faiss_threads(1):
            _, found = artifact.index.search(queries, fetch)
        table = np.asarray(artifact[ITEM_EMBEDDINGS], dtype=np.float32)
    found = found.astype(np.int64)
    ok = (found >= 0) & ~np.take_along_axis(seen, np.maximum(found, 0), axis=1)
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    ann = np.where(np.take_along_axis(ok, order, axis=1), np.take_along_axis(found, order, 1), -1)
    exact = top_k(queries @ table.T, seen, k)
    offline = encode_history(model.weights, split.history("test"))[users]
    extras = {
        f"ann_recall@{kk}": float(
            np.mean(
                [
                    len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max((e >= 0).sum(), 1)
                    for a, e in zip(ann[:, :kk], exact[:, :kk], strict=True)
                ]
            )
        )
        for kk in (10, k)
    }
    extras["query_max_abs_diff"] = float(np.abs(queries - offline).max()) if users.size else 0.0
    extras["encode_us"] = 1e6 * encode_s / max(users.shape[0], 1)
    # Scores that reproduce the served list: rank-derived for listed items, far below otherwise.
    dense = np.full((split.n_users, split.n_items), -1e30, dtype=np.float32)
    rows = np.repeat(users, k).reshape(-1, k)
    listed = ann >= 0
    dense[rows[listed], ann[listed]] = np.broadcast_to(np.arange(k, 0, -1), ann.shape)[listed]

    def score(batch: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return dense[batch]

    return Served(score, extras)


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Render evaluate_ml100k's report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    out = console or Console()
    prints = report["fingerprints"]
    match = "matches" if report["fingerprints_match_protocol"] else "DOES NOT MATCH"
    out.print(
        f"ML-100K split md5 train {prints['train']} valid {prints['valid']} "
        f"test {prints['test']} ({match} PROTOCOL.md)"
    )
    table = Table(title=f"test metrics, mean ± std over seeds {report['seeds']}")
    table.add_column("model")
    for metric in REPORT_METRICS:
        table.add_column(metric, justify="right")
    table.add_column("train s", justify="right")
    table.add_column("cpu s", justify="right")
    for model in report["models"]:
        cells = [
            f"{model['test'][m]['mean']:.4f} ± {model['test'][m]['std']:.4f}"
            for m in REPORT_METRICS
        ]
        wall, cpu = model["train_s"], model["train_cpu_s"]
        timing = (
            ("", "")  # export + queries, not training
            if model.get("served")
            else (
                f"{wall['mean']:.1f} ± {wall['std']:.1f}",
                f"{cpu['mean']:.1f} ± {cpu['std']:.1f}",
            )
        )
        table.add_row(model["name"], *cells, *timing)
    out.print(table)
    for model in report["models"]:
        if model.get("served"):
            runs = model["runs"]
            out.print(
                f"{model['name']}: ANN top-10 recall vs exact "
                f"{np.mean([r['ann_recall@10'] for r in runs]):.4f} "
                f"(top-50 {np.mean([r['ann_recall@50'] for r in runs]):.4f}); "
                f"served vs offline query max |Δ| "
                f"{max(r['query_max_abs_diff'] for r in runs):.2e}; "
                f"Engine.encode {np.mean([r['encode_us'] for r in runs]):.0f} µs per user"
            )
    target = report["target"]
    out.print(f"target: ndcg@10 >= {target['ndcg@10']}, recall@10 > {target['recall@10']}")
