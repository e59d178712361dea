"""Build hygiene: stubs match the .proto, and the serving path never imports torch."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "proto/endcap/v1").glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"),
            f"--python_out={tmp_path}", f"--mypy_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
            *(str(p) for p in PROTOS),
        ],
        check=True,
        env=env,
        capture_output=True,
    )  # fmt: skip
    names = [p.stem + suffix for p in PROTOS for suffix in SUFFIXES]
    assert len(names) >= 8
    for name in names:
        fresh, committed = tmp_path / "endcap/v1" / name, ROOT / "proto/endcap/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{name} is stale: run `make proto`"


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys; import server.app, endcap.cli, endcap.demo; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
