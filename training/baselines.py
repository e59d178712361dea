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

    Each half-step runs a few conjugate-gradient steps warm-started from the
    previous factors, as benfred/implicit does. The interaction matrix is
    dense, so every step is two matrix products: fine at ML-100K size, not a
    production trainer. Users are folded in from their history at scoring
    time (CG from zero until converged), so test scores read train + valid
    like every other model here.

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
        cg_steps: int = 3,
    ) -> ALS:
        rng = np.random.default_rng(seed)
        users = rng.normal(0.0, 0.01, (split.n_users, factors))
        items = rng.normal(0.0, 0.01, (split.n_items, factors))
        by_user = interaction_matrix(split.train, split.n_items).astype(np.float64)
        by_item = np.ascontiguousarray(by_user.T)
        for _ in range(iterations):
            users = solve_cg(by_user, items, users, reg, alpha, cg_steps)
            items = solve_cg(by_item, users, items, reg, alpha, cg_steps)
        return cls(item_factors=items, reg=reg, alpha=alpha)

    def user_factors(self, history: Part, cg_steps: int = 32) -> npt.NDArray[np.float64]:
        """float64 (u, d): each user's least-squares factors given the item factors."""
        observed = interaction_matrix(history, self.item_factors.shape[0]).astype(np.float64)
        start = np.zeros((history.n_users, self.item_factors.shape[1]))
        return solve_cg(observed, self.item_factors, start, self.reg, self.alpha, cg_steps)

    def scorer(self, history: Part) -> ScoreFn:
        factors = self.user_factors(history)

        def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
            result: npt.NDArray[np.float64] = factors[users] @ self.item_factors.T
            return result

        return score


def solve_cg(
    observed: npt.NDArray[np.float64],
    fixed: npt.NDArray[np.float64],
    start: npt.NDArray[np.float64],
    reg: float,
    alpha: float,
    steps: int,
) -> npt.NDArray[np.float64]:
    """One ALS half-step by conjugate gradient from `start` (r, d).

    observed float64 (r, m) binary, fixed float64 (m, d). For every row r it
    approaches argmin over x of sum_j c_rj (p_rj - x . y_j)^2 + reg |x|^2,
    with p = observed and c = 1 + alpha * observed, i.e. the solution of
    (Y'Y + reg I + alpha sum_j p_rj y_j y_j') x = (1 + alpha) sum_j p_rj y_j.
    With steps >= d it is exact up to rounding.
    """
    d = fixed.shape[1]
    gram = fixed.T @ fixed + reg * np.eye(d)

    def apply(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        result: npt.NDArray[np.float64] = x @ gram + alpha * (((x @ fixed.T) * observed) @ fixed)
        return result

    x = start.copy()
    residual = (1.0 + alpha) * (observed @ fixed) - apply(x)
    direction = residual.copy()
    norm = np.einsum("rd,rd->r", residual, residual)
    for _ in range(steps):
        applied = apply(direction)
        curvature = np.einsum("rd,rd->r", direction, applied)
        # Converged rows (zero residual) have zero curvature: leave them be.
        step = np.divide(norm, curvature, out=np.zeros_like(norm), where=curvature > 0)
        x += step[:, None] * direction
        residual -= step[:, None] * applied
        new_norm = np.einsum("rd,rd->r", residual, residual)
        ratio = np.divide(new_norm, norm, out=np.zeros_like(norm), where=norm > 0)
        direction = residual + ratio[:, None] * direction
        norm = new_norm
    return x


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
