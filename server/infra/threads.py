"""Cap numpy's BLAS thread pool, as FAISS's OpenMP pool is capped: threaded BLAS on
shared cores spins, and a 10k x 64 matrix-vector product measured 43x slower with
OpenBLAS's default threads (14.7 ms) than with one (0.34 ms) on a loaded 2-core host.
`faiss_threads` sets FAISS's pool for one block of work."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import faiss

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def _loaded_libraries() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if ".so" in line and "/" in line}
    return sorted(paths)


def limit_blas_threads(n: int) -> int:
    """Set the thread count of every loaded OpenBLAS to `n`; returns how many were set.

    Linux only (reads /proc/self/maps); elsewhere, or without OpenBLAS, a no-op.
    Call after numpy is imported.
    """
    done = 0
    for path in _loaded_libraries():
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                done += 1
                break
    return done


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP pool at `n` threads inside the block, as it was after it."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
