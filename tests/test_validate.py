"""Request validation's fast whole-list checks agree with the per-entry rules."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.transport import validate

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(max_codepoint=0x2FF), max_size=40))
def test_control_characters_are_found_in_ascii_and_other_text(text: str) -> None:
    assert validate._has_control(text) == bool(_CONTROL.search(text))


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        (["sku-1", "sku-\x012"], "candidate_item_ids[1]"),
        (["sku-1", "sku-\x7f"], "candidate_item_ids[1]"),
        (["é-\x00", "sku-1"], "candidate_item_ids[0]"),
        (["sku-1", ""], "candidate_item_ids[1]"),
        (["sku-1", "x" * 129], "candidate_item_ids[1]"),
        (["sku-1", "sku-2", "sku-1"], "candidate_item_ids[2]"),
    ],
)
def test_bad_ids_are_named_by_position(ids: list[str], field: str) -> None:
    with pytest.raises(validate.InvalidRequest) as err:
        validate._ids("candidate_item_ids", ids, 500, unique=True)
    assert err.value.field == field


def test_good_ids_pass_in_order_with_duplicates_dropped_when_allowed() -> None:
    ids = ["b", "é-1", "a", "b"]
    assert validate._ids("seed_item_ids", ids, 50, unique=False) == ("b", "é-1", "a")
