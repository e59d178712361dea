"""Domain errors: plain exceptions, mapped to gRPC status codes by the servicer only.

DomainError
├── InvalidQuery      a request is well-formed but cannot be served as asked
│                     (e.g. no exchange rate for its currency); names the field
└── UnknownItems      ids that must exist in the catalog do not
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""


class InvalidQuery(DomainError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownItems(DomainError):
    def __init__(self, field: str, item_ids: tuple[str, ...]) -> None:
        shown = ", ".join(repr(i) for i in item_ids[:10])
        more = f" and {len(item_ids) - 10} more" if len(item_ids) > 10 else ""
        super().__init__(f"{field}: unknown item ids {shown}{more}")
        self.field = field
        self.item_ids = item_ids
