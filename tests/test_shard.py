"""Sharding: split an artifact by item, serve each shard, scatter-gather merges to what one
process answers (exact plans on both sides, trained shoppers, the default strategy)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.catalog import CatalogSpec, build_catalog
from conftest import ServerThread, make_settings
from endcap.shard import ScatterGather, merge, shard_of, split_artifact
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import load_artifact

N_ITEMS = 4_000


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("full")
    build_catalog(CatalogSpec(n_items=N_ITEMS, n_users=300, seed=4, index="flat"), root)
    shards = split_artifact(root, tmp_path_factory.mktemp("shards"), 3)
    return root, shards


@pytest.fixture(scope="module")
def servers(split: tuple[Path, list[Path]]) -> Iterator[list[ServerThread]]:
    root, shards = split
    started = [ServerThread(make_settings(p, exact_scan_max_items=20_000)) for p in [root, *shards]]
    yield started
    for s in started:
        s.close()


def test_shards_partition_the_catalog(split: tuple[Path, list[Path]]) -> None:
    root, shards = split
    full = load_artifact(root)
    ids = np.asarray(full["item_ids"])
    row_of = {item: row for row, item in enumerate(ids.tolist())}
    seen: list[str] = []
    for i, path in enumerate(shards):
        a = load_artifact(path)
        part = np.asarray(a["item_ids"]).tolist()
        assert (shard_of(part, 3) == i).all()
        assert a.index.ntotal == len(part)
        rows = np.array([row_of[item] for item in part])
        np.testing.assert_array_equal(
            np.asarray(a["item_embeddings"]), np.asarray(full["item_embeddings"])[rows]
        )
        np.testing.assert_array_equal(
            np.asarray(a["item_price"]), np.asarray(full["item_price"])[rows]
        )
        seen += part
    assert sorted(seen) == sorted(ids.tolist())


def _recommend(target: str, req: pb.RecommendRequest) -> pb.RecommendResponse:
    with grpc.insecure_channel(target) as ch:
        reply: pb.RecommendResponse = pb_grpc.RecommenderStub(ch).Recommend(req, timeout=10)
        return reply


def test_scatter_gather_equals_one_process(
    split: tuple[Path, list[Path]], servers: list[ServerThread]
) -> None:
    full, *shards = servers
    users = np.asarray(load_artifact(split[0])["user_ids"])[:12].tolist()
    filters = [
        pb.Filters(),
        pb.Filters(max_price=40.0),
        pb.Filters(include_categories=["electronics"]),
        pb.Filters(in_stock_only=False, min_price=5.0, max_price=300.0),
    ]

    async def gather(req: pb.RecommendRequest) -> pb.RecommendResponse:
        async with ScatterGather([s.target for s in shards], timeout_s=10) as sg:
            return await sg.recommend(req)

    compared = 0
    for i, user in enumerate(users):
        ctx = pb.RequestContext(
            user_id=user, country=["US", "DE", "JP"][i % 3], device=pb.RequestContext.MOBILE
        )
        req = pb.RecommendRequest(context=ctx, filters=filters[i % len(filters)], num_results=20)
        one = _recommend(full.target, req)
        merged = asyncio.run(gather(req))
        assert [x.item_id for x in merged.items] == [x.item_id for x in one.items]
        np.testing.assert_allclose(
            [x.score for x in merged.items], [x.score for x in one.items], rtol=1e-5
        )
        compared += len(one.items)
    assert compared > 100


def test_rerank_scatter_gather_reports_unknown_only_when_no_shard_knows(
    servers: list[ServerThread],
) -> None:
    full, *shards = servers
    ids = [f"sku-{i:07d}" for i in range(0, 600, 3)] + ["nope-1", "nope-2"]
    req = pb.RerankRequest(
        context=pb.RequestContext(user_id="user-0000001", country="US"),
        candidate_item_ids=ids,
    )

    async def gather() -> pb.RerankResponse:
        async with ScatterGather([s.target for s in shards], timeout_s=10) as sg:
            return await sg.rerank(req)

    merged = asyncio.run(gather())
    with grpc.insecure_channel(full.target) as ch:
        one = pb_grpc.RecommenderStub(ch).Rerank(req, timeout=10)
    assert list(merged.unknown_item_ids) == ["nope-1", "nope-2"] == list(one.unknown_item_ids)
    assert set(merged.filtered_item_ids) == set(one.filtered_item_ids)
    assert [x.item_id for x in merged.items] == [x.item_id for x in one.items]


def test_merge_keeps_the_best_score_per_item() -> None:
    a = [pb.RecommendedItem(item_id="x", score=0.5), pb.RecommendedItem(item_id="y", score=0.4)]
    b = [pb.RecommendedItem(item_id="x", score=0.9), pb.RecommendedItem(item_id="z", score=0.4)]
    merged = merge([a, b], 3)
    assert [i.item_id for i in merged] == ["x", "y", "z"]
    assert [i.score for i in merged] == pytest.approx([0.9, 0.4, 0.4])
