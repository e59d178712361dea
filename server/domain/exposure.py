"""Exposure caps: items shown to a shopper too often without engagement sink below the rest."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from server.domain.catalog import Catalog
from server.domain.query import Profile


def exposed(
    catalog: Catalog, profile: Profile, cap: int, ids: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """bool (n,): which of `ids` the shopper saw at least `cap` times without engaging."""
    if cap <= 0 or not profile.exposures or ids.size == 0:
        return np.zeros(ids.shape[0], dtype=bool)
    # Counts fade with time: round them, so three impressions this morning are three.
    over = [item for item, n in profile.exposures if n + 0.5 >= cap]
    if not over:
        return np.zeros(ids.shape[0], dtype=bool)
    rows = catalog.lookup(over)
    return np.isin(ids, rows[rows >= 0])


def demote(
    catalog: Catalog,
    profile: Profile,
    cap: int,
    ids: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    prov: npt.NDArray[np.int8],
    names: list[str],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int8], list[str]]:
    """Move over-exposed candidates (best first) behind the others, keeping both orders.

    Demoted items are not dropped: they still fill a list that would otherwise be
    short. Their scores are lowered just below the last kept one, so scores stay
    non-increasing down the list.
    """
    hit = exposed(catalog, profile, cap, ids)
    if not hit.any() or hit.all():
        return ids, scores, prov, names
    order = np.concatenate([np.flatnonzero(~hit), np.flatnonzero(hit)])
    n_kept = int((~hit).sum())
    out = scores[order].astype(np.float32, copy=True)
    low = float(out[n_kept - 1])
    step = max(abs(low), 1e-6) * 1e-3
    out[n_kept:] = low - step * np.arange(1, out.shape[0] - n_kept + 1)
    return ids[order], out, prov[order], [names[i] for i in order.tolist()]
