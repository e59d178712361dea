"""Multi-process serving: `workers` copies of `endcap serve` bound to one port with
SO_REUSEPORT, so the kernel spreads connections over them and throughput grows
with cores (one Python process is bound by its GIL).

Workers load the artifact themselves; its arrays and its FAISS index are
memory-mapped read-only files, so the page cache holds one copy for all of
them. ReloadModel reaches only the worker that receives the call, so with
several workers send reloads as SIGHUP to the supervisor (forwarded to every
worker) or set ENDCAP_RELOAD_POLL_S. Keep state in Redis
(ENDCAP_STATE_BACKEND=redis): shopper state is shared there, and so are live
catalog changes (server/state/catalog_feed.py), as between replicas; with the
memory backend each worker has its own.
Worker i serves metrics on metrics_port + i.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from server.infra.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
EXIT_CONFIG_ERROR = 2  # a worker that cannot serve (bad artifact/config): give up


def worker_env(settings: Settings, index: int) -> dict[str, str]:
    """The environment of worker `index`: every setting spelled out as ENDCAP_*."""
    env = dict(os.environ)
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Path):
            text = str(value)
        else:
            text = str(value)
        env[ENV_PREFIX + field.name.upper()] = text
    env[ENV_PREFIX + "WORKERS"] = "1"
    env[ENV_PREFIX + "REUSE_PORT"] = "true"
    env[ENV_PREFIX + "METRICS_PORT"] = str(
        settings.metrics_port + index if settings.metrics_port else 0
    )
    return env


async def _spawn(settings: Settings, index: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "endcap.cli", "serve", env=worker_env(settings, index)
    )


async def supervise(settings: Settings) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; forward SIGHUP (reload);
    restart a worker that dies. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    procs: list[asyncio.subprocess.Process] = [
        await _spawn(settings, i) for i in range(settings.workers)
    ]
    log.info(
        "started %d workers on %s:%d (SO_REUSEPORT): pids %s",
        settings.workers,
        settings.host,
        settings.port,
        [p.pid for p in procs],
    )

    def forward(sig: signal.Signals) -> None:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    code = 0
    waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
    stop_wait = asyncio.ensure_future(stopping.wait())
    while not stopping.is_set():
        done, _ = await asyncio.wait([*waits, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stop_wait:
                continue
            i = waits.pop(task)
            rc = procs[i].returncode
            if stopping.is_set():
                continue
            if rc == EXIT_CONFIG_ERROR:
                log.error("worker %d cannot serve (exit %d): stopping all workers", i, rc)
                code = EXIT_CONFIG_ERROR
                stopping.set()
                break
            log.warning("worker %d exited with %s: restarting", i, rc)
            await asyncio.sleep(RESTART_DELAY_S)
            procs[i] = await _spawn(settings, i)
            waits[asyncio.ensure_future(procs[i].wait())] = i
    forward(signal.SIGTERM)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(p.wait() for p in procs)), timeout=settings.grace_s + 10
        )
    except TimeoutError:
        forward(signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in procs))
    stop_wait.cancel()
    return code
