"""The model artifact: the one format training writes and the server reads.

An artifact is a directory::

    manifest.json        format version, model version, vocabularies, counts,
                         training params/metrics, sha256 of every other file
    arrays/<name>.npy    one array per file (memory-mapped at load), see SCHEMA
    index.faiss          FAISS index over item_embeddings (ids = item indexes)
    encoder.npz          optional query encoder weights, see ENCODER_KINDS

No pickle anywhere: string columns are fixed-width unicode arrays. A root
directory may hold several versions; `LATEST` names the current one. This
module imports numpy, faiss and the numpy-only server.domain.sequence (no
torch, no grpc).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from server.domain.sequence import encoder_shapes

# Version 2 adds the optional query encoder. Like OPTIONAL_SCHEMA arrays it is
# validated when present and absent from older artifacts, but a server that
# ignored it would serve a wrong query vector, so only artifacts that carry one
# are written as version 2: anything else stays version 1, which older servers
# read, while they refuse what they cannot serve.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
ENCODER_FILE = "encoder.npz"
LATEST = "LATEST"
ARRAYS_DIR = "arrays"

# Dimension symbols used in SCHEMA shapes:
#   n items, d embedding dim, u users, h history length total, c countries,
#   k categories, b brands, p price buckets, s segment list length,
#   w = ceil(n / 64) words of a packed item bitmap.
# Device rows follow RequestContext.Device (0 unspecified, 1 mobile, 2 tablet,
# 3 desktop); country rows follow manifest country_codes plus one final row for
# "unknown or unspecified country".
SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    # Catalog columns.
    "item_ids": ("U", ("n",)),
    "item_category": ("int32", ("n",)),  # leaf category index
    "item_brand": ("int32", ("n",)),
    "item_price": ("float64", ("n",)),  # in manifest base_currency
    "item_in_stock": ("bool", ("n",)),
    "item_country_bits": ("uint64", ("c", "w")),  # bit i of word j: item 64*j+i ships there
    "category_parent": ("int32", ("k",)),  # -1 for a root category
    # Model: items.
    "item_embeddings": ("float32", ("n", "d")),
    # Item tower for items unseen in training: category + brand + price bucket.
    "item_tower_category": ("float32", ("k", "d")),  # a category's vector + its ancestors'
    "item_tower_brand": ("float32", ("b", "d")),
    "item_tower_price": ("float32", ("p", "d")),
    "price_bucket_edges": ("float64", ("p-1",)),  # base currency, ascending
    # Model: users and context. The query vector is
    #   q = user_embeddings[u] + history_projection @ mean(item_embeddings[recent])
    #       + context_device[device] + context_country[country]
    # (or the encoder's formula when the manifest names one, see ENCODER_KINDS),
    # where a shopper without a trained row or history contributes zero for those
    # terms, while a missing device or country uses its learned "unknown" row
    # (device 0, the last country row); score(i) = q . item_embeddings[i].
    # History lists collapse back-to-back events on one item into one entry.
    "user_ids": ("U", ("u",)),
    "user_embeddings": ("float32", ("u", "d")),
    "user_history_indptr": ("int64", ("u+1",)),
    "user_history_items": ("int32", ("h",)),  # per user, oldest first
    "history_projection": ("float32", ("d", "d")),
    "context_device": ("float32", ("4", "d")),
    "context_country": ("float32", ("c+1", "d")),
    # Popularity: time-decayed interaction counts, catalog-wide and per segment.
    "item_popularity": ("float32", ("n",)),
    "segment_top_items": ("int32", ("c+1", "4", "s")),  # -1 pads short lists
    "segment_top_scores": ("float32", ("c+1", "4", "s")),
}


# Arrays an artifact may carry; validated when present, absent in older ones.
OPTIONAL_SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    # Purchase history of trained users (RFM shopper segments).
    "user_orders": ("int32", ("u",)),
    "user_monetary": ("float64", ("u",)),  # base currency
    "user_last_purchase_s": ("float64", ("u",)),  # unix seconds, 0 = never
    # "Customers also bought": per item, co-purchased items best first (CSR).
    "copurchase_indptr": ("int64", ("n+1",)),
    "copurchase_items": ("int32", ("cp",)),
    "copurchase_scores": ("float32", ("cp",)),
    # Merchandising tags: bit j of an item's word = manifest tag_names[j].
    "item_tags": ("uint64", ("n",)),
}
MAX_TAGS = 64  # distinct tags per catalog: one bit each


# Query encoders a manifest's `encoder` section may name, with the integer
# fields it must give. With "sequential" (server/domain/sequence.py) the query is
#   q = user_embeddings[u] + encoder(item vectors of the history, oldest first)
#       + context_device[device] + context_country[country]
# (history_projection is unused; an export may hold zero user rows). Its weights
# are ENCODER_FILE, named and shaped as sequence.encoder_shapes says, with d the
# manifest's dim; the input and output item table is item_embeddings.
ENCODER_KINDS: dict[str, tuple[str, ...]] = {
    "sequential": ("layers", "heads", "inner", "max_len"),
}


class ArtifactError(Exception):
    """The artifact is missing, corrupt, or not in a format this server reads."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What manifest.json says about an artifact."""

    format_version: int
    model_version: str
    created_at: str
    dim: int
    n_items: int
    n_users: int
    base_currency: str
    currency_rates: dict[str, float]  # units of currency per 1 base unit
    country_codes: tuple[str, ...]
    category_names: tuple[str, ...]
    brand_names: tuple[str, ...]
    history_length: int  # recent items the query encoder reads
    index_description: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    data_fingerprint: str
    checksums: dict[str, str]
    encoder: dict[str, Any] | None = None  # {"kind": ..., ENCODER_KINDS fields}
    tag_names: tuple[str, ...] = ()  # bit j of item_tags; absent in older manifests

    def to_json(self) -> dict[str, Any]:
        body = {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "dim": self.dim,
            "n_items": self.n_items,
            "n_users": self.n_users,
            "base_currency": self.base_currency,
            "currency_rates": self.currency_rates,
            "country_codes": list(self.country_codes),
            "category_names": list(self.category_names),
            "brand_names": list(self.brand_names),
            "history_length": self.history_length,
            "index_description": self.index_description,
            "params": self.params,
            "metrics": self.metrics,
            "data_fingerprint": self.data_fingerprint,
            "checksums": self.checksums,
        }
        if self.tag_names:
            body["tag_names"] = list(self.tag_names)
        return body if self.encoder is None else body | {"encoder": self.encoder}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"artifact format_version {version!r} is not supported "
                f"(this server reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        encoder = raw.get("encoder")
        if encoder is not None:
            encoder = _encoder_spec(encoder)
            if version < 2:
                raise ArtifactError("manifest encoder needs format_version 2, got 1")
        try:
            return cls(
                format_version=int(raw["format_version"]),
                model_version=str(raw["model_version"]),
                created_at=str(raw["created_at"]),
                dim=int(raw["dim"]),
                n_items=int(raw["n_items"]),
                n_users=int(raw["n_users"]),
                base_currency=str(raw["base_currency"]),
                currency_rates={str(k): float(v) for k, v in raw["currency_rates"].items()},
                country_codes=tuple(str(c) for c in raw["country_codes"]),
                category_names=tuple(str(c) for c in raw["category_names"]),
                brand_names=tuple(str(b) for b in raw["brand_names"]),
                history_length=int(raw["history_length"]),
                index_description=str(raw["index_description"]),
                params=dict(raw.get("params", {})),
                metrics=dict(raw.get("metrics", {})),
                data_fingerprint=str(raw.get("data_fingerprint", "")),
                checksums={str(k): str(v) for k, v in raw["checksums"].items()},
                encoder=encoder,
                tag_names=_tag_names(raw.get("tag_names", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"manifest.json is malformed: {exc!r}") from exc


def _tag_names(raw: Any) -> tuple[str, ...]:
    names = tuple(str(t) for t in raw)
    if len(names) > MAX_TAGS or len(set(names)) != len(names) or not all(names):
        raise ArtifactError(f"manifest tag_names must be at most {MAX_TAGS} distinct names")
    return names


@dataclass(frozen=True, slots=True)
class Artifact:
    """A loaded artifact: manifest, arrays (memory-mapped), FAISS index."""

    path: Path
    manifest: Manifest
    arrays: Mapping[str, npt.NDArray[Any]]
    index: faiss.Index
    encoder: Mapping[str, npt.NDArray[Any]] | None = None  # ENCODER_FILE's weights

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.arrays[name]


def _dims(manifest: Manifest, arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, int]:
    n = manifest.n_items
    c = len(manifest.country_codes)
    return {
        "n": n,
        "d": manifest.dim,
        "u": manifest.n_users,
        "u+1": manifest.n_users + 1,
        "h": int(arrays["user_history_items"].shape[0]),
        "c": c,
        "c+1": c + 1,
        "k": len(manifest.category_names),
        "b": len(manifest.brand_names),
        "p": int(arrays["item_tower_price"].shape[0]),
        "p-1": int(arrays["item_tower_price"].shape[0]) - 1,
        "s": int(arrays["segment_top_items"].shape[-1]),
        "w": (n + 63) // 64,
        "4": 4,
        "n+1": n + 1,
        "cp": int(arrays["copurchase_items"].shape[0]) if "copurchase_items" in arrays else 0,
    }


def validate_arrays(manifest: Manifest, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Check every SCHEMA array is present with the right dtype and shape."""
    missing = sorted(set(SCHEMA) - set(arrays))
    if missing:
        raise ArtifactError(f"artifact is missing arrays: {', '.join(missing)}")
    dims = _dims(manifest, arrays)
    present = {**SCHEMA, **{k: v for k, v in OPTIONAL_SCHEMA.items() if k in arrays}}
    for name, (dtype, shape) in present.items():
        arr = arrays[name]
        kind_ok = arr.dtype.kind == "U" if dtype == "U" else arr.dtype == np.dtype(dtype)
        if not kind_ok:
            raise ArtifactError(f"array {name}: dtype {arr.dtype} is not {dtype}")
        want = tuple(dims[s] for s in shape)
        if arr.shape != want:
            raise ArtifactError(f"array {name}: shape {arr.shape} is not {want} {shape}")
    indptr = arrays["user_history_indptr"]
    if indptr[0] != 0 or indptr[-1] != dims["h"] or np.any(np.diff(indptr) < 0):
        raise ArtifactError("array user_history_indptr is not a valid CSR index pointer")
    for name, bound in (
        ("item_category", dims["k"]),
        ("item_brand", dims["b"]),
        ("user_history_items", dims["n"]),
    ):
        col = arrays[name]
        if col.size and (int(col.min()) < 0 or int(col.max()) >= bound):
            raise ArtifactError(f"array {name}: values outside [0, {bound})")
    n_tags = len(manifest.tag_names)
    tags = arrays.get("item_tags")
    used = int(np.bitwise_or.reduce(tags)) if tags is not None and tags.size else 0
    if n_tags < MAX_TAGS and used >> n_tags:
        raise ArtifactError(f"array item_tags: bits beyond the {n_tags} tag_names")


def _encoder_spec(raw: object) -> dict[str, Any]:
    """A manifest encoder section, checked: a known kind and its positive integer fields."""
    if not isinstance(raw, Mapping):
        raise ArtifactError(f"manifest encoder must be an object, got {raw!r}")
    kind = raw.get("kind")
    if kind not in ENCODER_KINDS:
        raise ArtifactError(
            f"manifest encoder kind must be one of {sorted(ENCODER_KINDS)}, got {kind!r}"
        )
    spec: dict[str, Any] = {"kind": kind}
    for name in ENCODER_KINDS[kind]:
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArtifactError(f"manifest encoder {name} must be an integer >= 1, got {value!r}")
        spec[name] = value
    return spec


def validate_encoder(manifest: Manifest, weights: Mapping[str, npt.NDArray[Any]]) -> None:
    """Check encoder weights against the manifest's encoder section: names, dtypes,
    shapes, head count, finite values."""
    spec = manifest.encoder
    if spec is None:
        raise ArtifactError(f"{ENCODER_FILE} is present but the manifest names no encoder")
    dim, heads = manifest.dim, spec["heads"]
    if dim % heads:
        raise ArtifactError(f"manifest encoder heads must divide dim {dim}, got {heads}")
    want = encoder_shapes(dim, spec["layers"], spec["inner"], spec["max_len"])
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise ArtifactError(
            f"{ENCODER_FILE} does not match the manifest encoder "
            f"({spec['layers']} layers): missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for name, shape in want.items():
        arr = weights[name]
        dtype = np.dtype(np.int64 if shape == () else np.float32)
        if arr.dtype != dtype:
            raise ArtifactError(f"encoder weight {name}: dtype {arr.dtype} is not {dtype}")
        if arr.shape != shape:
            raise ArtifactError(f"encoder weight {name}: shape {arr.shape} is not {shape}")
        if dtype == np.float32 and not np.isfinite(arr).all():
            raise ArtifactError(f"encoder weight {name}: holds NaN or infinity")
    stored = {int(weights[name]) for name, shape in want.items() if shape == ()}
    if stored != {heads}:
        raise ArtifactError(
            f"encoder weights hold {sorted(stored)} heads, manifest encoder says {heads}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(
    root: Path,
    *,
    model_version: str,
    dim: int,
    base_currency: str,
    currency_rates: Mapping[str, float],
    country_codes: tuple[str, ...],
    category_names: tuple[str, ...],
    brand_names: tuple[str, ...],
    history_length: int,
    arrays: Mapping[str, npt.NDArray[Any]],
    index: faiss.Index,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data_fingerprint: str = "",
    make_latest: bool = True,
    encoder: Mapping[str, Any] | None = None,
    encoder_weights: Mapping[str, npt.NDArray[Any]] | None = None,
    tag_names: tuple[str, ...] = (),
) -> Path:
    """Write a new artifact version under `root` and (by default) point LATEST at it.

    `encoder` (a manifest encoder section, see ENCODER_KINDS) and
    `encoder_weights` come together; with them the artifact is format version
    2, else 1. The version directory appears atomically (written to a temp
    dir, renamed).
    """
    if (encoder is None) != (encoder_weights is None):
        raise ArtifactError("encoder and encoder_weights must be given together")
    manifest = Manifest(
        format_version=1 if encoder is None else FORMAT_VERSION,
        model_version=model_version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        dim=dim,
        n_items=int(arrays["item_ids"].shape[0]),
        n_users=int(arrays["user_ids"].shape[0]),
        base_currency=base_currency,
        currency_rates=dict(currency_rates),
        country_codes=country_codes,
        category_names=category_names,
        brand_names=brand_names,
        history_length=history_length,
        index_description=type(index).__name__,
        params=dict(params or {}),
        metrics=dict(metrics or {}),
        data_fingerprint=data_fingerprint,
        checksums={},
        encoder=None if encoder is None else _encoder_spec(encoder),
        tag_names=_tag_names(tag_names),
    )
    validate_arrays(manifest, arrays)
    if encoder_weights is not None:
        validate_encoder(manifest, encoder_weights)
    if index.ntotal != manifest.n_items or index.d != dim:
        raise ArtifactError(
            f"index holds {index.ntotal} vectors of dim {index.d}, "
            f"expected {manifest.n_items} of dim {dim}"
        )
    root.mkdir(parents=True, exist_ok=True)
    final = root / model_version
    if final.exists():
        raise ArtifactError(f"artifact version {model_version} already exists in {root}")
    tmp = root / f".{model_version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ARRAYS_DIR).mkdir(parents=True)
    checksums: dict[str, str] = {}
    for name in sorted(arrays):
        rel = f"{ARRAYS_DIR}/{name}.npy"
        np.save(tmp / rel, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        checksums[rel] = _sha256(tmp / rel)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    checksums[INDEX_FILE] = _sha256(tmp / INDEX_FILE)
    if encoder_weights is not None:
        # Numeric arrays only, so nothing is pickled (np.load refuses pickles anyway).
        weights: dict[str, Any] = {k: np.asarray(w) for k, w in encoder_weights.items()}
        np.savez(tmp / ENCODER_FILE, **weights)
        checksums[ENCODER_FILE] = _sha256(tmp / ENCODER_FILE)
    body = manifest.to_json() | {"checksums": checksums}
    (tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, final)
    if make_latest:
        set_latest(root, model_version)
    return final


def set_latest(root: Path, model_version: str) -> None:
    """Atomically point root/LATEST at a version directory."""
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(model_version + "\n")
    os.replace(tmp, root / LATEST)


def resolve(path: Path) -> Path:
    """The artifact directory for `path`: itself, or the version LATEST names."""
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        raise ArtifactError(f"{latest} names {target.name}, which has no {MANIFEST}")
    raise ArtifactError(f"no artifact at {path}: neither {MANIFEST} nor {LATEST} found")


def load_artifact(path: Path, *, verify_checksums: bool = True, mmap: bool = True) -> Artifact:
    """Load and verify an artifact. Raises ArtifactError naming what is wrong.

    With `mmap`, arrays are memory-mapped read-only: pages are shared between
    serving processes on one host and loaded on first touch.
    """
    directory = resolve(path)
    try:
        raw = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {directory / MANIFEST}: {exc}") from exc
    manifest = Manifest.from_json(raw)
    for rel, want in manifest.checksums.items():
        file = directory / rel
        if not file.is_file():
            raise ArtifactError(f"artifact file {rel} is missing")
        if verify_checksums and _sha256(file) != want:
            raise ArtifactError(f"artifact file {rel} does not match its checksum")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for file in sorted((directory / ARRAYS_DIR).glob("*.npy")):
        try:
            arrays[file.stem] = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read array {file.name}: {exc}") from exc
    validate_arrays(manifest, arrays)
    encoder = _load_encoder(directory, manifest)
    try:
        # IO_FLAG_MMAP_IFC maps the index file zero-copy (the lists stay in-memory
        # ArrayInvertedLists, as fast as a copy once paged in), so every serving process
        # on a host shares one page-cached copy. Plain IO_FLAG_MMAP turns an IVF into
        # OnDiskInvertedLists, measured 25x slower. A mapped index is read-only: live
        # rows are scored next to it (domain/retrieval.py), never added to it.
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
    except RuntimeError as exc:
        raise ArtifactError(f"cannot read {INDEX_FILE}: {exc}") from exc
    if index.ntotal != manifest.n_items or index.d != manifest.dim:
        raise ArtifactError(
            f"{INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, "
            f"manifest says {manifest.n_items} of dim {manifest.dim}"
        )
    return Artifact(path=directory, manifest=manifest, arrays=arrays, index=index, encoder=encoder)


def _load_encoder(directory: Path, manifest: Manifest) -> dict[str, npt.NDArray[Any]] | None:
    """The encoder weights the manifest names, validated; None if it names none."""
    file = directory / ENCODER_FILE
    if manifest.encoder is None:
        if file.exists():
            raise ArtifactError(f"{ENCODER_FILE} is present but the manifest names no encoder")
        return None
    if ENCODER_FILE not in manifest.checksums:
        raise ArtifactError(f"manifest names an encoder but has no checksum for {ENCODER_FILE}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            weights = {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"cannot read {ENCODER_FILE}: {exc}") from exc
    validate_encoder(manifest, weights)
    return weights
