"""Ordering: deterministic top-k by score, ties to the smaller item index."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def top_k(
    ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The k best (ids, scores), best first; ties broken by smaller id."""
    if ids.shape[0] > k:
        # Partition on score, then keep everything tied with the k-th best so the
        # tie-break below sees all contenders.
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        keep = np.flatnonzero(scores >= kth)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]
