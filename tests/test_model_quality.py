"""Acceptance: on a simulated shop of 20k customers every model beats popularity out of time, and
cross-sell comes within ``ORACLE_MARGIN`` ROC AUC of the oracle (the simulator's exact P(buy) given
its hidden state, scored on exactly the same out-of-time rows).

One module-scoped fixture simulates, builds the three training sets once and fits the three models
(single-threaded LightGBM); the printed table is the one in the README.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ml.config import MODEL
from ml.contract import OFFER_TYPES, Shop, coerce_table
from ml.dataset import build_training_sets, cutoffs_for
from ml.evaluate import evaluate
from ml.simulate import simulate_shop
from ml.train import fit

pytestmark = pytest.mark.slow

CUSTOMERS, DAYS, SEED = 20_000, 365, 11
START = dt.date(2025, 1, 1)
AS_OF = START + dt.timedelta(days=DAYS)
ORACLE_MARGIN = 0.05
CFG = dataclasses.replace(MODEL, num_threads=1)


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    tables, truth = simulate_shop(CUSTOMERS, DAYS, seed=SEED, start=START, horizon_days=CFG.horizon_days)
    shop = Shop({name: coerce_table(name, df) for name, df in tables.items()})
    frames = build_training_sets(shop, AS_OF, OFFER_TYPES, CFG)
    test_cutoff = cutoffs_for(AS_OF, CFG)[-1]
    assert pd.Timestamp(truth["cutoff"].iloc[0]).date() == test_cutoff  # the oracle's window is the test's
    truth = pd.DataFrame({"customer_id": truth["customer_id"].astype("string"),
                          "category": truth["category"].astype("string"),
                          "p_buy": truth["p_buy"].to_numpy(), "p_up": truth["p_up"].to_numpy(),
                          "p_down": truth["p_down"].to_numpy()})
    oracle_column = {"cross_sell": "p_buy", "upsell": "p_up", "downsell": "p_down"}
    out: dict[str, dict[str, float]] = {}
    for offer_type in OFFER_TYPES:
        frame = frames.pop(offer_type)
        result = fit(frame, offer_type, CFG)
        test = frame[frame["cutoff"] == test_cutoff].reset_index(drop=True)
        del frame
        metrics = evaluate(test, result.model.predict_proba(test))
        rows = test[["customer_id", "category", "label"]].merge(truth, on=["customer_id", "category"],
                                                                 how="left", validate="one_to_one")
        p = rows[oracle_column[offer_type]].to_numpy("float64")
        assert not np.isnan(rows["p_buy"].to_numpy()).any(), "a test row without ground truth"
        ok = ~np.isnan(p)
        metrics["oracle_roc_auc"] = float(roc_auc_score(rows["label"][ok], p[ok]))
        out[offer_type] = metrics
    print(f"\n{CUSTOMERS:,} customers × {DAYS} days (seed {SEED}), out-of-time test cutoff {test_cutoff}, "
          f"took {time.perf_counter() - t0:.0f} s")
    print("| offer type | ROC AUC | PR AUC | lift@10% | baseline ROC AUC | oracle ROC AUC |")
    print("|---|---|---|---|---|---|")
    for offer_type, m in out.items():
        print(f"| {offer_type} | {m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {m['lift_at_10']:.2f} | "
              f"{m['baseline_roc_auc']:.3f} | {m['oracle_roc_auc']:.3f} |")
    return out


@pytest.mark.parametrize("offer_type", OFFER_TYPES)
def test_each_model_beats_its_popularity_baseline(results, offer_type):
    m = results[offer_type]
    assert m["roc_auc"] > m["baseline_roc_auc"], m


def test_cross_sell_is_close_to_the_oracle(results):
    m = results["cross_sell"]
    assert m["roc_auc"] >= m["oracle_roc_auc"] - ORACLE_MARGIN, m
