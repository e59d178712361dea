"""Servers under test, each in its own process group on loopback: the real `endcap serve`
and the echo floor. Also reads a process tree's memory from /proc."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """`count` consecutive free loopback ports (workers serve metrics on base + i)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((HOST, p))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Block until gRPC health says SERVING; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before serving")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="endcap.v1.Recommender"), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s")


@dataclass
class ServerProcess:
    """A started server: its process, gRPC target and metrics URLs (one per worker)."""

    name: str
    proc: subprocess.Popen[bytes]
    target: str
    metrics_urls: tuple[str, ...] = ()
    log: Path | None = None
    started_s: float = 0.0
    ready_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM the process group (SIGKILL after `timeout_s`); the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def memory(self) -> dict[str, float]:
        return tree_memory(self.proc.pid)


def start_endcap(
    artifacts: Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    log_dir: Path | None = None,
    cpus: set[int] | None = None,
) -> ServerProcess:
    """`endcap serve` on a free loopback port (plus one metrics port per worker), pinned
    to `cpus` if given."""
    port = free_port()
    metrics = free_ports(workers)
    full_env = dict(os.environ)
    full_env.update(
        {
            "ENDCAP_ARTIFACTS": str(artifacts),
            "ENDCAP_HOST": HOST,
            "ENDCAP_PORT": str(port),
            "ENDCAP_METRICS_PORT": str(metrics[0]),
            "ENDCAP_LOG_LEVEL": "WARNING",
        }
    )
    if workers > 1:
        full_env["ENDCAP_WORKERS"] = str(workers)
    full_env.update(env or {})
    log = Path(tempfile.mkstemp(prefix="endcap-serve-", suffix=".log", dir=log_dir)[1])
    started = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            _pinned([sys.executable, "-m", "endcap.cli", "serve"], cpus),
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"{HOST}:{port}"
    server = ServerProcess(
        name=f"endcap x{workers}",
        proc=proc,
        target=target,
        metrics_urls=tuple(f"http://{HOST}:{p}/metrics" for p in metrics),
        log=log,
        started_s=started,
    )
    try:
        wait_serving(target, timeout_s, proc)
        if workers > 1:
            _wait_workers(server, workers, timeout_s)
    except Exception:
        server.stop()
        raise RuntimeError(f"endcap serve failed; log:\n{log.read_text()[-4000:]}") from None
    server.ready_s = time.perf_counter() - started
    return server


def _pinned(cmd: list[str], cpus: set[int] | None) -> list[str]:
    """`cmd` run on `cpus` (taskset execs it: same pid); unchanged without taskset."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    return cmd


def _wait_workers(server: ServerProcess, workers: int, timeout_s: float) -> None:
    """Every worker's metrics endpoint answers and reports a loaded model."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    pending = list(server.metrics_urls)
    while pending and time.monotonic() < deadline:
        url = pending[0]
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if "endcap_model_info{" in resp.read().decode():
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.2)
    if pending:
        raise TimeoutError(f"workers not ready: {pending}")


def start_echo(responses: Path, timeout_s: float = 60.0) -> ServerProcess:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="endcap-echo-", suffix=".log")[1])
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.echo",
                "--port",
                str(port),
                "--responses",
                str(responses),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"{HOST}:{port}"
    server = ServerProcess(name="echo", proc=proc, target=target, log=log)
    try:
        wait_serving(target, timeout_s, proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"echo server failed; log:\n{log.read_text()[-4000:]}") from None
    return server


FRONT_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy/nginx/endcap-front.conf.template"


def render_front(env: Mapping[str, str]) -> str:
    """The front's template with its ${ENDCAP_*} placeholders filled from `env`, as the
    nginx image's envsubst step does (nginx's own $variables stay as they are)."""
    return re.sub(r"\$\{(ENDCAP_[A-Z_]+)\}", lambda m: env[m.group(1)], FRONT_TEMPLATE.read_text())


def start_nginx_front(
    upstream: str, max_in_flight: int, *, cpus: set[int] | None = None, timeout_s: float = 10.0
) -> ServerProcess:
    """nginx (deploy/nginx/endcap-front.conf.template) on a free loopback port in front of
    `upstream`, shedding read calls beyond `max_in_flight`; SERVING through it on return."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx not found: apt-get install -y nginx-light")
    prefix = Path(tempfile.mkdtemp(prefix="endcap-front-"))
    target = f"{HOST}:{free_port()}"
    conf = prefix / "nginx.conf"
    text = render_front(
        {
            "ENDCAP_FRONT_LISTEN": target,
            "ENDCAP_UPSTREAM": upstream,
            "ENDCAP_FRONT_MAX_IN_FLIGHT": str(max_in_flight),
        }
    )
    (prefix / "endcap-front.conf").write_text(text)
    # The template is http-context, as the nginx image's templates are: wrap it.
    conf.write_text(
        f"worker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        "events {\n    worker_connections 4096;\n}\n"
        f"http {{\n    include {prefix / 'endcap-front.conf'};\n}}\n"
    )
    log = prefix / "error.log"
    cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(log), "-g", "daemon off;"]
    proc = subprocess.Popen(
        _pinned(cmd, cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    front = ServerProcess(name="nginx front", proc=proc, target=target, log=log)
    try:
        wait_serving(target, timeout_s, proc)
    except Exception:
        front.stop()
        text = log.read_text()[-4000:] if log.exists() else ""
        raise RuntimeError(f"nginx front failed; log:\n{text}") from None
    return front


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    pids = [pid]
    i = 0
    while i < len(pids):
        pids.extend(_children(pids[i]))
        i += 1
    return pids


def tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (shared pages split between sharers) of a process and its children, MB.

    RSS counts shared pages (the page-cached, memory-mapped artifact) once per
    process; PSS is the honest total for a multi-process server."""
    rss = pss = anon = file_ = 0.0
    pids = tree(pid)
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {}
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024.0
        rss += fields.get("Rss", 0.0)
        pss += fields.get("Pss", 0.0)
        anon += fields.get("Pss_Anon", 0.0)
        file_ += fields.get("Pss_File", 0.0)
    return {
        "processes": len(pids),
        "rss_mb": round(rss, 1),
        "pss_mb": round(pss, 1),
        "pss_anon_mb": round(anon, 1),
        "pss_file_mb": round(file_, 1),
    }


T = TypeVar("T")


class Sampler(Generic[T]):
    """Inside a `with` block, calls `read` every `period_s` on a thread of its own:
    `samples` is [(seconds since the block began, value)], the first at once."""

    def __init__(self, read: Callable[[], T], period_s: float) -> None:
        self.read = read
        self.period_s = period_s
        self.samples: list[tuple[float, T]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, self.read()))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> Sampler[T]:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
