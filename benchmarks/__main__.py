"""`python -m benchmarks ...`: the same as `endcap bench ...`."""

from __future__ import annotations

from benchmarks.run import cli

if __name__ == "__main__":  # the load generator's spawned processes re-import this module
    raise SystemExit(cli())
