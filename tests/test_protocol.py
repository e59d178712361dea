"""The offline protocol: split invariants and md5s, metric definitions, numpy encoder parity."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from rich.console import Console

from training.baselines import EASE, MostPop, solve_cg
from training.ml100k import DatasetUnavailable, cache_dir_from_env, default_cache_dir, load_ml100k
from training.protocol import (
    PROTOCOL_MD5,
    Part,
    ScoreFn,
    Split,
    evaluate,
    evaluate_ml100k,
    fingerprints,
    mean_std,
    print_report,
    temporal_split,
    top_k,
)
from training.sequential import (
    NUM_HEADS,
    SeqConfig,
    SequentialModel,
    encode_sequence,
    encode_sequences,
    init_weights,
    left_padded,
    torch_forward,
)


def _part(rows: list[list[int]]) -> Part:
    lengths = [len(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.array([i for r in rows for i in r], dtype=np.int32)
    return Part(indptr=indptr, items=items, timestamps=np.arange(items.shape[0], dtype=np.int64))


def _split(train: list[list[int]], valid: list[list[int]], test: list[list[int]], n: int) -> Split:
    return Split(
        user_ids=np.arange(len(train), dtype=np.int64) + 1,
        item_ids=np.arange(n, dtype=np.int64) + 1,
        train=_part(train),
        valid=_part(valid),
        test=_part(test),
    )


def _fixed(scores: list[list[float]]) -> ScoreFn:
    table = np.array(scores, dtype=np.float64)

    def score(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return table[users]

    return score


# ---- split ------------------------------------------------------------------


def test_split_counts_order_and_ties() -> None:
    # User 7: 12 rows -> 10 train, 1 valid, 1 test; two rows share the last
    # timestamp, so item id decides which is test. User 3: 4 rows stay in train.
    user = np.array([7] * 12 + [3] * 4, dtype=np.int64)
    item = np.array([*range(20, 30), 41, 40, 1, 2, 3, 4], dtype=np.int64)
    ts = np.array([*range(100, 110), 500, 500, 5, 6, 7, 8], dtype=np.int64)
    split = temporal_split(user, item, ts)
    assert split.user_ids.tolist() == [3, 7]
    assert split.train.lengths().tolist() == [4, 10]
    assert split.valid.lengths().tolist() == [0, 1]
    assert split.test.lengths().tolist() == [0, 1]
    assert split.item_ids[split.valid.row(1)].tolist() == [40]
    assert split.item_ids[split.test.row(1)].tolist() == [41]
    history = split.history("test")
    assert split.item_ids[history.row(1)].tolist() == [*range(20, 30), 40]
    assert split.item_ids[history.row(0)].tolist() == [1, 2, 3, 4]


def test_split_sizes_follow_n_div_10() -> None:
    user = np.repeat(np.arange(4, dtype=np.int64), [5, 19, 20, 31])
    item = np.concatenate([np.arange(k) for k in (5, 19, 20, 31)]).astype(np.int64)
    split = temporal_split(user, item, np.zeros_like(user))
    assert split.test.lengths().tolist() == [1, 1, 2, 3]
    assert split.valid.lengths().tolist() == [1, 1, 2, 3]
    assert split.train.lengths().tolist() == [3, 17, 16, 25]


def test_split_rejects_items_outside_the_universe() -> None:
    with pytest.raises(ValueError, match="not in item_ids"):
        temporal_split(
            np.array([1]), np.array([9]), np.array([0]), item_ids=np.array([1, 2], dtype=np.int64)
        )


@pytest.fixture(scope="module")
def ml100k_split() -> Split:
    try:
        data = load_ml100k(default_cache_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"recbole==1.2.1 wheel cannot be downloaded, so ML-100K is unavailable: {exc}")
    return temporal_split(data.user_id, data.item_id, data.timestamp, data.item_ids)


def test_ml100k_split_matches_protocol(ml100k_split: Split) -> None:
    split = ml100k_split
    assert (split.n_users, split.n_items) == (943, 1682)
    assert (len(split.train), len(split.valid), len(split.test)) == (80808, 9596, 9596)
    assert (split.valid.lengths() > 0).all() and (split.test.lengths() > 0).all()
    in_train = np.zeros(split.n_items, dtype=np.bool_)
    in_train[split.train.items] = True
    assert int(in_train.sum()) == 1615
    cold = ~in_train[split.test.items]
    assert (int(cold.sum()), np.unique(split.test.items[cold]).shape[0]) == (48, 41)
    # Within each user, (timestamp, item id) strictly increases from train
    # through valid to test.
    history = split.history("test")
    for user in range(split.n_users):
        lo, hi = history.indptr[user], history.indptr[user + 1]
        tlo, thi = split.test.indptr[user], split.test.indptr[user + 1]
        stamps = np.concatenate([history.timestamps[lo:hi], split.test.timestamps[tlo:thi]])
        ids = split.item_ids[np.concatenate([history.row(user), split.test.row(user)])]
        keys = list(zip(stamps.tolist(), ids.tolist(), strict=True))
        assert keys == sorted(set(keys))
    assert fingerprints(split) == PROTOCOL_MD5


def test_ml100k_mostpop_reproduces_protocol_row(ml100k_split: Split) -> None:
    split = ml100k_split
    model = MostPop.fit(split)
    got = evaluate(model.scorer(split.history("test")), split, "test")
    assert round(got["recall@10"], 4) == 0.0598
    assert round(got["ndcg@10"], 4) == 0.0716
    assert round(got["hit@10"], 4) == 0.3393
    assert round(got["recall@50"], 4) == 0.1834


def test_ml100k_features() -> None:
    try:
        data = load_ml100k(default_cache_dir())
    except DatasetUnavailable as exc:
        pytest.skip(f"recbole==1.2.1 wheel cannot be downloaded, so ML-100K is unavailable: {exc}")
    assert data.n_interactions == 100_000
    assert data.item_ids.tolist() == list(range(1, 1683))
    assert data.user_ids.tolist() == list(range(1, 944))
    assert data.item_genres.shape == (1682, len(data.genre_names))
    assert data.item_genres.any(axis=1).all()
    assert data.item_year[0] == 1995 and (data.item_year == -1).sum() == 2
    assert set(data.user_gender.tolist()) == {0, 1}


def test_cache_dir_from_env(tmp_path: Path) -> None:
    assert cache_dir_from_env({"ENDCAP_DATA_CACHE": str(tmp_path)}) == tmp_path
    assert cache_dir_from_env({}) == default_cache_dir()


# ---- metrics ----------------------------------------------------------------


def test_ties_go_to_the_smaller_item_id() -> None:
    # All scores equal: the ranking is item order, minus the train item 0.
    split = _split(train=[[0]], valid=[[2]], test=[[3]], n=5)
    got = evaluate(_fixed([[1.0] * 5]), split, "valid", ks=(1, 2))
    assert got["recall@1"] == 0.0 and got["hit@1"] == 0.0 and got["ndcg@1"] == 0.0
    assert got["recall@2"] == 1.0 and got["hit@2"] == 1.0
    assert got["ndcg@2"] == pytest.approx(1.0 / math.log2(3))


def test_more_truth_than_k_normalises_ndcg_by_k() -> None:
    # |T| = 3 > K = 2 and both top-2 are hits: recall 2/3 but NDCG 1.
    split = _split(train=[[0]], valid=[[1, 2, 3]], test=[[4]], n=6)
    scores = [[0.0, 9.0, 8.0, 1.0, 0.0, 0.0]]
    got = evaluate(_fixed(scores), split, "valid", ks=(2, 4))
    assert got["recall@2"] == pytest.approx(2 / 3)
    assert got["ndcg@2"] == pytest.approx(1.0)
    # At K = 4 the list is 1, 2, 3, 4 (the 0.0 tie goes to item 4, item 0 is seen).
    assert got["recall@4"] == pytest.approx(1.0)
    assert got["ndcg@4"] == pytest.approx(1.0)


def test_ndcg_with_a_miss_in_front() -> None:
    split = _split(train=[[5]], valid=[[1, 3]], test=[[2]], n=6)
    scores = [[5.0, 4.0, 0.0, 3.0, 0.0, 9.0]]  # list: 0, 1, 3, ... (5 is seen)
    got = evaluate(_fixed(scores), split, "valid", ks=(3,))
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert got["ndcg@3"] == pytest.approx(dcg / idcg)
    assert got["recall@3"] == 1.0 and got["hit@3"] == 1.0


def test_test_phase_excludes_train_and_valid() -> None:
    # The seen items score highest; they must never take a slot.
    split = _split(train=[[0]], valid=[[1]], test=[[2]], n=4)
    got = evaluate(_fixed([[9.0, 8.0, 1.0, 0.0]]), split, "test", ks=(1,))
    assert got["recall@1"] == 1.0 and got["ndcg@1"] == 1.0
    assert got["coverage@1"] == 0.25


def test_means_over_users_with_truth_only() -> None:
    split = _split(train=[[0], [0], [0]], valid=[[1], [2], []], test=[[3], [3], [3]], n=4)
    got = evaluate(_fixed([[0, 9, 0, 0], [0, 9, 0, 0], [0, 9, 0, 0]]), split, "valid", ks=(1,))
    assert got["hit@1"] == 0.5 and got["recall@1"] == 0.5
    assert got["coverage@1"] == 0.25


def test_popularity_percentile() -> None:
    # Train counts: item 0 three times, item 1 twice, items 2, 3 never.
    split = _split(train=[[0, 1], [0, 1], [0]], valid=[[2], [2], [3]], test=[[3], [3], [2]], n=4)
    by_count = _fixed([[3.0, 2.0, 0.0, 0.0]] * 3)
    got = evaluate(by_count, split, "valid", ks=(1,))
    # Users 0, 1 get item 2 (count 0, mid-rank 0.5 of 3 -> 1/6); user 2 gets item 1 (2/3).
    assert got["pop_pct@1"] == pytest.approx((1 / 6 + 1 / 6 + 2 / 3) / 3)


def test_top_k_pads_when_candidates_run_out() -> None:
    scores = np.array([[0.5, 0.5, 0.1]])
    exclude = np.array([[False, True, False]])
    assert top_k(scores, exclude, 3).tolist() == [[0, 2, -1]]


def test_evaluate_rejects_bad_scores() -> None:
    split = _split(train=[[0]], valid=[[1]], test=[[2]], n=3)
    with pytest.raises(ValueError, match="shape"):
        evaluate(_fixed([[1.0, 2.0]]), split, "valid")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(_fixed([[1.0, float("nan"), 0.0]]), split, "valid")


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0}


def test_als_cg_converges_to_the_exact_half_step() -> None:
    rng = np.random.default_rng(0)
    observed = (rng.random((6, 9)) < 0.4).astype(np.float64)
    fixed = rng.normal(size=(9, 4))
    reg, alpha = 0.5, 2.0
    got = solve_cg(observed, fixed, np.zeros((6, 4)), reg, alpha, steps=8)
    for r in range(6):
        y = fixed[observed[r] > 0]
        a = fixed.T @ fixed + reg * np.eye(4) + alpha * y.T @ y
        want = np.linalg.solve(a, (1 + alpha) * y.sum(axis=0))
        np.testing.assert_allclose(got[r], want, atol=1e-8)


def test_ease_recovers_co_occurrence() -> None:
    # Items 0 and 1 always co-occur, 2 and 3 always co-occur.
    train = [[0, 1], [0, 1], [2, 3], [2, 3], [0]]
    split = _split(train=train, valid=[[2]] * 5, test=[[3]] * 5, n=4)
    scores = EASE.fit(split, l2=0.1).scorer(split.train)(np.array([4], dtype=np.int64))
    assert int(np.argmax(scores[0])) == 1


# ---- sequential encoder -----------------------------------------------------


def _random_weights(n_items: int, config: SeqConfig, seed: int) -> dict[str, npt.NDArray[Any]]:
    # Non-trivial values everywhere (not the identity LN / zero-bias init).
    rng = np.random.default_rng(seed)
    weights = init_weights(n_items, config, seed)
    for name, value in weights.items():
        if name != NUM_HEADS:
            weights[name] = rng.normal(0.0, 0.5, value.shape).astype(np.float32)
    return weights


@pytest.mark.parametrize("heads", [1, 2])
def test_numpy_encoder_matches_torch(heads: int) -> None:
    torch = pytest.importorskip("torch")
    config = SeqConfig(dim=8, layers=2, heads=heads, inner=16, max_len=5)
    n_items = 7
    weights = _random_weights(n_items, config, seed=heads)
    assert {k: v.shape for k, v in weights.items()} == config.shapes(n_items)
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(n_items)[:k] for k in (0, 1, 3, 5, 7)] + [rng.integers(0, 7, 12)]
    history = _part([s.tolist() for s in seqs])
    users = np.arange(len(seqs), dtype=np.int64)
    inputs = torch.from_numpy(left_padded(history, users, config.max_len))
    params = {k: torch.from_numpy(v) for k, v in weights.items()}
    with torch.no_grad():
        expected = torch_forward(params, inputs)[:, -1].numpy()
    one_by_one = np.stack([encode_sequence(weights, s) for s in seqs])
    np.testing.assert_allclose(one_by_one, expected, atol=1e-4, rtol=0)
    # Batched (left-padded to the longest) gives each user the same vector.
    np.testing.assert_allclose(encode_sequences(weights, seqs), expected, atol=1e-4, rtol=0)
    # Only the last max_len items matter.
    np.testing.assert_allclose(
        encode_sequence(weights, seqs[-1]), encode_sequence(weights, seqs[-1][-5:]), atol=1e-6
    )


def test_sequential_module_imports_without_torch() -> None:
    code = "import sys, training.sequential; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, check=False)
    assert proc.returncode == 0, "importing training.sequential loaded torch"


def test_sequential_model_scores_are_dot_products() -> None:
    config = SeqConfig(dim=8, layers=1, heads=2, inner=16, max_len=4)
    weights = _random_weights(6, config, seed=3)
    model = SequentialModel(
        weights=weights, config=config, best_epoch=0, valid_ndcg10=0.0, train_s=0.0
    )
    history = _part([[0, 1, 2], [], [5, 4, 3, 2, 1]])
    scores = model.scorer(history)(np.array([2, 0], dtype=np.int64))
    user = encode_sequence(weights, np.array([5, 4, 3, 2, 1]))
    np.testing.assert_allclose(scores[0], weights["item_embeddings"] @ user, rtol=1e-5)
    assert scores.shape == (2, 6)


def test_evaluate_ml100k_report_is_json_ready() -> None:
    try:
        report = evaluate_ml100k(seeds=(0,), cache_dir=default_cache_dir(), models=("MostPop",))
    except DatasetUnavailable as exc:
        pytest.skip(f"recbole==1.2.1 wheel cannot be downloaded, so ML-100K is unavailable: {exc}")
    decoded = json.loads(json.dumps(report))
    assert decoded["fingerprints_match_protocol"] is True
    (mostpop,) = decoded["models"]
    assert mostpop["name"] == "MostPop"
    assert round(mostpop["test"]["ndcg@10"]["mean"], 4) == 0.0716
    console = Console(file=io.StringIO(), width=200)
    print_report(report, console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "MostPop" in text and PROTOCOL_MD5["test"] in text
