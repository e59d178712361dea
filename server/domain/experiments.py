"""A/B experiments: config, deterministic assignment, attribution through recommendation ids.

Config is TOML (or JSON with the same shape)::

    [[experiment]]
    name = "session-boost"     # [a-z0-9_-]{1,32}
    salt = "2026-11"           # change it to reshuffle shoppers
    traffic = 100              # percent of shoppers in the experiment
    [[experiment.variant]]
    name = "control"
    weight = 50
    [[experiment.variant]]
    name = "boosted"
    weight = 50
    session_boost = 4.0        # strategy parameters (see PARAMETERS)
    model = "v2026..."         # optional artifact version served to this variant

A shopper (user_id, else session_id) lands in a bucket from
sha256(salt:id); buckets map to variants by cumulative weight, so assignment
is stable across requests, replicas and restarts. The first experiment whose
traffic covers the bucket wins. Each response's recommendation_id carries
the experiment and variant, so impression/click/purchase events attribute to
them without any lookup table.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKETS = 10_000
_NAME = re.compile(r"[a-z0-9_-]{1,32}")
# Strategy parameters a variant may set, with their valid ranges.
PARAMETERS: dict[str, tuple[float, float]] = {
    "session_boost": (0.0, 100.0),
    "session_half_life_s": (1.0, 30 * 86_400.0),
}
_SEP = "~"


class ExperimentConfigError(ValueError):
    """The experiments file is invalid; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float
    model: str = ""  # artifact version; "" = the default model
    params: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    salt: str
    traffic: float  # percent
    variants: tuple[Variant, ...]


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment: str
    variant: Variant


def _name(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise ExperimentConfigError(f"{where}: name must match [a-z0-9_-]{{1,32}}, got {raw!r}")
    return raw


def _number(raw: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not lo <= raw <= hi:
        raise ExperimentConfigError(f"{where}: must be a number in [{lo}, {hi}], got {raw!r}")
    return float(raw)


def parse(raw: Mapping[str, Any]) -> tuple[Experiment, ...]:
    experiments = []
    seen: set[str] = set()
    for i, exp in enumerate(raw.get("experiment", [])):
        where = f"experiment[{i}]"
        name = _name(exp.get("name"), where)
        if name in seen:
            raise ExperimentConfigError(f"{where}: duplicate experiment {name!r}")
        seen.add(name)
        variants = []
        for j, var in enumerate(exp.get("variant", [])):
            vwhere = f"{where}.variant[{j}]"
            params = {}
            for key, value in var.items():
                if key in {"name", "weight", "model"}:
                    continue
                if key not in PARAMETERS:
                    known = ", ".join(sorted(PARAMETERS))
                    raise ExperimentConfigError(
                        f"{vwhere}: unknown parameter {key!r} (known: {known})"
                    )
                params[key] = _number(value, f"{vwhere}.{key}", *PARAMETERS[key])
            model = var.get("model", "")
            if not isinstance(model, str) or "/" in model or model.startswith("."):
                raise ExperimentConfigError(
                    f"{vwhere}.model: must be a version name, got {model!r}"
                )
            variants.append(
                Variant(
                    name=_name(var.get("name"), vwhere),
                    weight=_number(var.get("weight", 1), f"{vwhere}.weight", 0, 1e9),
                    model=model,
                    params=params,
                )
            )
        if len({v.name for v in variants}) != len(variants) or len(variants) < 2:
            raise ExperimentConfigError(f"{where}: needs at least two uniquely named variants")
        if sum(v.weight for v in variants) <= 0:
            raise ExperimentConfigError(f"{where}: variant weights must not all be zero")
        experiments.append(
            Experiment(
                name=name,
                salt=str(exp.get("salt", name)),
                traffic=_number(exp.get("traffic", 100), f"{where}.traffic", 0, 100),
                variants=tuple(variants),
            )
        )
    return tuple(experiments)


def load(path: Path) -> tuple[Experiment, ...]:
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ExperimentConfigError(f"{path}: {exc}") from exc
    return parse(raw)


def bucket(salt: str, unit: str) -> int:
    digest = hashlib.sha256(f"{salt}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(experiments: Sequence[Experiment], user_id: str, session_id: str) -> Assignment | None:
    """The shopper's experiment and variant, or None (not in any experiment)."""
    unit = user_id or session_id
    if not unit:
        return None
    for exp in experiments:
        b = bucket(exp.salt, unit)
        if b >= exp.traffic / 100 * BUCKETS:
            continue
        # Re-spread the in-traffic buckets over the variants by weight.
        point = b / max(exp.traffic / 100 * BUCKETS, 1) * sum(v.weight for v in exp.variants)
        acc = 0.0
        for variant in exp.variants:
            acc += variant.weight
            if point < acc:
                return Assignment(exp.name, variant)
        return Assignment(exp.name, exp.variants[-1])
    return None


def recommendation_id(random_hex: str, assignment: Assignment | None) -> str:
    if assignment is None:
        return random_hex
    return _SEP.join((random_hex, assignment.experiment, assignment.variant.name))


def attribution(rec_id: str) -> tuple[str, str] | None:
    """(experiment, variant) a recommendation id was served under, if any."""
    parts = rec_id.split(_SEP)
    if len(parts) != 3 or not _NAME.fullmatch(parts[1]) or not _NAME.fullmatch(parts[2]):
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class Rate:
    """A proportion with its Wilson 95% interval."""

    successes: int
    trials: int

    @property
    def value(self) -> float:
        return self.successes / self.trials if self.trials else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        n, z = self.trials, 1.959964
        if n == 0:
            return 0.0, 1.0
        p = self.value
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, center - half), min(1.0, center + half)


def two_proportion_p(a: Rate, b: Rate) -> float:
    """Two-sided p-value that a and b share one rate (pooled z-test)."""
    if not a.trials or not b.trials:
        return 1.0
    pooled = (a.successes + b.successes) / (a.trials + b.trials)
    se = math.sqrt(pooled * (1 - pooled) * (1 / a.trials + 1 / b.trials))
    if se == 0:
        return 1.0
    z = abs(a.value - b.value) / se
    return math.erfc(z / math.sqrt(2))
