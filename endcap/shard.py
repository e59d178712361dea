"""Sharding a catalog across replicas when one process cannot hold it: split an artifact
into item shards, serve each shard with its own `endcap serve`, and ask all of them with
a scatter-gather client that merges by score.

    python -m endcap.shard split artifacts/ shards/ --shards 4
    # serve shards/shard-0 ... shards/shard-3, one replica set each, then:
    sg = ScatterGather(["10.0.0.1:50051", "10.0.0.2:50051", ...])
    reply = await sg.recommend(request)

Items are assigned by a stable hash of their id, so shards stay balanced and an
item keeps its shard across retrains. Every shard keeps every shopper, with the
trained history folded into the shopper's vector (the history items may live on
another shard), so each shard builds the same query vector and returns its own
exact-scored top k; the merge of those lists by score is the global top k for
the default (personal) strategy, exactly as one process would answer when the
shards use the exact plan, and within the ANN recall otherwise.

Limits, by design of this first step: strategies that fuse lists by rank
(home, category, cart...) merge by their fused score, an approximation of one
process's answer; a real-time session item only shifts the query on the shard
that holds it; SimilarItems needs its seeds' shard (not scattered here);
co-purchase lists keep only pairs inside a shard.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import numpy.typing as npt

from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import (
    OPTIONAL_SCHEMA,
    SCHEMA,
    Artifact,
    ArtifactError,
    load_artifact,
    write_artifact,
)


def shard_of(item_ids: Sequence[str] | npt.NDArray[np.str_], shards: int) -> npt.NDArray[np.int64]:
    """The shard of each item id: crc32 of its UTF-8 bytes modulo `shards`."""
    return np.fromiter(
        (zlib.crc32(str(i).encode()) % shards for i in item_ids),
        dtype=np.int64,
        count=len(item_ids),
    )


def _bits_subset(
    bits: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint64]:
    """Rows `rows` of every item bitmap in `bits` (c, w), repacked as items 0..len(rows)-1."""
    on = ((bits[:, rows >> 6] >> (rows & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
    words = (rows.shape[0] + 63) // 64
    padded = np.zeros((bits.shape[0], words * 64), dtype=bool)
    padded[:, : rows.shape[0]] = on
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def _folded_users(a: Artifact) -> npt.NDArray[np.float32]:
    """user + P @ mean(trained history): the history part of the query, precomputed."""
    emb = np.asarray(a["user_embeddings"], dtype=np.float32).copy()
    indptr = np.asarray(a["user_history_indptr"])
    items = np.asarray(a["user_history_items"]).astype(np.int64)
    length = a.manifest.history_length
    vectors = np.asarray(a["item_embeddings"])
    proj = np.asarray(a["history_projection"])
    for u in np.flatnonzero(np.diff(indptr)).tolist():
        lo, hi = int(indptr[u]), int(indptr[u + 1])
        recent = items[max(lo, hi - length) : hi]
        emb[u] += proj @ vectors[recent].mean(axis=0)
    return emb


def _shard_index(source: faiss.Index, vectors: npt.NDArray[np.float32]) -> faiss.Index:
    """The source index's trained structure (same IVF centroids, same codec), refilled."""
    index = faiss.clone_index(source)
    index.reset()
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def split_artifact(src: Path, out: Path, shards: int) -> list[Path]:
    """Write `shards` artifacts under out/shard-<i>/ (each with its own LATEST)."""
    if shards < 2:
        raise ValueError(f"shards must be >= 2, got {shards}")
    a = load_artifact(src, mmap=False)
    m = a.manifest
    if m.encoder is not None:
        # A sequence encoder reads the vectors of every item in a shopper's history,
        # and a shard holds only its own items: its queries would be wrong, silently.
        raise ValueError(
            f"{a.path} has a {m.encoder['kind']} query encoder; its queries need every "
            "item's vector, so it cannot be split by item (serve it unsharded, or shard "
            "a two-tower artifact)"
        )
    n = m.n_items
    assign = shard_of(np.asarray(a["item_ids"]), shards)
    users = _folded_users(a)
    written = []
    for s in range(shards):
        rows = np.flatnonzero(assign == s).astype(np.int64)
        remap = np.full(n, -1, dtype=np.int64)
        remap[rows] = np.arange(rows.shape[0])
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name in a.arrays:
            shape = {**SCHEMA, **OPTIONAL_SCHEMA}.get(name, ("", ("",)))[1]
            if name.startswith("copurchase_"):
                continue
            arrays[name] = np.asarray(a[name])[rows] if shape[:1] == ("n",) else np.asarray(a[name])
        arrays["item_country_bits"] = _bits_subset(np.asarray(a["item_country_bits"]), rows)
        arrays["user_embeddings"] = users
        arrays["user_history_indptr"] = np.zeros(users.shape[0] + 1, dtype=np.int64)
        arrays["user_history_items"] = np.zeros(0, dtype=np.int32)
        seg = remap[np.asarray(a["segment_top_items"]).astype(np.int64).clip(0)]
        seg[np.asarray(a["segment_top_items"]) < 0] = -1
        order = np.argsort(seg < 0, axis=-1, kind="stable")  # keep order, pad at the end
        arrays["segment_top_items"] = np.take_along_axis(seg, order, -1).astype(np.int32)
        scores = np.where(seg >= 0, np.asarray(a["segment_top_scores"]), 0.0)
        arrays["segment_top_scores"] = np.take_along_axis(scores, order, -1).astype(np.float32)
        if "copurchase_indptr" in a.arrays:
            arrays |= _copurchase_subset(a, rows, remap)
        index = _shard_index(a.index, np.asarray(a["item_embeddings"])[rows])
        written.append(
            write_artifact(
                out / f"shard-{s}",
                model_version=f"{m.model_version}-shard{s}of{shards}",
                dim=m.dim,
                base_currency=m.base_currency,
                currency_rates=m.currency_rates,
                country_codes=m.country_codes,
                category_names=m.category_names,
                brand_names=m.brand_names,
                history_length=m.history_length,
                arrays=arrays,
                index=index,
                params=m.params | {"shard": s, "shards": shards, "source": m.model_version},
                metrics=m.metrics,
                data_fingerprint=m.data_fingerprint,
            )
        )
    return written


def _copurchase_subset(
    a: Artifact, rows: npt.NDArray[np.int64], remap: npt.NDArray[np.int64]
) -> dict[str, npt.NDArray[Any]]:
    indptr = np.asarray(a["copurchase_indptr"]).astype(np.int64)
    items = np.asarray(a["copurchase_items"]).astype(np.int64)
    scores = np.asarray(a["copurchase_scores"])
    owner = np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))
    keep = (remap[owner] >= 0) & (remap[items] >= 0)
    new_owner = remap[owner[keep]]
    counts = np.bincount(new_owner, minlength=rows.shape[0])
    return {
        "copurchase_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "copurchase_items": remap[items[keep]].astype(np.int32),
        "copurchase_scores": scores[keep].astype(np.float32),
    }


def merge(lists: Sequence[Sequence[pb.RecommendedItem]], k: int) -> list[pb.RecommendedItem]:
    """The k best items of several shards' lists by score (ties to the smaller id)."""
    best: dict[str, pb.RecommendedItem] = {}
    for items in lists:
        for item in items:
            seen = best.get(item.item_id)
            if seen is None or item.score > seen.score:
                best[item.item_id] = item
    return sorted(best.values(), key=lambda i: (-i.score, i.item_id))[:k]


class ScatterGather:
    """Asks every shard and merges: one replica (or load-balanced set) per shard."""

    def __init__(self, targets: Sequence[str], *, timeout_s: float = 1.0) -> None:
        if not targets:
            raise ValueError("at least one shard target is required")
        self._channels = [grpc.aio.insecure_channel(t) for t in targets]
        self._stubs = [pb_grpc.RecommenderStub(ch) for ch in self._channels]
        self.timeout_s = timeout_s

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> ScatterGather:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _all(self, method: str, request: Any) -> list[Any]:
        calls = [getattr(stub, method)(request, timeout=self.timeout_s) for stub in self._stubs]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in replies if not isinstance(r, BaseException)]
        if not ok:
            first = replies[0]
            assert isinstance(first, BaseException)
            raise first
        return ok

    async def recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        """Every shard's top k, merged. A shard that fails or times out is left out
        (the answer degrades to the other shards' items); all failing raises."""
        replies = await self._all("Recommend", request)
        k = request.num_results or 10
        first = replies[0]
        return pb.RecommendResponse(
            items=merge([r.items for r in replies], k),
            recommendation_id=first.recommendation_id,
            model_version=first.model_version,
            currency=first.currency,
            personalized=any(r.personalized for r in replies),
        )

    async def rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        """Each shard scores the candidates it holds; unknown = unknown to every shard."""
        replies = await self._all("Rerank", request)
        k = request.num_results or len(request.candidate_item_ids)
        unknown = set(replies[0].unknown_item_ids)
        for r in replies[1:]:
            unknown &= set(r.unknown_item_ids)
        filtered = {i for r in replies for i in r.filtered_item_ids}
        first = replies[0]
        return pb.RerankResponse(
            items=merge([r.items for r in replies], k),
            unknown_item_ids=[c for c in request.candidate_item_ids if c in unknown],
            filtered_item_ids=[c for c in request.candidate_item_ids if c in filtered],
            recommendation_id=first.recommendation_id,
            model_version=first.model_version,
            currency=first.currency,
            personalized=any(r.personalized for r in replies),
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m endcap.shard", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="split an artifact into item shards")
    split.add_argument("src", type=Path, help="artifact directory (or root with LATEST)")
    split.add_argument("out", type=Path, help="output directory: out/shard-<i>/")
    split.add_argument("--shards", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        paths = split_artifact(args.src, args.out, args.shards)
    except (ValueError, ArtifactError) as exc:
        print(f"endcap.shard: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
