"""The artifact loaded in the bench process: exact ground truth and the index floor.

Ground truth is an exact scan over the items passing the same compiled filter
with the same query vector the server builds; the index floor is raw FAISS
(IVF + IDSelectorBitmap, one thread) for the same queries and filters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from benchmarks.workload import K, Planned
from endcap.v1 import recommender_pb2 as pb
from server.domain.engine import Engine
from server.domain.filters import Compiled
from server.domain.query import Profile
from server.infra.threads import limit_blas_threads


@dataclass(frozen=True, slots=True)
class Prepared:
    """A Recommend request resolved in-process."""

    planned: Planned
    query: npt.NDArray[np.float32]
    flt: Compiled
    truth: npt.NDArray[np.int64]  # exact top-K rows


def load(root: Path, env: dict[str, str]) -> Engine:
    """The engine the server would build from `root` with the same ENDCAP_* tuning."""
    from server.app import load_engine
    from server.infra.settings import Settings

    faiss.omp_set_num_threads(1)
    limit_blas_threads(1)
    settings = Settings.from_env(env, artifacts=root, verify_checksums=False)
    return load_engine(settings)


def prepare(engine: Engine, planned: Planned) -> Prepared:
    from server.transport import validate

    msg = pb.RecommendRequest.FromString(planned.payload)
    query = validate.recommend(msg)
    ctx = query.context
    q, _ = engine.encode(ctx, Profile(), time.time())
    cat = engine.catalog
    _, rate = cat.currency(ctx.currency)
    flt = cat.filters.compile(cat.filter_spec(query.filters, ctx.country, rate))
    truth = engine.retriever.exact(q, flt, K).ids
    return Prepared(planned, np.ascontiguousarray(q, dtype=np.float32), flt, truth)


def recall(served: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    """|served[:K] & truth| / |truth| (1.0 when nothing passes)."""
    if truth.size == 0:
        return 1.0
    return len(set(served[:K].tolist()) & set(truth.tolist())) / truth.size


def index_floor(engine: Engine, prepared: list[Prepared], min_nprobe: int) -> dict[str, Any]:
    """Raw FAISS for the same queries and filters: IVF + IDSelectorBitmap with nprobe =
    min_nprobe / selectivity (FAISS's own filtered search, no plan choice), one
    thread; plus the same queries unfiltered. Times in microseconds."""
    index = engine.retriever.index
    try:
        ivf: faiss.IndexIVF | None = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    n = int(index.ntotal)
    filtered: list[float] = []
    unfiltered: list[float] = []
    recalls: list[float] = []
    nprobes: list[int] = []
    for p in prepared:
        bits = p.flt.bits
        sel = faiss.IDSelectorBitmap(bits.nbytes, faiss.swig_ptr(bits.view(np.uint8)))
        params: faiss.SearchParameters = faiss.SearchParameters()
        plain: faiss.SearchParameters = faiss.SearchParameters()
        if ivf is not None:
            nprobe = min(ivf.nlist, math.ceil(min_nprobe / max(p.flt.estimate / n, 1e-9)))
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.nprobe = nprobe
            params = ivf_params
            nprobes.append(nprobe)
            ivf_plain = faiss.SearchParametersIVF()
            ivf_plain.nprobe = min_nprobe
            plain = ivf_plain
        params.sel = sel
        q = p.query.reshape(1, -1)
        index.search(q, K, params=params)  # warm
        t0 = time.perf_counter()
        _, ids = index.search(q, K, params=params)
        t1 = time.perf_counter()
        index.search(q, K, params=plain)
        t2 = time.perf_counter()
        filtered.append((t1 - t0) * 1e6)
        unfiltered.append((t2 - t1) * 1e6)
        got = ids[0][ids[0] >= 0].astype(np.int64)
        if p.flt.has_residual and got.size:
            got = got[p.flt.residual(got)]
        recalls.append(recall(got, p.truth))
    return {
        "filtered_us": _pcts(filtered),
        "unfiltered_us": _pcts(unfiltered),
        "recall_at_k": round(float(np.mean(recalls)), 4) if recalls else math.nan,
        "nprobe_median": float(np.median(nprobes)) if nprobes else math.nan,
    }


def plan_costs(engine: Engine, prepared: list[Prepared]) -> dict[str, Any]:
    """The server's own retrieval call in-process (no transport): time and plan mix."""
    times: list[float] = []
    plans: dict[str, int] = {}
    recalls: list[float] = []
    for p in prepared:
        engine.retriever.search(p.query, p.flt, 3 * K)
        t0 = time.perf_counter()
        res = engine.retriever.search(p.query, p.flt, 3 * K)
        times.append((time.perf_counter() - t0) * 1e6)
        plans[res.plan] = plans.get(res.plan, 0) + 1
        recalls.append(recall(res.ids, p.truth))
    return {
        "search_us": _pcts(times),
        "plans": plans,
        "recall_at_k": round(float(np.mean(recalls)), 4) if recalls else math.nan,
    }


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan}
    arr = np.asarray(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p99": round(float(np.percentile(arr, 99)), 1),
        "max": round(float(arr.max()), 1),
    }
