"""Out-of-time evaluation of a propensity model against the popularity baseline, plus the MLflow plots.

Global ranking metrics (AUC, lift) say little about what the CRM receives: a few offers per customer.
So the per-customer top-k hit rate is computed next to them, for the model and for the baseline on
exactly the same rows — a model can have a good AUC and still pick the same top offers as popularity.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display in Airflow workers or CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from ml.config import POLICY

ECE_BINS = 15
BASELINE_EPS = 1e-6


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Count-weighted mean |observed rate − mean prediction| over equal-width probability bins."""
    y = np.asarray(y, dtype="float64")
    p = np.asarray(p, dtype="float64")
    if len(y) == 0:
        return math.nan
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, weights=y, minlength=bins) - np.bincount(idx, weights=p, minlength=bins))
    return float(gap.sum() / n.sum())


def lift_at(y: np.ndarray, score: np.ndarray, share: float) -> float:
    """Conversion rate of the top ``share`` of rows by score over the overall rate (ties: row order)."""
    y = np.asarray(y, dtype="float64")
    base = y.mean() if len(y) else 0.0
    if base == 0:
        return math.nan
    n_top = max(1, math.ceil(share * len(y)))
    top = np.argsort(-np.asarray(score, dtype="float64"), kind="stable")[:n_top]
    return float(y[top].mean() / base)


def top_k_per_customer(customer_id: pd.Series, score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each customer's k best-scored rows (ties broken by row order, deterministically)."""
    df = pd.DataFrame({"c": np.asarray(customer_id), "s": np.asarray(score, dtype="float64"),
                       "pos": np.arange(len(score))})
    df = df.sort_values(["c", "s", "pos"], ascending=[True, False, True], kind="stable")
    rank = df.groupby("c", sort=False).cumcount().to_numpy()
    mask = np.zeros(len(score), dtype=bool)
    mask[df["pos"].to_numpy()[rank < k]] = True
    return mask


def topk_metrics(y: np.ndarray, customer_id: pd.Series, score: np.ndarray, k: int) -> dict[str, float]:
    """``topk_hit_rate``: per customer, share of their top-k that convert, averaged over customers (each
    customer weighs the same, as each receives one message); ``precision_at_k``: the same pooled over all
    top-k offers (each offer weighs the same)."""
    mask = top_k_per_customer(customer_id, score, k)
    if not mask.any():
        return {"topk_hit_rate": math.nan, "precision_at_k": math.nan}
    y = np.asarray(y, dtype="float64")
    per_customer = pd.Series(y[mask]).groupby(np.asarray(customer_id)[mask]).mean()
    return {"topk_hit_rate": float(per_customer.mean()), "precision_at_k": float(y[mask].mean())}


def score_metrics(y: np.ndarray, score: np.ndarray, customer_id: pd.Series,
                  k: int = POLICY.offers_per_customer) -> dict[str, float]:
    """All metrics of one score on one set of rows. Probability metrics assume ``score`` is in [0, 1]."""
    y = np.asarray(y, dtype="int64")
    score = np.asarray(score, dtype="float64")
    both = len(np.unique(y)) == 2
    p = np.clip(score, BASELINE_EPS, 1 - BASELINE_EPS)
    out = {
        "roc_auc": float(roc_auc_score(y, score)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, score)) if both else math.nan,
        "log_loss": float(log_loss(y, p, labels=[0, 1])) if len(y) else math.nan,
        "brier": float(brier_score_loss(y, p, pos_label=1)) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p),
        "lift_at_5": lift_at(y, score, 0.05),
        "lift_at_10": lift_at(y, score, 0.10),
        "positive_rate": float(y.mean()) if len(y) else math.nan,
        "n_rows": float(len(y)),
    }
    out.update(topk_metrics(y, customer_id, score, k))
    return out


def baseline_probability(popularity: pd.Series) -> np.ndarray:
    """The popularity score as given; if it is not a probability, rank-scale it to [0, 1].

    Ranking metrics only need the order; log loss/Brier/ECE of a non-probability score are reported on the
    min-max scaled score, so they mean "how badly calibrated the raw popularity is", nothing more.
    """
    s = pd.to_numeric(popularity, errors="coerce").astype("float64").fillna(0.0).to_numpy()
    if len(s) and (s.min() < 0 or s.max() > 1):
        span = s.max() - s.min()
        s = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    return s


def evaluate(test: pd.DataFrame, proba: np.ndarray, k: int = POLICY.offers_per_customer) -> dict[str, float]:
    """Model metrics and ``baseline_``-prefixed popularity metrics on the same out-of-time rows.

    ``test`` needs ``label``, ``customer_id`` and ``popularity``.
    """
    y = test["label"].astype("int64").to_numpy()
    metrics = score_metrics(y, proba, test["customer_id"], k)
    base = score_metrics(y, baseline_probability(test["popularity"]), test["customer_id"], k)
    metrics.update({f"baseline_{name}": value for name, value in base.items()
                    if name not in ("positive_rate", "n_rows")})
    metrics["auc_gain_over_baseline"] = metrics["roc_auc"] - metrics["baseline_roc_auc"]
    return metrics


# -- plots ---------------------------------------------------------------------------------------------
def _gain_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="stable")
    hits = np.cumsum(y[order])
    share = np.arange(1, len(y) + 1) / len(y)
    return np.r_[0.0, share], np.r_[0.0, hits / max(hits[-1], 1)]


def plot_roc(y: np.ndarray, scores: dict[str, np.ndarray]) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, s in scores.items():
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, out-of-time test")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_gain_lift(y: np.ndarray, scores: dict[str, np.ndarray]) -> Figure:
    fig, (ax_gain, ax_lift) = plt.subplots(1, 2, figsize=(10, 4.5))
    base = y.mean() if len(y) else 0
    for name, s in scores.items():
        share, gain = _gain_curve(y, s)
        ax_gain.plot(share, gain, label=name)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(share > 0, gain / share, np.nan) if base else np.full_like(share, np.nan)
        ax_lift.plot(share[1:], lift[1:], label=name)
    ax_gain.plot([0, 1], [0, 1], ls=":", c="grey", label="random")
    ax_gain.set(xlabel="share of candidates contacted", ylabel="share of conversions",
                title="Cumulative gain")
    ax_lift.axhline(1.0, ls=":", c="grey")
    ax_lift.set(xlabel="share of candidates contacted", ylabel="lift", title="Lift")
    ax_gain.legend(loc="lower right")
    ax_lift.legend(loc="upper right")
    fig.tight_layout()
    return fig


def plot_calibration(y: np.ndarray, scores: dict[str, np.ndarray], bins: int = 10) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect")
    for name, s in scores.items():
        if len(np.unique(y)) == 2:
            frac, mean_pred = calibration_curve(y, np.clip(s, 0, 1), n_bins=bins, strategy="quantile")
            ax.plot(mean_pred, frac, marker="o", label=name)
    ax.set(xlabel="mean predicted probability", ylabel="observed conversion rate",
           title="Reliability (quantile bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_importance(importance: pd.DataFrame, top: int = 25) -> Figure:
    """Gain importance, ``importance`` with columns feature, gain (OfferModel.feature_importance())."""
    imp = importance.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.3 * len(imp) + 1)))
    ax.barh(imp["feature"], imp["gain"])
    ax.set(xlabel="total gain", title="Feature importance (gain)")
    fig.tight_layout()
    return fig


def figures(test: pd.DataFrame, proba: np.ndarray, importance: pd.DataFrame) -> dict[str, Figure]:
    """The four evaluation plots, keyed by their artifact path. Close them after logging."""
    y = test["label"].astype("int64").to_numpy()
    scores = {"model": np.asarray(proba, dtype="float64"),
              "popularity baseline": baseline_probability(test["popularity"])}
    return {
        "plots/roc.png": plot_roc(y, scores),
        "plots/gain_lift.png": plot_gain_lift(y, scores),
        "plots/calibration.png": plot_calibration(y, scores),
        "plots/feature_importance.png": plot_importance(importance),
    }
