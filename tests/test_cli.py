"""`endcap serve` as a process: starts, reports health, drains on SIGTERM, refuses bad artifacts."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TrainedStore
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "endcap.cli", "serve", "--host", "127.0.0.1", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_serving(target: str, timeout_s: float = 60) -> None:
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="endcap.v1.Recommender"), timeout=timeout_s
        )
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError("server never reported SERVING")


def test_serve_answers_then_drains_on_sigterm(trained: TrainedStore) -> None:
    port = free_port()
    proc = serve("--artifacts", str(trained.artifacts), "--port", str(port), "--metrics-port", "0")
    try:
        wait_serving(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(num_results=3))
        assert len(reply.items) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, out
    assert "shutting down" in out


def test_serve_refuses_a_missing_artifact(tmp_path: Path) -> None:
    proc = serve(
        "--artifacts", str(tmp_path / "nothing"), "--port", str(free_port()), "--metrics-port", "0"
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no artifact" in out


def test_serve_refuses_a_corrupt_artifact(trained: TrainedStore, tmp_path: Path) -> None:
    from server.artifact import resolve

    copy = tmp_path / "corrupt"
    shutil.copytree(resolve(trained.artifacts), copy)
    embeddings = copy / "arrays/item_embeddings.npy"
    data = bytearray(embeddings.read_bytes())
    data[-1] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    proc = serve("--artifacts", str(copy), "--port", str(free_port()), "--metrics-port", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "item_embeddings.npy does not match its checksum" in out


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "endcap.cli", "serve", "--artifacts", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"ENDCAP_OMP_THREADS": "many", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "ENDCAP_OMP_THREADS" in proc.stderr


def test_help_for_every_command() -> None:
    for command in ("demo", "train", "serve"):
        out = subprocess.run(
            [sys.executable, "-m", "endcap.cli", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and "usage: endcap" in out.stdout


def test_serve_reads_a_config_file(trained: TrainedStore, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "endcap.toml"
    config.write_text(
        f'artifacts = "{trained.artifacts}"\nport = {port}\nmetrics_port = 0\n'
        "exact_scan_max_items = 500\n"
    )
    proc = serve("--config", str(config))
    try:
        wait_serving(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, out


def test_config_file_then_environment_then_flags(tmp_path: Path) -> None:
    from server.infra.settings import Settings

    config = tmp_path / "endcap.toml"
    config.write_text(
        'state_backend = "redis"\nport = 6000\nmetrics_port = 0\nfsync = "never"\n'
        "ann_overfetch = 2\nverify_checksums = false\nENDCAP_POOL_THREADS = 3\n"
    )
    env = {"ENDCAP_PORT": "7000", "ENDCAP_FSYNC": "interval"}
    settings = Settings.from_env(env, config, fsync="always")
    assert settings.state_backend == "redis" and settings.pool_threads == 3
    assert settings.ann_overfetch == 2.0 and settings.verify_checksums is False
    assert settings.port == 7000  # environment beats the file
    assert settings.fsync == "always"  # flags beat both
    assert Settings.from_env({"ENDCAP_CONFIG": str(config)}).port == 6000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown setting 'prot'"),
        ('port = "many"\n', "port='many' is invalid"),
        ("verify_checksums = 1\n", "verify_checksums must be bool"),
        ("port = 1.5\n", "port must be int"),
        ("port = \n", "endcap.toml"),
        ("port = 70000\n", "port must be in [0, 65535]"),
    ],
)
def test_config_file_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    from server.infra.settings import Settings, SettingsError

    config = tmp_path / "endcap.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({}, config)
    assert message in str(err.value)
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        Settings.from_env({}, tmp_path / "missing.toml")
