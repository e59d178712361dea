"""Ordering: deterministic top-k by score, ties to the smaller item index."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def top_k(
    ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The k best (ids, scores), best first; ties broken by smaller id."""
    n = ids.shape[0]
    if k <= 0:
        return ids[:0], scores[:0]
    if n > k:
        # The k-th best score, then everything tied with it or better, so the
        # tie-break below sees all contenders. A partition of the values (no index
        # array, no negated copy) is ~2x faster than argpartition(-scores) at 1-30k.
        kth = np.partition(scores, n - k)[n - k]
        keep = np.flatnonzero(scores >= kth)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]
