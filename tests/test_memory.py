"""release_freed hands a thread's freed heap back to the OS (glibc only)."""

from __future__ import annotations

import threading

import pytest

from server.infra import memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(memory._malloc_trim() is None, reason="not glibc")
def test_freed_memory_of_a_loading_thread_is_released() -> None:
    kept: list[bytearray] = []

    def load() -> None:
        # Chunks under glibc's mmap threshold come from the thread's arena; the last
        # one stays alive, so the arena cannot shrink from the top by itself.
        chunks = [bytearray(64 << 10) for _ in range(2000)]  # 125 MB, pages touched
        kept.append(chunks[-1])
        del chunks

    t = threading.Thread(target=load)
    t.start()
    t.join()
    before = _rss_mb()
    memory.release_freed()
    assert before - _rss_mb() > 60, (before, _rss_mb())
