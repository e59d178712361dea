"""The soak benchmark's bounds and verdict (the 10-minute run itself is not a test)."""

from __future__ import annotations

import pytest

from benchmarks.soak import parser, verdict


@pytest.mark.parametrize(
    "argv",
    [["--minutes", "0"], ["--minutes", "121"], ["--rate", "0"], ["--rate", "2001"]],
)
def test_duration_and_rate_are_bounded(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)


def test_defaults_are_a_modest_ten_minutes() -> None:
    args = parser().parse_args([])
    assert args.minutes == 10 and args.rate == 100


def _rows(rss: list[float], p99: list[float]) -> list[dict[str, float]]:
    return [
        {"minute": i + 1, "rss_mb": r, "p99_ms": p}
        for i, (r, p) in enumerate(zip(rss, p99, strict=True))
    ]


def test_verdict_compares_the_last_minutes_with_the_first_after_warmup() -> None:
    args = parser().parse_args([])
    flat = verdict(_rows([200, 150, 151, 150, 152, 151, 150], [90, 20, 21, 19, 20, 22, 21]), args)
    assert flat["flat"] and flat["compared_minutes"] == [[2, 3, 4], [5, 6, 7]]
    leaking = verdict(_rows([100, 110, 120, 130, 140, 150, 160], [20] * 7), args)
    assert leaking["flat"] is False and leaking["rss_growth_mb"] == 30
    slower = verdict(_rows([100] * 7, [20, 20, 20, 20, 40, 40, 40]), args)
    assert slower["flat"] is False
    assert verdict(_rows([100, 100], [20, 20]), args)["flat"] is None
