"""Labels on hand-made shops: one story per customer, cutoff T0, horizon 28 days."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tinyshop import T0, day, make_shop

from ml.config import MODEL
from ml.dataset import build_examples
from ml.features import FeatureContext

H = MODEL.horizon_days


def _orders(cid: str, days, product: str, channel: str = "web") -> list[tuple]:
    return [(f"{cid}-{product}-{d}", cid, day(d), channel, [(product, 1, None)]) for d in days]


def _story_shop():
    weekly = range(-120, 0, 7)
    orders = (
        # trades up: weekly budget coffee, then a premium coffee in the window
        _orders("up", weekly, "cof0") + _orders("up", [5], "cof2")
        # stays in tier: same habit, buys budget coffee in the window (upsell 0, not dropped)
        + _orders("same", weekly, "cof0") + _orders("same", [3, 10], "cof0")
        # at risk (falling activity), usual premium tea, buys budget tea and orders again late in the window
        + _orders("down", range(-175, -95, 10), "tea2") + _orders("down", [-40], "tea2")
        + _orders("down", [3], "tea0") + _orders("down", [20], "tea2")
        # same, but the cheaper purchase is followed by silence: not a downsell that kept the customer
        + _orders("gone", range(-175, -95, 10), "tea2") + _orders("gone", [-40], "tea2")
        + _orders("gone", [3], "tea0")
        # adopts a new category in the window
        + _orders("adopter", weekly, "cof1") + _orders("adopter", [-30, -10], "tea1")
        + _orders("adopter", [10], "sna1")
        # no purchase in the horizon at all
        + _orders("quiet", range(-175, -95, 10), "tea2") + _orders("quiet", [-60], "cof1")
        # window edges: Snacks exactly at T (inside), Tea exactly at T + H (outside)
        + _orders("edge", weekly, "cof1") + _orders("edge", [0], "sna0") + _orders("edge", [H], "tea2")
        # cold start: only orders after T
        + _orders("cold", [2, 9], "cof1")
    )
    # make `edge`'s boundary orders exactly at midnight, not at noon
    orders = [(o[0], o[1], pd.Timestamp(T0) + pd.Timedelta(days=H) if o[0] == f"edge-tea2-{H}" else
               pd.Timestamp(T0) if o[0] == "edge-sna0-0" else o[2], *o[3:]) for o in orders]
    return make_shop(orders)


SHOP = _story_shop()
CTX = FeatureContext.build(SHOP, T0)
FRAMES = {t: build_examples(SHOP, T0, t, context=CTX).set_index(["customer_id", "category"])
          for t in ("cross_sell", "upsell", "downsell")}


def label(offer_type: str, customer: str, category: str) -> int:
    return int(FRAMES[offer_type].loc[(customer, category), "label"])


def test_upsell_trade_up_is_positive_staying_in_tier_is_negative():
    assert label("upsell", "up", "Coffee") == 1
    assert label("upsell", "same", "Coffee") == 0
    assert FRAMES["upsell"].loc[("up", "Coffee"), "product_id"] == "cof1"


def test_downsell_needs_a_cheaper_purchase_and_staying_active():
    assert FRAMES["downsell"].loc[("down", "Tea"), "at_risk"]
    assert label("downsell", "down", "Tea") == 1
    assert label("downsell", "gone", "Tea") == 0  # bought cheaper, then nothing in the second half
    assert FRAMES["downsell"].loc[("down", "Tea"), "product_id"] == "tea1"


def test_cross_sell_adoption_and_window_edges():
    assert label("cross_sell", "adopter", "Snacks") == 1
    assert label("cross_sell", "edge", "Snacks") == 1  # exactly at T is inside [T, T+H)
    assert label("cross_sell", "edge", "Tea") == 0  # exactly at T+H is outside
    # the offered product is at the customer's usual price level (standard coffee buyer → standard snack)
    assert FRAMES["cross_sell"].loc[("adopter", "Snacks"), "product_id"] == "sna1"


def test_customers_without_purchases_in_the_horizon_are_negatives_not_dropped():
    for offer_type, frame in FRAMES.items():
        quiet = frame.xs("quiet", level="customer_id")
        assert len(quiet) > 0, offer_type
        assert (quiet["label"] == 0).all()
    assert set(FRAMES["cross_sell"].xs("quiet", level="customer_id").index) == {"Snacks"}


def test_cold_start_customers_have_no_candidates():
    for frame in FRAMES.values():
        assert "cold" not in frame.index.get_level_values("customer_id")


def test_labels_do_not_change_features():
    """Labels are an extra column; the rows and features are those of the label-free frame."""
    for offer_type, frame in FRAMES.items():
        plain = build_examples(SHOP, T0, offer_type, with_labels=False, context=CTX)
        pd.testing.assert_frame_equal(frame.reset_index().drop(columns="label"), plain[
            ["customer_id", "category", *[c for c in plain.columns if c not in ("customer_id", "category")]]])
        assert frame["label"].dtype == np.int64 and frame["label"].isin([0, 1]).all()


@pytest.mark.parametrize("offer_type", ["cross_sell", "upsell", "downsell"])
def test_a_later_cutoff_sees_the_window_purchase_as_history(offer_type):
    """At T + H the window's purchases are history: e.g. `adopter` now owns Snacks."""
    later = build_examples(SHOP, T0 + pd.Timedelta(days=H).to_pytimedelta(), offer_type, with_labels=False)
    pairs = set(zip(later["customer_id"], later["category"], strict=True))
    if offer_type == "cross_sell":
        assert ("adopter", "Snacks") not in pairs
    elif offer_type == "upsell":
        assert ("adopter", "Snacks") in pairs  # bought standard; premium exists
