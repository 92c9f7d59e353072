"""Price tiers and margins: derived from the catalogue, never asked of the user (DESIGN §2).

The contract has no price history, so tiers and margins use the catalogue's current list
price for every cutoff. That is the only input a feature reads without a time filter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TIER_NAMES = ("budget", "standard", "premium")
N_TIERS = len(TIER_NAMES)


def price_tiers(products: pd.DataFrame) -> pd.DataFrame:
    """product_id, category, tier (int 0=budget, 1=standard, 2=premium by price terciles within category).

    Tier = floor(3 × (number of cheaper products in the category) / category size), so equal prices
    share a tier (the lower one) and a category of one product is all budget.
    """
    out = products[["product_id", "category"]].reset_index(drop=True).copy()
    price = products["price"].astype("float64").reset_index(drop=True)
    by_cat = price.groupby(out["category"], sort=False)
    cheaper = by_cat.rank(method="min").to_numpy() - 1.0
    size = by_cat.transform("size").to_numpy()
    out["tier"] = np.minimum(np.floor(N_TIERS * cheaper / size), N_TIERS - 1).astype("int64")
    return out


def product_margins(products: pd.DataFrame, default_margin_rate: float) -> pd.Series:
    """Margin per unit (price − unit_cost), by product_id; the default rate × price where cost is unknown."""
    price = products["price"].astype("float64").to_numpy()
    cost = products["unit_cost"].astype("float64").to_numpy(na_value=np.nan)
    margin = np.where(np.isnan(cost), price * default_margin_rate, price - cost)
    return pd.Series(margin, index=pd.Index(products["product_id"], name="product_id"), name="margin")
