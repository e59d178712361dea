"""MovieLens-100K as shipped in the recbole==1.2.1 wheel, read without extracting it."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_REQUIREMENT = "recbole==1.2.1"
# PyPI files are immutable; pinning the hash means a corrupt or substituted
# download fails loudly instead of silently changing the split.
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
CACHE_ENV = "ENDCAP_DATA_CACHE"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


class DatasetUnavailable(Exception):
    """The dataset could not be downloaded or read."""


@dataclass(frozen=True, slots=True)
class ML100K:
    """MovieLens-100K, columnar, with the ids as they are in the files.

    Interactions (e = 100,000), in file order; ratings are dropped:
        user_id      int64 (e,)
        item_id      int64 (e,)
        timestamp    int64 (e,)  unix seconds
    Items (n = 1,682), ascending id:
        item_ids     int64 (n,)
        item_title   str (n,)
        item_year    int32 (n,)  release year, -1 when unknown
        item_genres  bool (n, g) multi-hot over genre_names
    Users (u = 943), ascending id:
        user_ids         int64 (u,)
        user_age         int32 (u,)
        user_gender      int8 (u,)   0 female, 1 male
        user_occupation  int32 (u,)  index into occupation_names
        user_zip         str (u,)
    """

    user_id: npt.NDArray[np.int64]
    item_id: npt.NDArray[np.int64]
    timestamp: npt.NDArray[np.int64]
    item_ids: npt.NDArray[np.int64]
    item_title: npt.NDArray[np.str_]
    item_year: npt.NDArray[np.int32]
    item_genres: npt.NDArray[np.bool_]
    genre_names: tuple[str, ...]
    user_ids: npt.NDArray[np.int64]
    user_age: npt.NDArray[np.int32]
    user_gender: npt.NDArray[np.int8]
    user_occupation: npt.NDArray[np.int32]
    occupation_names: tuple[str, ...]
    user_zip: npt.NDArray[np.str_]

    @property
    def n_interactions(self) -> int:
        return int(self.user_id.shape[0])


def default_cache_dir() -> Path:
    """~/.cache/endcap/datasets: outside any checkout, so data is never committed."""
    return Path.home() / ".cache" / "endcap" / "datasets"


def cache_dir_from_env(environ: Mapping[str, str]) -> Path:
    """The cache directory: ENDCAP_DATA_CACHE from `environ` if set, else the default."""
    value = environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else default_cache_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(cache_dir: Path | None = None) -> Path:
    """Path of the cached recbole wheel, downloading it with pip on first use.

    Raises DatasetUnavailable if pip fails (e.g. no network) or the file's
    sha256 is not the pinned one.
    """
    cache = default_cache_dir() if cache_dir is None else cache_dir
    wheel = cache / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s", WHEEL_REQUIREMENT, cache)
    # Download into a private temp dir and rename, so a concurrent or
    # interrupted run never leaves a half-written wheel under the final name.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            WHEEL_REQUIREMENT,
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {exc}") from exc
        got = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DatasetUnavailable(
                f"pip download {WHEEL_REQUIREMENT} failed (exit {proc.returncode}): "
                + " | ".join(tail)
            )
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise DatasetUnavailable(f"{WHEEL_NAME} sha256 must be {WHEEL_SHA256}, got {digest}")
        shutil.move(str(got), wheel)
    return wheel


def _read_table(wheel: zipfile.ZipFile, suffix: str) -> tuple[list[str], list[list[str]]]:
    """Header field names (without :type) and the rows of one atomic file."""
    text = wheel.read(_MEMBER.format(suffix)).decode("utf-8")
    lines = text.splitlines()
    header = [field.split(":")[0] for field in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line]
    for row in rows:
        if len(row) != len(header):
            raise DatasetUnavailable(f"ml-100k.{suffix}: row {row!r} has not {len(header)} fields")
    return header, rows


def _interactions(
    wheel: zipfile.ZipFile,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    header, rows = _read_table(wheel, "inter")
    if header != ["user_id", "item_id", "rating", "timestamp"]:
        raise DatasetUnavailable(f"ml-100k.inter: unexpected header {header}")
    table = np.array(rows, dtype=np.float64)
    # Timestamps are written as floats but are whole seconds.
    return (
        table[:, 0].astype(np.int64),
        table[:, 1].astype(np.int64),
        table[:, 3].astype(np.int64),
    )


def load_ml100k(cache_dir: Path | None = None) -> ML100K:
    """Read ML-100K interactions, item and user features out of the cached wheel."""
    path = fetch_wheel(cache_dir)
    with zipfile.ZipFile(path) as wheel:
        user_id, item_id, timestamp = _interactions(wheel)
        _, items = _read_table(wheel, "item")
        _, users = _read_table(wheel, "user")
    items.sort(key=lambda row: int(row[0]))
    users.sort(key=lambda row: int(row[0]))
    genre_names = tuple(sorted({g for row in items for g in row[3].split(" ") if g}))
    genre_index = {g: j for j, g in enumerate(genre_names)}
    genres = np.zeros((len(items), len(genre_names)), dtype=np.bool_)
    for i, row in enumerate(items):
        for g in row[3].split(" "):
            if g:
                genres[i, genre_index[g]] = True
    occupation_names = tuple(sorted({row[3] for row in users}))
    occupation_index = {o: j for j, o in enumerate(occupation_names)}
    return ML100K(
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        item_ids=np.array([int(row[0]) for row in items], dtype=np.int64),
        item_title=np.array([row[1] for row in items], dtype=np.str_),
        # Two rows carry junk years ("unkonwn", "V").
        item_year=np.array(
            [int(row[2]) if row[2].isdigit() else -1 for row in items], dtype=np.int32
        ),
        item_genres=genres,
        genre_names=genre_names,
        user_ids=np.array([int(row[0]) for row in users], dtype=np.int64),
        user_age=np.array([int(row[1]) for row in users], dtype=np.int32),
        user_gender=np.array([1 if row[2] == "M" else 0 for row in users], dtype=np.int8),
        user_occupation=np.array([occupation_index[row[3]] for row in users], dtype=np.int32),
        occupation_names=occupation_names,
        user_zip=np.array([row[4] for row in users], dtype=np.str_),
    )
