"""Evaluation metrics: each checked against a hand-computed value or a property a broken one violates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ml.evaluate import (
    evaluate,
    expected_calibration_error,
    figures,
    lift_at,
    top_k_per_customer,
    topk_metrics,
)
from ml.model import bin_proportions, numeric_reference


def test_ece_small_for_true_probabilities_and_large_for_shifted_ones():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 1.0, 50_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.1


def test_ece_hand_computed():
    # bin [0.2, 0.2667): predictions 0.2, 0.2, observed 1 of 2 → gap |1 − 0.4| = 0.6 over 4 rows;
    # bin [0.8, 0.8667): predictions 0.8, 0.8, observed 2 of 2 → gap |2 − 1.6| = 0.4 → ECE = 1.0 / 4
    y = np.array([0, 1, 1, 1])
    p = np.array([0.2, 0.2, 0.8, 0.8])
    assert expected_calibration_error(y, p) == pytest.approx(0.25)


def test_lift_at_top_share():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1] * 2)  # base rate 0.2
    score = np.linspace(1, 0, 20)  # row 0 scores highest
    assert lift_at(y, score, 0.05) == pytest.approx(1.0 / 0.2)  # top 1 row is a hit
    assert lift_at(y, -score, 0.05) == pytest.approx(1.0 / 0.2)  # the last row is a hit too
    assert math.isnan(lift_at(np.zeros(5), score[:5], 0.1))


def test_topk_per_customer_and_hit_rates():
    cust = pd.Series(["a"] * 4 + ["b"] * 2)
    score = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3])
    y = np.array([1, 1, 0, 0, 0, 1])
    mask = top_k_per_customer(cust, score, k=2)
    assert mask.tolist() == [True, False, True, False, True, True]  # b has only 2 candidates: both kept
    m = topk_metrics(y, cust, score, k=2)
    # a: top-2 = rows 0, 2 → 1 of 2; b: rows 4, 5 → 1 of 2 → mean 0.5; pooled 2 of 4
    assert m["topk_hit_rate"] == pytest.approx(0.5)
    assert m["precision_at_k"] == pytest.approx(0.5)
    m1 = topk_metrics(y, cust, score, k=1)
    # a: row 0 hit; b: row 5 hit
    assert m1["topk_hit_rate"] == pytest.approx(1.0)


def test_topk_ties_are_deterministic():
    cust = pd.Series(["a"] * 5)
    score = np.zeros(5)
    assert top_k_per_customer(cust, score, 2).tolist() == [True, True, False, False, False]


def test_evaluate_reports_model_and_baseline_on_the_same_rows():
    rng = np.random.default_rng(1)
    n = 3000
    p = rng.uniform(0.01, 0.6, n)
    y = (rng.random(n) < p).astype(int)
    test = pd.DataFrame({"customer_id": [f"c{i // 5}" for i in range(n)], "label": y,
                         "popularity": rng.uniform(0, 1, n)})  # uninformative baseline
    m = evaluate(test, p)
    for name in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift_at_5", "lift_at_10", "topk_hit_rate",
                 "precision_at_k"):
        assert name in m and f"baseline_{name}" in m
    assert m["roc_auc"] > 0.65
    assert abs(m["baseline_roc_auc"] - 0.5) < 0.05
    assert m["topk_hit_rate"] > m["baseline_topk_hit_rate"]
    assert m["auc_gain_over_baseline"] == pytest.approx(m["roc_auc"] - m["baseline_roc_auc"])
    assert m["ece"] < 0.05


def test_baseline_outside_unit_interval_is_scaled_not_broken():
    test = pd.DataFrame({"customer_id": ["a", "a", "b", "b"], "label": [1, 0, 1, 0],
                         "popularity": [120.0, 3.0, 50.0, 10.0]})
    m = evaluate(test, np.array([0.7, 0.2, 0.6, 0.3]))
    assert m["baseline_roc_auc"] == pytest.approx(1.0)
    assert 0 <= m["baseline_brier"] <= 1


def test_figures_are_four_named_plots():
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(2)
    test = pd.DataFrame({"customer_id": [f"c{i}" for i in range(200)], "label": rng.integers(0, 2, 200),
                         "popularity": rng.uniform(0, 1, 200)})
    imp = pd.DataFrame({"feature": ["x", "y"], "gain": [5.0, 1.0]})
    figs = figures(test, rng.uniform(0, 1, 200), imp)
    assert set(figs) == {"plots/roc.png", "plots/gain_lift.png", "plots/calibration.png",
                         "plots/feature_importance.png"}
    for fig in figs.values():
        assert fig.axes
        plt.close(fig)


def test_drift_reference_bins_cover_all_values():
    rng = np.random.default_rng(3)
    v = rng.normal(size=10_000)
    v[:500] = np.nan
    ref = numeric_reference(v, bins=10)
    assert len(ref["edges"]) == 9 and len(ref["proportions"]) == 10
    assert sum(ref["proportions"]) == pytest.approx(1.0)
    assert np.allclose(ref["proportions"], 0.1, atol=0.01)  # quantile bins: equal shares on training data
    assert ref["missing"] == pytest.approx(0.05)
    shifted = bin_proportions(v + 1.0, ref["edges"])
    assert shifted[-1] > 0.3  # a shift shows up in the same bins
