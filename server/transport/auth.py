"""API keys with roles, checked on every Recommender call; health and reflection stay open.

A key file has one key per line: `<key> <role>[,<role>...]`, `#` comments and
blank lines ignored. Roles: `read` (Recommend, Rerank, SimilarItems, Popular,
RecentlyViewed), `events` (TrackEvents, StreamEvents), `admin` (UpsertItems,
DeleteItems, ForgetUser, ReloadModel). A key may be written as
`sha256:<64 hex digits>` so the file need not hold it in the clear. Only
SHA-256 digests are kept in memory, compared with `hmac.compare_digest`; keys
are never logged or echoed.

Clients send `authorization: Bearer <key>` or `x-api-key: <key>`. Missing or
unknown keys are UNAUTHENTICATED; a known key without the method's role is
PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.infra.settings import Settings, SettingsError
from server.transport.handlers import Behavior, Handler, WrappingInterceptor, behavior_of, rebuild

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
ROLES = ("read", "events", "admin")
PROTECTED = "endcap.v1.Recommender"
METHOD_ROLES = {
    "Recommend": "read",
    "Rerank": "read",
    "SimilarItems": "read",
    "Popular": "read",
    "RecentlyViewed": "read",
    "TrackEvents": "events",
    "StreamEvents": "events",
    "UpsertItems": "admin",
    "DeleteItems": "admin",
    "ForgetUser": "admin",
    "ReloadModel": "admin",
}
MIN_KEY_CHARS = 16
_HASHED = re.compile(r"sha256:([0-9a-f]{64})")
_ENV = "ENDCAP_API_KEYS_FILE"


def required_role(method: str) -> str | None:
    """The role a full method name ("/pkg.Service/Method") needs; None if it is open.

    A Recommender method missing from METHOD_ROLES (a new RPC) needs admin: fail closed.
    """
    service, _, name = method.lstrip("/").rpartition("/")
    if service != PROTECTED:
        return None
    return METHOD_ROLES.get(name, "admin")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """SHA-256 digests of the accepted keys and the roles of each."""

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, text: str, source: str = _ENV) -> ApiKeys:
        """Raises SettingsError naming `source` and the line (never the key)."""
        entries: list[tuple[bytes, frozenset[str]]] = []
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise SettingsError(f"{source}: line {n}: expected '<key> <role>[,<role>...]'")
            key, role_list = parts
            roles = frozenset(r.strip() for r in role_list.split(",") if r.strip())
            unknown = sorted(roles - set(ROLES))
            if not roles or unknown:
                raise SettingsError(
                    f"{source}: line {n}: roles must be some of {', '.join(ROLES)}, got {unknown}"
                )
            hashed = _HASHED.fullmatch(key)
            if hashed:
                digest = bytes.fromhex(hashed.group(1))
            elif len(key) < MIN_KEY_CHARS:
                raise SettingsError(f"{source}: line {n}: keys must be >= {MIN_KEY_CHARS} chars")
            else:
                digest = _digest(key)
            if any(hmac.compare_digest(digest, d) for d, _ in entries):
                raise SettingsError(f"{source}: line {n}: the same key is listed twice")
            entries.append((digest, roles))
        if not entries:
            raise SettingsError(f"{source}: no keys (an empty file would lock every caller out)")
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{_ENV}={path}: cannot read: {exc}") from exc
        return cls.parse(text, f"{_ENV}={path}")

    def roles(self, key: str) -> frozenset[str] | None:
        """The roles of `key`, None if it is not one of ours. Every entry is compared,
        in constant time each, so timing says nothing about which one matched."""
        digest = _digest(key)
        found = None
        for stored, roles in self.entries:
            if hmac.compare_digest(stored, digest):
                found = roles
        return found


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`, if any."""
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and value.strip():
            return value.strip()
    return None


class AuthInterceptor(WrappingInterceptor):
    """Checks the caller's key and role before a Recommender handler runs (and before its
    request is parsed); the check runs per call."""

    def __init__(self, keys: ApiKeys) -> None:
        super().__init__()
        self._keys = keys

    def wrap(self, method: str, handler: Handler) -> Handler:
        role = required_role(method)
        return handler if role is None else rebuild(handler, self._guard(role, method, handler))

    async def _check(self, role: str, method: str, context: Ctx) -> None:
        key = presented_key(context.invocation_metadata())
        if key is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer <key>' or 'x-api-key: <key>'",
            )
        roles = self._keys.roles(key)
        if roles is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        if role not in roles:
            name = method.rsplit("/", 1)[-1]
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this API key lacks the '{role}' role that {name} needs",
            )

    def _guard(self, role: str, method: str, handler: Handler) -> Behavior:
        behavior = behavior_of(handler)
        check = self._check
        if handler.response_streaming and not inspect.iscoroutinefunction(behavior):

            async def streamed(request: Any, context: Ctx) -> AsyncIterator[Any]:
                await check(role, method, context)
                async for response in behavior(request, context):
                    yield response

            return streamed

        async def guarded(request: Any, context: Ctx) -> Any:
            await check(role, method, context)
            return await behavior(request, context)

        return guarded


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The auth interceptor if keys are configured; warns when the server is reachable
    from other hosts without any. Raises SettingsError for a bad key file."""
    if not settings.api_keys_file:
        if not is_loopback(settings.host):
            log.warning(
                "listening on %s without authentication: anyone who can reach the port can "
                "read recommendations, send events and change the catalog; set %s",
                settings.host,
                _ENV,
            )
        return []
    keys = ApiKeys.load(Path(settings.api_keys_file))
    counts = {r: sum(r in roles for _, roles in keys.entries) for r in ROLES}
    log.info(
        "API keys required: %d keys (%s)",
        len(keys.entries),
        ", ".join(f"{n} {r}" for r, n in counts.items()),
    )
    return [AuthInterceptor(keys)]
