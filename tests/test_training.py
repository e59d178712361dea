"""Training side: the synthetic store, the trainer and the artifact it exports."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import numpy.typing as npt
import pytest

from server.artifact import LATEST, Artifact, load_artifact
from training.data import PURCHASE, Dataset
from training.export import pack_item_bits, segment_top
from training.pipeline import train_and_export
from training.synthetic import StoreConfig, generate_store
from training.train import TrainConfig, collapse_events, last_items, train

TINY = StoreConfig(n_items=2_000, n_users=500, n_events=20_000, seed=7)
TINY_TRAIN = TrainConfig(epochs=3, seed=3)


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    return generate_store(TINY)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    root = tmp_path_factory.mktemp("artifacts")
    path = train_and_export(root, TINY, TINY_TRAIN, progress=False)
    assert (root / LATEST).read_text().strip() == path.name
    return load_artifact(root)


def test_store_is_deterministic_for_a_seed(tiny: Dataset) -> None:
    again = generate_store(TINY)
    for field in fields(Dataset):
        a, b = getattr(tiny, field.name), getattr(again, field.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=field.name)
        else:
            assert a == b, field.name
    other = generate_store(StoreConfig(n_items=2_000, n_users=500, n_events=20_000, seed=8))
    assert not np.array_equal(tiny.ev_item, other.ev_item)


def test_store_respects_its_invariants(tiny: Dataset) -> None:
    assert (tiny.n_items, tiny.n_users, tiny.n_events) == (2_000, 500, 20_000)
    assert np.unique(tiny.item_ids).size == tiny.n_items
    assert np.unique(tiny.user_ids).size == tiny.n_users
    assert np.all(tiny.item_price > 0)
    # Category tree: roots have no parent, every parent is a real root, items sit on leaves.
    parent = tiny.category_parent
    roots = np.flatnonzero(parent == -1)
    assert 6 <= roots.size <= 10
    assert np.all((parent == -1) | np.isin(parent, roots))
    assert not np.isin(tiny.item_category, parent).any()
    for i, name in enumerate(tiny.category_names):
        if parent[i] >= 0:
            assert name.startswith(tiny.category_names[parent[i]] + "/")
    assert tiny.currency_rates[tiny.base_currency] == 1.0
    assert tiny.item_countries.shape == (tiny.n_items, len(tiny.country_codes))
    assert tiny.item_countries.any(axis=1).all()
    # Events: time-sorted, in the shopper's country, only where the item is sold.
    assert np.all(np.diff(tiny.ev_ts) >= 0)
    np.testing.assert_array_equal(tiny.ev_country, tiny.user_country[tiny.ev_user])
    assert tiny.item_countries[tiny.ev_item, tiny.ev_country].all()
    assert np.isin(tiny.ev_device, (1, 2, 3)).all()
    assert tiny.item_in_stock[tiny.ev_item].mean() > 0.95
    assert tiny.item_in_stock[tiny.ev_item[tiny.ev_type == PURCHASE]].all()
    assert 0.02 < np.mean(tiny.ev_type == PURCHASE) < 0.15
    assert 0.6 < np.mean(tiny.ev_device == tiny.user_device[tiny.ev_user]) < 0.9


def test_items_are_listed_in_category_order(tiny: Dataset) -> None:
    """Every category (leaves and roots) holds consecutive rows, and reordering items
    moves their events along: each event keeps its item id."""
    root = np.where(
        tiny.category_parent >= 0, tiny.category_parent, np.arange(len(tiny.category_names))
    )
    for col in (tiny.item_category, root[tiny.item_category]):
        changes = np.flatnonzero(np.diff(col)) + 1
        assert np.unique(col[np.r_[0, changes]]).size == changes.size + 1  # no value twice
    shuffled = tiny.reordered(np.random.default_rng(0).permutation(tiny.n_items))
    assert not np.array_equal(shuffled.item_category, tiny.item_category)
    np.testing.assert_array_equal(shuffled.item_ids[shuffled.ev_item], tiny.item_ids[tiny.ev_item])
    back = shuffled.clustered()
    for name in ("item_ids", "item_category", "item_price", "item_countries", "ev_item"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tiny, name), err_msg=name)
    assert tiny.clustered() is tiny


def test_context_shifts_what_shoppers_browse(tiny: Dataset) -> None:
    """Mobile sessions lean to fashion and beauty, desktop ones to electronics and home."""
    root_of = np.where(
        tiny.category_parent >= 0, tiny.category_parent, np.arange(len(tiny.category_parent))
    )
    names = np.asarray(tiny.category_names)[root_of[tiny.item_category[tiny.ev_item]]]
    mobile, desktop = tiny.ev_device == 1, tiny.ev_device == 3
    for root, favours_mobile in (("fashion", True), ("beauty", True), ("electronics", False)):
        share_mobile = np.mean(names[mobile] == root)
        share_desktop = np.mean(names[desktop] == root)
        assert (share_mobile > share_desktop) == favours_mobile, root


def test_pack_item_bits_is_little_endian_by_item() -> None:
    rows = np.zeros((2, 130), dtype=bool)
    rows[0, [0, 63, 64, 129]] = True
    rows[1, 1] = True
    bits = pack_item_bits(rows)
    assert bits.dtype == np.uint64 and bits.shape == (2, 3)
    assert bits[0].tolist() == [1 | (1 << 63), 1, 2]
    assert bits[1].tolist() == [2, 0, 0]


def test_segment_top_pools_unknown_country_and_device(tiny: Dataset) -> None:
    weights = np.ones(tiny.n_events)
    items, scores = segment_top(tiny, weights, 50)
    counts = np.bincount(tiny.ev_item, minlength=tiny.n_items)
    c = len(tiny.country_codes)
    assert items.shape == (c + 1, 4, 50)
    np.testing.assert_array_equal(scores[c, 0], np.sort(counts)[::-1][:50])
    # Device 0 is never logged here, so the known-country device-0 row pools devices.
    de = tiny.country_codes.index("DE")
    in_de = np.bincount(tiny.ev_item[tiny.ev_country == de], minlength=tiny.n_items)
    assert scores[de, 0, 0] == in_de.max()
    assert np.all(np.diff(scores, axis=-1) <= 0)
    assert np.all((items >= 0) == (scores > 0))


def test_exported_artifact_loads_and_matches_the_store(artifact: Artifact, tiny: Dataset) -> None:
    manifest = artifact.manifest
    assert manifest.n_items == tiny.n_items and manifest.n_users == tiny.n_users
    assert manifest.dim == TINY_TRAIN.dim
    assert manifest.history_length == TINY_TRAIN.history_length
    assert manifest.index_description == "IndexFlatIP"
    assert manifest.data_fingerprint == tiny.fingerprint()
    assert manifest.model_version.startswith("v") and manifest.model_version.endswith(
        artifact.path.name[-6:]
    )
    assert manifest.params["epochs"] == TINY_TRAIN.epochs
    assert set(manifest.metrics) >= {"recall@10", "recall@50", "ndcg@10", "popularity_ndcg@10"}
    unpacked = np.unpackbits(
        artifact["item_country_bits"].view(np.uint8), axis=1, bitorder="little"
    )[:, : tiny.n_items]
    np.testing.assert_array_equal(unpacked.astype(bool), tiny.item_countries.T)
    # The index holds exactly the item embeddings, ids = item indexes: it
    # answers as a brute-force inner-product scan does.
    emb = np.asarray(artifact["item_embeddings"])
    queries = emb[:5] + artifact["context_device"][1]
    _, ids = artifact.index.search(queries, 10)
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ emb.T), axis=1)[:, :10])


def test_user_history_is_the_latest_items_oldest_first(artifact: Artifact, tiny: Dataset) -> None:
    indptr, items = artifact["user_history_indptr"], artifact["user_history_items"]
    busiest = int(np.argmax(np.bincount(tiny.ev_user, minlength=tiny.n_users)))
    rows = np.flatnonzero(tiny.ev_user == busiest)  # time order, as the log is sorted
    expected: list[int] = []
    for item in tiny.ev_item[rows].tolist():
        if not expected or expected[-1] != item:  # a view, cart, buy of one item is one step
            expected.append(item)
    got = items[indptr[busiest] : indptr[busiest + 1]].tolist()
    assert got == expected[-TINY_TRAIN.history_length :]
    ref_indptr, ref_items = last_items(collapse_events(tiny, (1.0, 1.0, 1.0)), 5)
    assert np.diff(ref_indptr).max() <= 5 and ref_items.size == ref_indptr[-1]


def test_trained_model_beats_popularity(artifact: Artifact) -> None:
    metrics = artifact.manifest.metrics
    assert metrics["ndcg@10"] > 2 * metrics["popularity_ndcg@10"]
    assert metrics["recall@50"] > metrics["popularity_recall@50"]


def _content_vectors(artifact: Artifact) -> npt.NDArray[np.float32]:
    """Item tower from the exported arrays alone: category + brand + price bucket."""
    bucket = np.searchsorted(artifact["price_bucket_edges"], artifact["item_price"], side="right")
    content: npt.NDArray[np.float32] = (
        artifact["item_tower_category"][artifact["item_category"]]
        + artifact["item_tower_brand"][artifact["item_brand"]]
        + artifact["item_tower_price"][bucket]
    )
    return content


def test_content_tower_places_items_near_their_category(artifact: Artifact) -> None:
    content = _content_vectors(artifact)
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    similarity = unit @ unit.T
    category = np.asarray(artifact["item_category"])
    same = category[:, None] == category[None, :]
    np.fill_diagonal(same, False)
    other = category[:, None] != category[None, :]
    mean_same = (similarity * same).sum(axis=1) / np.maximum(same.sum(axis=1), 1)
    mean_other = (similarity * other).sum(axis=1) / other.sum(axis=1)
    has_peers = same.any(axis=1)
    assert np.mean(mean_same[has_peers] > mean_other[has_peers]) > 0.9
    assert mean_same[has_peers].mean() > mean_other[has_peers].mean() + 0.2


def test_content_tower_scores_unseen_items_for_their_shoppers(artifact: Artifact) -> None:
    """A shopper's query ranks the content vectors of their history's category high."""
    content = _content_vectors(artifact)
    indptr, history = artifact["user_history_indptr"], artifact["user_history_items"]
    emb = np.asarray(artifact["item_embeddings"])
    projection = np.asarray(artifact["history_projection"])
    category = np.asarray(artifact["item_category"])
    ranks = []
    for user in range(0, artifact.manifest.n_users, 5):
        recent = history[indptr[user] : indptr[user + 1]]
        if recent.size == 0:
            continue
        # The anonymous-session query: history only, no user vector, no context.
        query = projection @ emb[recent].mean(axis=0)
        scores = content @ query
        last_category = category[recent[-1]]
        ranks.append(np.mean(scores[category == last_category] > np.median(scores)))
    assert np.mean(ranks) > 0.8


def test_training_is_deterministic(tiny: Dataset) -> None:
    config = TrainConfig(epochs=1, seed=11, max_eval_users=100)
    first, second = train(tiny, config, progress=False), train(tiny, config, progress=False)
    np.testing.assert_array_equal(first.item_embeddings, second.item_embeddings)
    np.testing.assert_array_equal(first.user_embeddings, second.user_embeddings)
    assert first.metrics == second.metrics
    assert first.item_embeddings.dtype == np.float32
    assert first.history_projection.shape == (config.dim, config.dim)
    assert first.context_country.shape == (len(tiny.country_codes) + 1, config.dim)
