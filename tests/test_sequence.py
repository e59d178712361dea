"""The sequential encoder as served: artifact section, Engine.encode, and real gRPC."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import ServerThread, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import (
    ENCODER_FILE,
    MANIFEST,
    ArtifactError,
    load_artifact,
    resolve,
    write_artifact,
)
from server.domain.engine import Engine
from server.domain.query import Context, Profile
from server.domain.sequence import Encoder, encode_sequence, encode_sequences
from training.export import export_sequential
from training.protocol import Part
from training.sequential import NUM_HEADS, SeqConfig, SequentialModel, init_weights

N_ITEMS = 40
CONFIG = SeqConfig(dim=8, layers=2, heads=2, inner=16, max_len=6)
# Trained histories (item indexes, oldest first); user 1 has more than max_len.
HISTORIES = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10], []]


def _model() -> SequentialModel:
    rng = np.random.default_rng(11)
    weights = init_weights(N_ITEMS, CONFIG, seed=11)
    for name, value in weights.items():
        if name != NUM_HEADS:
            weights[name] = rng.normal(0.0, 0.5, value.shape).astype(np.float32)
    return SequentialModel(
        weights=weights, config=CONFIG, best_epoch=0, valid_ndcg10=0.0, train_s=0.0
    )


def _part(rows: list[list[int]]) -> Part:
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    items = np.array([i for r in rows for i in r], dtype=np.int32)
    return Part(indptr=indptr, items=items, timestamps=np.arange(items.shape[0], dtype=np.int64))


def _item(i: int) -> str:
    return f"m{i}"


@pytest.fixture(scope="module")
def model() -> SequentialModel:
    return _model()


@pytest.fixture(scope="module")
def root(model: SequentialModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seq-artifacts")
    export_sequential(
        model,
        out,
        item_ids=[_item(i) for i in range(N_ITEMS)],
        user_ids=["u0", "u1", "u2"],
        histories=_part(HISTORIES),
    )
    return out


def _exact_top(model: SequentialModel, seq: list[int], k: int) -> list[str]:
    q = encode_sequence(model.weights, np.array(seq))
    scores = model.weights["item_embeddings"] @ q
    return [_item(int(i)) for i in np.argsort(-scores, kind="stable")[:k]]


# ---- numpy forward ------------------------------------------------------------


def test_single_sequence_encode_matches_the_batched_forward(model: SequentialModel) -> None:
    encoder = Encoder.of(model.weights)
    table = model.weights["item_embeddings"]
    seqs = [np.array(s) for s in ([5], [1, 2, 3], list(range(12)))]
    batched = encode_sequences(model.weights, seqs)
    for seq, want in zip(seqs, batched, strict=True):
        np.testing.assert_allclose(encoder.encode(table[seq]), want, atol=1e-5)
    # An empty history is a lone padding token, as in the batch.
    np.testing.assert_allclose(
        encoder.encode(table[:0]), encode_sequences(model.weights, [np.array([], int)])[0]
    )


# ---- artifact -----------------------------------------------------------------


def test_encoder_round_trips_through_the_artifact(root: Path, model: SequentialModel) -> None:
    artifact = load_artifact(root)
    manifest = artifact.manifest
    assert manifest.format_version == 2
    assert manifest.encoder == {
        "kind": "sequential",
        "layers": 2,
        "heads": 2,
        "inner": 16,
        "max_len": 6,
    }
    assert manifest.history_length == CONFIG.max_len
    assert artifact.encoder is not None
    assert set(artifact.encoder) == set(model.weights) - {"item_embeddings"}
    for name, value in artifact.encoder.items():
        np.testing.assert_array_equal(value, model.weights[name])
    np.testing.assert_array_equal(artifact["item_embeddings"], model.weights["item_embeddings"])
    # Trained histories keep the last max_len items, oldest first.
    indptr, items = artifact["user_history_indptr"], artifact["user_history_items"]
    assert items[indptr[1] : indptr[2]].tolist() == HISTORIES[1][-CONFIG.max_len :]


def test_artifact_without_an_encoder_stays_version_1(root: Path, tmp_path: Path) -> None:
    a = load_artifact(root, mmap=False)
    m = a.manifest
    path = write_artifact(
        tmp_path,
        model_version="plain",
        dim=m.dim,
        base_currency=m.base_currency,
        currency_rates=m.currency_rates,
        country_codes=m.country_codes,
        category_names=m.category_names,
        brand_names=m.brand_names,
        history_length=m.history_length,
        arrays=a.arrays,
        index=a.index,
    )
    plain = load_artifact(path)
    assert plain.manifest.format_version == 1
    assert plain.manifest.encoder is None and plain.encoder is None
    assert "encoder" not in json.loads((path / MANIFEST).read_text())


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(resolve(root), target)
    return target


def _edit_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((path / MANIFEST).read_text())
    change(raw)
    (path / MANIFEST).write_text(json.dumps(raw))


def _rewrite_encoder(path: Path, change: Callable[[dict[str, npt.NDArray[Any]]], None]) -> None:
    with np.load(path / ENCODER_FILE) as npz:
        weights = {k: npz[k] for k in npz.files}
    change(weights)
    np.savez(path / ENCODER_FILE, **weights)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    raw["encoder"][key] = value


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str, bool]] = {
    # name: (mutation, expected message fragment, verify checksums)
    "bytes flipped": (
        lambda p: (p / ENCODER_FILE).write_bytes((p / ENCODER_FILE).read_bytes()[:-8] + b"\0" * 8),
        "encoder.npz does not match its checksum",
        True,
    ),
    "not a zip": (
        lambda p: (p / ENCODER_FILE).write_bytes(b"not a zip file"),
        "cannot read encoder.npz",
        False,
    ),
    "layer count": (
        lambda p: _edit_manifest(p, lambda raw: _set(raw, "layers", 3)),
        "encoder.npz does not match the manifest encoder (3 layers): missing ['seq_layer2.",
        True,
    ),
    "unknown kind": (
        lambda p: _edit_manifest(p, lambda raw: _set(raw, "kind", "rnn")),
        "manifest encoder kind must be one of ['sequential'], got 'rnn'",
        True,
    ),
    "heads": (
        lambda p: _edit_manifest(p, lambda raw: _set(raw, "heads", 3)),
        "manifest encoder heads must divide dim 8, got 3",
        True,
    ),
    "old version": (
        lambda p: _edit_manifest(p, lambda raw: raw.update(format_version=1)),
        "manifest encoder needs format_version 2",
        True,
    ),
    "no section": (
        lambda p: _edit_manifest(p, lambda raw: raw.pop("encoder")),
        "encoder.npz is present but the manifest names no encoder",
        True,
    ),
    "wrong shape": (
        lambda p: _rewrite_encoder(
            p, lambda w: w.update({"seq_position": np.zeros((5, 8), np.float32)})
        ),
        "encoder weight seq_position: shape (5, 8) is not (6, 8)",
        False,
    ),
    "not finite": (
        lambda p: _rewrite_encoder(
            p, lambda w: w.update({"seq_final_ln.bias": np.full(8, np.nan, np.float32)})
        ),
        "encoder weight seq_final_ln.bias: holds NaN or infinity",
        False,
    ),
    "head count stored": (
        lambda p: _rewrite_encoder(p, lambda w: w.update({NUM_HEADS: np.array(4, np.int64)})),
        "encoder weights hold [4] heads, manifest encoder says 2",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_bad_encoder_section_is_refused(root: Path, tmp_path: Path, name: str) -> None:
    mutate, message, verify = CORRUPTIONS[name]
    path = _copy(root, tmp_path)
    mutate(path)
    with pytest.raises(ArtifactError) as info:
        load_artifact(path, verify_checksums=verify)
    assert message in str(info.value)


# ---- the engine and the real server ---------------------------------------------


def test_engine_query_reads_trained_history_then_session(
    root: Path, model: SequentialModel
) -> None:
    engine = Engine(load_artifact(root))
    # Profile lists are newest first: the session, oldest first, is 20, 21.
    profile = Profile(recent=((_item(21), 2.0), (_item(20), 1.0)))
    q, personal = engine.encode(Context(user_id="u1"), profile, 3.0)
    want = encode_sequence(model.weights, np.array(HISTORIES[1] + [20, 21]))
    assert personal
    np.testing.assert_allclose(q, want, atol=1e-5)
    # Nothing known about the shopper: no encoder term, not personal.
    q, personal = engine.encode(Context(session_id="new"), Profile(), 0.0)
    assert not personal and not np.any(q)


@pytest.fixture(scope="module")
def seq_stub(root: Path) -> Iterator[pb_grpc.RecommenderStub]:
    thread = ServerThread(make_settings(root))
    try:
        with grpc.insecure_channel(thread.target) as channel:
            yield pb_grpc.RecommenderStub(channel)
    finally:
        thread.close()


def _views(items: list[int], session: str = "", user: str = "") -> pb.TrackEventsRequest:
    now = time.time()
    ctx = pb.RequestContext(session_id=session, user_id=user)
    events = []
    for j, i in enumerate(items):
        ts = Timestamp()
        ts.FromNanoseconds(int((now - len(items) + j) * 1e9))  # oldest first, one second apart
        events.append(pb.Event(type=pb.Event.VIEW, item_id=_item(i), context=ctx, timestamp=ts))
    return pb.TrackEventsRequest(events=events)


@pytest.mark.parametrize("views", [[30, 31, 32], [32, 31, 30]])
def test_served_list_is_the_encoders_top_k_after_views(
    seq_stub: pb_grpc.RecommenderStub, model: SequentialModel, views: list[int]
) -> None:
    session = f"s-{'-'.join(map(str, views))}"
    ctx = pb.RequestContext(session_id=session)
    before = seq_stub.Recommend(pb.RecommendRequest(context=ctx, num_results=5))
    reply = seq_stub.TrackEvents(_views(views, session=session))
    assert not reply.rejected
    after = seq_stub.Recommend(pb.RecommendRequest(context=ctx, num_results=5))
    served = [item.item_id for item in after.items]
    assert served == _exact_top(model, views, 5)
    assert served != [item.item_id for item in before.items]


def test_served_list_reads_a_trained_user_and_their_session(
    seq_stub: pb_grpc.RecommenderStub, model: SequentialModel
) -> None:
    ctx = pb.RequestContext(user_id="u0")
    first = seq_stub.Recommend(pb.RecommendRequest(context=ctx, num_results=5))
    assert [i.item_id for i in first.items] == _exact_top(model, HISTORIES[0], 5)
    seq_stub.TrackEvents(_views([25, 26], user="u0"))
    after = seq_stub.Recommend(pb.RecommendRequest(context=ctx, num_results=5))
    assert [i.item_id for i in after.items] == _exact_top(model, HISTORIES[0] + [25, 26], 5)


# ---- the evaluation's served row ------------------------------------------------


def test_served_evaluation_equals_the_offline_scorer(model: SequentialModel) -> None:
    from training.protocol import Split, evaluate, serve_sequential

    rng = np.random.default_rng(5)
    rows = [rng.permutation(N_ITEMS)[:n].tolist() for n in (12, 9, 15, 10, 20, 11)]
    # Per user: train, then 2 valid items, then 2 test items.
    train = _part([r[:-4] for r in rows])
    valid = _part([r[-4:-2] for r in rows])
    test = _part([r[-2:] for r in rows])
    split = Split(
        user_ids=np.arange(len(rows), dtype=np.int64) + 1,
        item_ids=np.arange(N_ITEMS, dtype=np.int64) + 1,
        train=train,
        valid=valid,
        test=test,
    )
    served = serve_sequential(model, split, k=10)
    assert served.extras["ann_recall@10"] == 1.0  # a flat index is exact
    assert served.extras["query_max_abs_diff"] < 1e-5
    offline = evaluate(model.scorer(split.history("test")), split, "test", ks=(10,))
    online = evaluate(served.score, split, "test", ks=(10,))
    for metric in ("recall@10", "ndcg@10", "hit@10"):
        assert online[metric] == pytest.approx(offline[metric])


def test_an_artifact_with_an_encoder_is_not_split_by_item(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from endcap import shard

    with pytest.raises(ValueError, match="cannot be split by item"):
        shard.split_artifact(root, tmp_path / "shards", 2)
    assert shard.main(["split", str(root), str(tmp_path / "shards"), "--shards", "2"]) == 2
    assert "query encoder" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()
