"""Order-blind baselines in numpy: MostPop, EASE and implicit ALS, tuned on valid."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.protocol import Part, ScoreFn, Split, evaluate

logger = logging.getLogger(__name__)


def interaction_matrix(part: Part, n_items: int) -> npt.NDArray[np.float32]:
    """Dense binary user x item matrix, float32 (u, n); fine at ML-100K size."""
    matrix = np.zeros((part.n_users, n_items), dtype=np.float32)
    matrix[part.users(), part.items] = 1.0
    return matrix


@dataclass(frozen=True, slots=True)
class MostPop:
    """Train interaction counts: the same list for everyone.

    counts  float32 (n,)
    """

    counts: npt.NDArray[np.float32]

    @classmethod
    def fit(cls, split: Split) -> MostPop:
        return cls(counts=split.train_counts().astype(np.float32))

    def scorer(self, history: Part) -> ScoreFn:
        del history  # the same ranking for every user

        def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            return np.broadcast_to(self.counts, (users.shape[0], self.counts.shape[0]))

        return score


@dataclass(frozen=True, slots=True)
class EASE:
    """Embarrassingly shallow autoencoder (Steck 2019): scores = history @ B.

    weights  float32 (n, n), zero diagonal
    """

    weights: npt.NDArray[np.float32]

    @classmethod
    def fit(cls, split: Split, l2: float = 100.0) -> EASE:
        x = interaction_matrix(split.train, split.n_items).astype(np.float64)
        gram = x.T @ x + l2 * np.eye(split.n_items)
        precision = np.linalg.inv(gram)
        weights = -precision / np.diag(precision)
        np.fill_diagonal(weights, 0.0)
        return cls(weights=weights.astype(np.float32))

    def scorer(self, history: Part) -> ScoreFn:
        x = interaction_matrix(history, self.weights.shape[0])

        def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            result: npt.NDArray[np.float32] = x[users] @ self.weights
            return result

        return score


@dataclass(frozen=True, slots=True)
class ALS:
    """Implicit-feedback ALS (Hu, Koren, Volinsky 2008), confidence 1 + alpha.

    Users are folded in from their history at scoring time (one exact
    least-squares step against the fixed item factors), so test scores read
    train + valid like every other model here.

    item_factors  float64 (n, d)
    """

    item_factors: npt.NDArray[np.float64]
    reg: float
    alpha: float

    @classmethod
    def fit(
        cls,
        split: Split,
        factors: int = 64,
        reg: float = 10.0,
        alpha: float = 1.0,
        iterations: int = 15,
        seed: int = 0,
    ) -> ALS:
        rng = np.random.default_rng(seed)
        users = rng.normal(0.0, 0.01, (split.n_users, factors))
        items = rng.normal(0.0, 0.01, (split.n_items, factors))
        by_user = split.train
        by_item = _transpose(split.train, split.n_items)
        for _ in range(iterations):
            users = _solve(by_user, items, reg, alpha)
            items = _solve(by_item, users, reg, alpha)
        return cls(item_factors=items, reg=reg, alpha=alpha)

    def user_factors(self, history: Part) -> npt.NDArray[np.float64]:
        """float64 (u, d): each user's least-squares factors given the item factors."""
        return _solve(history, self.item_factors, self.reg, self.alpha)

    def scorer(self, history: Part) -> ScoreFn:
        factors = self.user_factors(history)

        def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
            result: npt.NDArray[np.float64] = factors[users] @ self.item_factors.T
            return result

        return score


def _transpose(part: Part, n_items: int) -> Part:
    """The same interactions grouped by item: rows are items, `items` hold user indexes."""
    users = part.users()
    order = np.argsort(part.items, kind="stable")
    lengths = np.bincount(part.items, minlength=n_items)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Part(indptr=indptr, items=users[order], timestamps=part.timestamps[order])


def _solve(
    rows: Part, fixed: npt.NDArray[np.float64], reg: float, alpha: float
) -> npt.NDArray[np.float64]:
    """One ALS half-step: for every row r, argmin over x of
    sum_j c_rj (p_rj - x . y_j)^2 + reg |x|^2 with c = 1 + alpha on observed
    entries (p = 1) and 1 elsewhere (p = 0).
    """
    d = fixed.shape[1]
    gram = fixed.T @ fixed + reg * np.eye(d)
    out = np.zeros((rows.n_users, d))
    for r in range(rows.n_users):
        y = fixed[rows.row(r)]
        if y.shape[0] == 0:
            continue
        a = gram + alpha * (y.T @ y)
        out[r] = np.linalg.solve(a, (1.0 + alpha) * y.sum(axis=0))
    return out


def tune_ease(split: Split, grid: Sequence[float] = (20, 50, 100, 200, 500, 1000, 2000)) -> float:
    """The l2 with the best valid NDCG@10."""
    best, best_l2 = -1.0, grid[0]
    for l2 in grid:
        model = EASE.fit(split, l2=l2)
        ndcg = evaluate(model.scorer(split.history("valid")), split, "valid")["ndcg@10"]
        logger.info("EASE l2=%s valid ndcg@10=%.4f", l2, ndcg)
        if ndcg > best:
            best, best_l2 = ndcg, l2
    return float(best_l2)


def tune_als(
    split: Split,
    regs: Sequence[float] = (1.0, 10.0, 50.0),
    alphas: Sequence[float] = (1.0, 5.0, 20.0),
    factors: int = 64,
) -> tuple[float, float]:
    """The (reg, alpha) with the best valid NDCG@10 at seed 0."""
    best, best_params = -1.0, (regs[0], alphas[0])
    for reg, alpha in itertools.product(regs, alphas):
        model = ALS.fit(split, factors=factors, reg=reg, alpha=alpha)
        ndcg = evaluate(model.scorer(split.history("valid")), split, "valid")["ndcg@10"]
        logger.info("ALS reg=%s alpha=%s valid ndcg@10=%.4f", reg, alpha, ndcg)
        if ndcg > best:
            best, best_params = ndcg, (reg, alpha)
    return best_params
