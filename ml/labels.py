"""Labels: what happened in the window [T, T + H) after a cutoff (DESIGN §3).

The only module that reads rows at or after T. Every candidate gets a label: a customer with no
purchase in the window is a negative, never dropped.

- cross_sell: 1 when the customer buys anything in the candidate category in the window.
- upsell: 1 when they buy a product of a higher tier than their usual tier (as of T) there.
- downsell: 1 when they buy a lower-tier product than their usual tier there AND stay active,
  i.e. also place an order in the second half of the window, [T + H/2, T + H). A cheaper
  purchase followed by silence is a customer leaving, not a downsell that kept them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from ml.features import ShopIndex, cutoff_ts


@dataclass
class Outcomes:
    """Per (customer, category) bought in the window: lowest and highest tier; per customer: late activity."""

    keys: np.ndarray  # sorted cust × n_categories + cat
    min_tier: np.ndarray
    max_tier: np.ndarray
    active_late: np.ndarray  # bool per customer code


def window_outcomes(index: ShopIndex, cutoff: dt.date, horizon_days: int) -> Outcomes:
    t = cutoff_ts(cutoff)
    end = t + dt.timedelta(days=horizon_days)
    late = t + dt.timedelta(days=horizon_days / 2)
    cc = index.query("""
        SELECT cust, cat, min(tier) AS min_tier, max(tier) AS max_tier FROM lines
        WHERE ts >= $T AND ts < $E GROUP BY cust, cat""", {"T": t, "E": end})
    late_cust = index.query("SELECT DISTINCT cust FROM orders WHERE ts >= $L AND ts < $E",
                            {"L": late, "E": end})
    keys = cc["cust"].to_numpy(np.int64) * index.n_categories + cc["cat"].to_numpy(np.int64)
    order = np.argsort(keys, kind="stable")
    active = np.zeros(index.n_customers, dtype=bool)
    active[late_cust["cust"].to_numpy(np.int64)] = True
    return Outcomes(keys[order], cc["min_tier"].to_numpy(np.int64)[order],
                    cc["max_tier"].to_numpy(np.int64)[order], active)


def assign_labels(outcomes: Outcomes, n_categories: int, offer_type: str, cust: np.ndarray,
                  cat: np.ndarray, usual_tier: np.ndarray) -> np.ndarray:
    """0/1 per candidate; ``usual_tier`` is the customer's usual tier in the category as of T."""
    key = cust.astype(np.int64) * n_categories + cat
    pos = np.searchsorted(outcomes.keys, key)
    pos_c = np.minimum(pos, max(len(outcomes.keys) - 1, 0))
    bought = (outcomes.keys[pos_c] == key) if len(outcomes.keys) else np.zeros(len(key), bool)
    lo = np.where(bought, outcomes.min_tier[pos_c] if len(outcomes.keys) else 0, np.iinfo(np.int64).max)
    hi = np.where(bought, outcomes.max_tier[pos_c] if len(outcomes.keys) else 0, -1)
    if offer_type == "cross_sell":
        y = bought
    elif offer_type == "upsell":
        y = bought & (hi > usual_tier)
    elif offer_type == "downsell":
        y = bought & (lo < usual_tier) & outcomes.active_late[cust]
    else:
        raise ValueError(f"unknown offer type {offer_type!r}")
    return np.asarray(y, dtype=np.int64)
