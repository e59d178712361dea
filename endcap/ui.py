"""Terminal output: one Console factory so tables are not cut to 80 columns in logs."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    """A Console that uses the terminal's width, or 160 columns when output is piped."""
    return Console() if sys.stdout.isatty() else Console(width=160)
