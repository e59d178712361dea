"""Server configuration: defaults < a TOML file < ENDCAP_* environment < CLI flags, frozen
at startup."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "ENDCAP_"
CONFIG_ENV = "ENDCAP_CONFIG"  # path of a TOML settings file (or --config)


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server reads at startup. Built once; never mutated."""

    artifacts: Path = Path("artifacts")
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100  # 0 disables the metrics HTTP endpoint
    omp_threads: int = 1  # FAISS OpenMP threads per search; >1 oversubscribes pool threads
    pool_threads: int = 2  # threads for work too long to run on the event loop
    workers: int = 1  # >1: this many serving processes share the port (SO_REUSEPORT)
    reuse_port: bool = False  # bind with SO_REUSEPORT (set for each worker)
    exact_scan_max_items: int = 20_000  # fewer passing items than this: exact scan
    ann_min_nprobe: int = 64  # IVF lists an unfiltered search probes (recall >= 0.95)
    ann_overfetch: float = 1.5  # fetch k * this from ANN, then mask and truncate
    ann_category_factor: float = 1.5  # scan this many times more under a category filter
    grace_s: float = 5.0  # drain time for in-flight requests on SIGTERM
    verify_checksums: bool = True
    reload_poll_s: float = 0.0  # >0: watch the artifact root's LATEST and reload on change
    live_capacity: int = 100_000  # items UpsertItems may add before the next retrain
    state_backend: str = "memory"  # memory | redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = 0.05  # past this, a request falls back to local state
    catalog_feed: bool = True  # with redis: replicas share live catalog changes (a stream)
    catalog_feed_batches: int = 10_000  # change batches the stream keeps (XADD MAXLEN ~)
    max_profiles: int = 1_000_000  # in-memory shoppers kept (LRU)
    profile_ttl_s: float = 30 * 86_400.0
    event_log: str = ""  # directory of the durable event log; "" disables it
    fsync: str = "always"  # always | interval | never
    experiments: str = ""  # TOML/JSON experiments file; "" = no experiments
    strategies: str = ""  # TOML placement strategies overriding the defaults; "" = defaults
    max_message_bytes: int = 4 * 1024 * 1024
    max_in_flight: int = 64  # admitted calls at once; beyond it RESOURCE_EXHAUSTED; 0 = no limit
    queue_target_s: float = 0.0  # >0: refuse reads queued longer while a queue stands (0.02)
    queue_interval_s: float = 0.1  # a queue stands when every call waited > target this long
    request_budget_s: float = 1.0  # server time per call (the client's deadline if sooner)
    fallback_below_s: float = 0.005  # less budget left: answer from segment popularity
    tls_cert: str = ""  # PEM certificate chain: serve TLS (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates it signed (mTLS)
    api_keys_file: str = ""  # "<key> <role>[,<role>]" lines: every Recommender call needs a key
    max_connection_age_s: float = 300.0  # clients reconnect (and re-resolve) this often
    wait_for_artifact_s: float = (
        0.0  # >0: start NOT_SERVING and wait this long for a first artifact
    )
    log_level: str = "INFO"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], config_file: Path | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then the TOML file (`config_file`, else $ENDCAP_CONFIG), then
        ENDCAP_<FIELD> variables, then non-None `overrides`."""
        path = config_file or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
        values: dict[str, Any] = read_config(path) if path else {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            if name in environ:
                values[field.name] = _parse(name, environ[name], _PARSERS[field.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise SettingsError naming the first invalid value."""
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise SettingsError(f"{name} must be in [0, 65535], got {value}")
        if self.workers > 1 and self.port == 0:
            raise SettingsError("port must be fixed (not 0) when workers > 1")
        for name in (
            "omp_threads",
            "pool_threads",
            "workers",
            "exact_scan_max_items",
            "ann_min_nprobe",
            "catalog_feed_batches",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ann_overfetch", "ann_category_factor"):
            if getattr(self, name) < 1.0:
                raise SettingsError(f"{name} must be >= 1.0, got {getattr(self, name)}")
        if self.grace_s < 0:
            raise SettingsError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.state_backend not in {"memory", "redis"}:
            raise SettingsError(f"state_backend must be memory or redis, got {self.state_backend}")
        if self.fsync not in {"always", "interval", "never"}:
            raise SettingsError(f"fsync must be always, interval or never, got {self.fsync}")
        for name in (
            "reload_poll_s",
            "redis_timeout_s",
            "profile_ttl_s",
            "live_capacity",
            "max_profiles",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_in_flight", "request_budget_s", "fallback_below_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("queue_target_s", "queue_interval_s"):
            if not 0 <= getattr(self, name) <= 60:
                raise SettingsError(f"{name} must be in [0, 60], got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}"
            )


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of true/false/1/0/yes/no/on/off")


_BY_TYPE: dict[object, Callable[[str], Any]] = {
    int: int,
    float: float,
    bool: _parse_bool,
    Path: Path,
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    name: _BY_TYPE.get(hint, str) for name, hint in typing.get_type_hints(Settings).items()
}


def _parse(name: str, raw: str, parser: Callable[[str], Any]) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from exc


def read_config(path: Path) -> dict[str, Any]:
    """Settings from a TOML file: `port = 50051`, `state_backend = "redis"`, ... (the
    field names; ENDCAP_PORT-style keys work too). Unknown keys and wrong types are
    errors naming the file and the key."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for key, value in doc.items():
        name = key.lower().removeprefix(ENV_PREFIX.lower())
        if name not in hints:
            raise SettingsError(f"config file {path}: unknown setting {key!r}")
        where = f"{path}: {key}"
        if isinstance(value, str):
            values[name] = _parse(where, value, _PARSERS[name])
            continue
        hint = hints[name]
        ok = (
            (hint is bool and isinstance(value, bool))
            or (hint is int and isinstance(value, int) and not isinstance(value, bool))
            or (hint is float and isinstance(value, int | float) and not isinstance(value, bool))
        )
        if not ok:
            raise SettingsError(f"{where} must be {hint.__name__}, got {value!r}")
        values[name] = float(value) if hint is float else value
    return values
