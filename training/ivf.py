"""The IVF index artifacts hold, built the same way for trained models
(training.export) and for the bench's catalogs (benchmarks.catalog). No torch."""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt


def sq8_ivf(quantizer: faiss.Index, dim: int, nlist: int) -> faiss.IndexIVFScalarQuantizer:
    """Inner-product IVF lists of 8-bit scalar codes, no residual: 64 B per 64-d vector
    instead of a second float copy of the embeddings (the server fetches 2x and
    rescores exactly from the embeddings; benchmarks/README.md)."""
    return faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
    )


def train_ivf(index: faiss.IndexIVF, vectors: npt.NDArray[np.float32], seed: int) -> None:
    """Seeded k-means on 64 vectors per list (FAISS wants >= 39; 64 keeps it quick and
    stable), sampled without replacement and read in row order."""
    index.cp.seed = seed
    n = int(vectors.shape[0])
    sample = min(n, 64 * int(index.nlist))
    rows = np.random.default_rng(seed).choice(n, size=sample, replace=False)
    index.train(vectors[np.sort(rows)])
