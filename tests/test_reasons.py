"""Reason codes (DESIGN §5.6): the right features, readable phrases, valid JSON, no personal data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ml.reasons import PHRASES, reason_codes

KNOWN = ["cat_orders_90d", "days_since_last_order", "usual_tier", "collab_sim", "lift_max", "share_web",
         "tenure_days", "offer_response_rate", "trend_4w", "price_vs_cat_median"]
UNKNOWN = ["mystery_score", "x1"]
FEATURES = KNOWN + UNKNOWN


def one(contrib: dict, values: dict, k: int = 3) -> list[dict]:
    out = reason_codes(pd.DataFrame([contrib]), pd.DataFrame([values]), k=k)
    return json.loads(out.iloc[0])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 12), st.just(len(FEATURES) + 1)),
                  elements=st.one_of(st.floats(-3, 3, width=32), st.just(0.0), st.just(np.nan))),
       st.integers(1, 5))
def test_top_k_are_the_largest_positive_contributions(matrix, k):
    contrib = pd.DataFrame(matrix, columns=[*FEATURES, "bias"])
    contrib["bias"] = 10.0  # the largest of all, and never a reason
    values = pd.DataFrame({f: np.arange(len(contrib), dtype=float) + 1 for f in FEATURES})
    values["category"] = "Coffee"
    out = reason_codes(contrib, values, k=k)
    assert len(out) == len(contrib) and out.index.equals(contrib.index)
    for i, text in enumerate(out):
        items = json.loads(text)
        row = contrib.iloc[i][FEATURES]
        positive = row[row.round(4) > 0].sort_values(ascending=False, kind="stable")
        assert [it["feature"] for it in items] == list(positive.index[:k])
        assert [it["contribution"] for it in items] == [round(float(v), 4) for v in positive.iloc[:k]]
        assert all(it["contribution"] > 0 for it in items)
        for it in items:
            assert set(it) == {"feature", "value", "contribution", "phrase"}
            assert it["value"] == i + 1
            assert it["phrase"] and "{" not in it["phrase"]


def test_phrases_are_readable_for_known_features():
    contrib = {"cat_orders_90d": 0.9, "days_since_last_order": 0.5, "order_gap_median": -0.1,
               "usual_tier": 0.4, "collab_sim": 0.3, "bias": -2.0}
    values = {"cat_orders_90d": 3.0, "days_since_last_order": 45.0, "order_gap_median": 20.0,
              "usual_tier": 1.0, "collab_sim": np.float32(0.3), "category": "Coffee"}
    items = one(contrib, values, k=4)
    assert [it["phrase"] for it in items] == [
        "bought in Coffee 3 times in 90 days",
        "hasn't bought for 45 days (usual gap 20)",
        "usually buys standard tier in Coffee",
        "customers like them often buy Coffee",
    ]
    assert items[0]["value"] == 3 and items[3]["value"] == 0.3  # clean numbers, not float32 noise

    assert one({"cat_orders_90d": 1.0}, {"cat_orders_90d": 1, "category": "Tea"})[0]["phrase"] == \
        "bought in Tea once in 90 days"
    assert one({"cat_cycle_ratio": 1.0}, {"cat_cycle_ratio": 2.25, "cat_days_since_last": 45,
                                          "cat_gap_median": 20, "category": "Tea"})[0]["phrase"] == \
        "hasn't bought Tea for 45 days (usual gap 20)"
    assert one({"days_since_last_offer": 1.0}, {"days_since_last_offer": np.nan})[0]["phrase"] == \
        "has not received an offer yet"
    assert one({"share_premium": 1.0}, {"share_premium": 0.25})[0]["phrase"] == \
        "25% of their purchases are premium tier"


def test_every_current_feature_has_its_own_phrase():
    """Each feature the dataset defines gets a template, not the generic "<feature> = <value>"."""
    from ml.features import FEATURE_DOCS

    names = [f for f in FEATURE_DOCS if f != "age_band"]
    contrib = pd.DataFrame([dict.fromkeys(names, 1.0)])
    values = pd.DataFrame([{f: 2.0 for f in names} | {"category": "Coffee", "value_band": "high",
                                                      "activity_band": "active"}])
    items = json.loads(reason_codes(contrib, values, k=len(names)).iloc[0])
    assert len(items) == len(names)
    generic = [it["feature"] for it in items if " = " in it["phrase"] or it["feature"] in it["phrase"]]
    assert generic == []


def test_unknown_feature_gets_a_generic_phrase_and_new_names_are_one_line():
    assert one({"mystery_score": 1.0}, {"mystery_score": 0.123456})[0]["phrase"] == "mystery_score = 0.1235"
    PHRASES["mystery_score"] = "mystery score {value} in {category}"
    try:
        assert one({"mystery_score": 1.0}, {"mystery_score": 2, "category": "Tea"})[0]["phrase"] == \
            "mystery score 2 in Tea"
    finally:
        del PHRASES["mystery_score"]


def test_no_positive_contribution_gives_an_empty_list_and_empty_input_works():
    assert one({"cat_orders_90d": -1.0, "collab_sim": 0.0, "bias": 3.0}, {"cat_orders_90d": 1}) == []
    out = reason_codes(pd.DataFrame(columns=["a", "bias"]), pd.DataFrame(columns=["a", "category"]))
    assert len(out) == 0


def test_personal_fields_never_appear():
    contrib = pd.DataFrame({"email": [9.0, 9.0], "birth_year": [8.0, 8.0], "age_band": [7.0, 7.0],
                            "email_domain": [6.0, 6.0], "cat_orders_90d": [0.5, 0.5], "bias": [0.0, 0.0]})
    values = pd.DataFrame({"email": ["ann@example.com", "bob@example.org"], "birth_year": [1980, 1975],
                           "age_band": ["35-44", "45-54"], "email_domain": ["example.com", "example.org"],
                           "cat_orders_90d": [2, 4], "category": ["Coffee", "Tea"]})
    out = reason_codes(contrib, values)
    for text in out:
        items = json.loads(text)
        assert [it["feature"] for it in items] == ["cat_orders_90d"]
        for banned in ("email", "birth", "age_band", "@", "example", "1980", "1975", "35-44", "45-54"):
            assert banned not in text


def test_grouped_rendering_equals_rendering_each_row():
    """Phrases are rendered once per distinct case; templates reading the category or other features
    (conditionally, too) must still get exactly the per-row text."""
    from ml.reasons import Row, _Columns, _render, _resolve

    rng = np.random.default_rng(5)
    n = 400
    values = pd.DataFrame({
        "days_since_last_order": rng.choice([np.nan, 3.0, 45.0, 46.0, 400.0], n),
        "order_gap_median": rng.choice([np.nan, 0.0, 7.0, 20.0], n),
        "cat_orders_90d": rng.choice([0.0, 1.0, 2.0, 3.0, np.nan], n),
        "avg_order_value": np.round(rng.gamma(2.0, 20.0, n), 1),
        "custom": rng.choice([0.5, 1.0, 2.0, np.inf], n),
        "flag": pd.array(rng.choice(["yes", "no", None], n), dtype="string"),
        "category": pd.array(rng.choice(["Coffee", "Tea", None], n), dtype="string"),
    })
    features = [c for c in values.columns if c != "category"]
    contrib = pd.DataFrame(rng.normal(0.2, 0.5, (n, len(features))), columns=features)
    contrib["bias"] = 0.0

    def custom(v, row):  # reads a feature only for some values, and the category only for others
        if v is None:
            return None
        return f"{v} with {row.get('flag')}" if v > 1 else f"{v} in {row.category}"

    PHRASES["custom"] = custom
    try:
        out = reason_codes(contrib, values, k=len(features))
        cols = _Columns(values)
        cats = values["category"].astype("string").fillna("this category").to_numpy(dtype=object)
        for i, text in enumerate(out):
            for item in json.loads(text):
                row = Row(cols, i, cats[i])
                expected = _render(item["feature"], _resolve(item["feature"]), item["value"], row)
                assert item["phrase"] == expected, (i, item)
    finally:
        del PHRASES["custom"]
