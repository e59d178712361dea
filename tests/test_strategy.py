"""Strategy files: traffic-source weights and VIP thresholds (configured > learned > default)."""

from __future__ import annotations

import numpy as np
import pytest

from server.domain.strategy import (
    SEGMENT_KEYS,
    SegmentRules,
    StrategyConfigError,
    defaults_raw,
    learn_segment_rules,
    parse,
    traffic_source,
)

DAY = 86_400.0


def test_source_weights_multiply_the_retrievers_for_that_source_only() -> None:
    raw = {"strategy": {"home": {"source_weights": {"email": {"personal": 2.0, "trending": 0.0}}}}}
    home = parse(raw, defaults_raw()).strategies["home"]
    plain = home.weights(device=3, segment="customer")
    email = home.weights(device=3, segment="customer", source="email")
    assert email["personal"] == 2.0 * plain["personal"]
    assert "trending" in plain and "trending" not in email  # weight 0 drops the retriever
    assert home.weights(3, "customer", "paid_search") == plain  # unknown sources: no change
    assert traffic_source("  Email ") == "email"


def test_default_home_strategy_names_sources() -> None:
    home = parse(defaults_raw()).strategies["home"]
    assert home.weights(3, "customer", "social")["trending"] == 2.0 * home.retrievers["trending"]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"Paid Search": {"personal": 1.0}}, r"strategy\.home\.source_weights: 'Paid Search'"),
        ({"email": {"nope": 1.0}}, r"strategy\.home\.source_weights\.email: unknown retriever"),
        ({"email": {"personal": -1}}, r"strategy\.home\.source_weights\.email\.personal"),
        ({"email": 3}, r"strategy\.home\.source_weights\.email: must be a table"),
    ],
)
def test_bad_source_weights_name_the_key(weights: object, message: str) -> None:
    with pytest.raises(StrategyConfigError, match=message):
        parse({"strategy": {"home": {"source_weights": weights}}}, defaults_raw())


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ({"vip_min_spend": 10}, r"segments: unknown key 'vip_min_spend'"),
        ({"vip_min_orders": -1}, r"segments\.vip_min_orders: must be a number >= 0"),
        ({"vip_min_orders": 2.5}, r"segments\.vip_min_orders: must be a whole number"),
        ({"vip_max_recency_days": "30"}, r"segments\.vip_max_recency_days"),
        ({"vip_min_monetary": True}, r"segments\.vip_min_monetary"),
    ],
)
def test_bad_segment_thresholds_name_the_key(segments: object, message: str) -> None:
    with pytest.raises(StrategyConfigError, match=message):
        parse({"segments": segments}, defaults_raw())


def population(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n shoppers: 40% never bought; buyers' orders 1..10, spend ~ orders, a 90-day window."""
    rng = np.random.default_rng(seed)
    orders = np.where(rng.random(n) < 0.4, 0, rng.integers(1, 11, size=n)).astype(np.int32)
    spent = orders * rng.uniform(20, 80, size=n)
    last = np.where(orders > 0, 1_700_000_000 + rng.uniform(0, 90 * DAY, size=n), 0.0)
    return orders, spent, last


def test_learned_vip_rule_is_the_recent_top_fifth_of_customers() -> None:
    orders, spent, last = population(5_000)
    rules = learn_segment_rules(orders, spent, last)
    assert rules is not None and set(rules.origin.values()) == {"learned"}
    buyers = orders > 0
    assert rules.vip_min_orders == int(np.ceil(np.quantile(orders[buyers], 0.8)))
    assert np.mean(spent[buyers] >= rules.vip_min_monetary) == pytest.approx(0.2, abs=0.01)
    recency = (last[buyers].max() - last[buyers]) / DAY
    assert np.mean(recency <= rules.vip_max_recency_days) == pytest.approx(0.5, abs=0.02)
    vip = [
        rules.classify(
            known=True, has_history=True, orders=int(o), monetary=float(m), recency_days=float(r)
        )
        == "vip"
        for o, m, r in zip(orders[buyers], spent[buyers], recency, strict=True)
    ]
    assert 0.1 <= np.mean(vip) <= 0.25  # high value and recent: a minority of customers


def test_too_few_customers_learn_nothing() -> None:
    orders, spent, last = population(60)
    orders[np.flatnonzero(orders)[49:]] = 0
    assert learn_segment_rules(orders, spent, last) is None
    assert parse(defaults_raw()).segment_rules(None) == SegmentRules()


def test_configured_thresholds_win_over_learned_ones_key_by_key() -> None:
    learned = learn_segment_rules(*population(2_000))
    assert learned is not None
    strategies = parse({"segments": {"vip_min_orders": 2}}, defaults_raw())
    rules = strategies.segment_rules(learned)
    assert rules.vip_min_orders == 2 and rules.origin["vip_min_orders"] == "configured"
    assert rules.vip_min_monetary == learned.vip_min_monetary
    assert rules.origin["vip_min_monetary"] == "learned"
    assert parse(defaults_raw()).segment_rules(learned) == learned
    assert set(SegmentRules().origin.values()) == {"default"} and len(SEGMENT_KEYS) == 3


def test_shop_rules_boost_by_tag() -> None:
    raw = {"rules": {"boost": [{"attribute": "tag", "value": "high_margin", "factor": 1.3}]}}
    (boost,) = parse(raw, defaults_raw()).boosts
    assert (boost.attribute, boost.value, boost.factor) == ("tag", "high_margin", 1.3)
    with pytest.raises(StrategyConfigError, match=r"rules\.boost\[0\]\.attribute"):
        parse({"rules": {"boost": [{"attribute": "margin", "value": "x"}]}}, defaults_raw())
