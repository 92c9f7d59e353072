"""Point-in-time customer and customer × category features (DESIGN §3).

Two objects keep the heavy work shared:

- ``ShopIndex``: the FULL shop joined once (order lines × orders × products) into an in-process
  DuckDB database with integer codes. It holds future rows too (labels need them), so nothing
  reads it without a time filter.
- ``FeatureContext``: every aggregate as of one cutoff T, built from rows with ``ts < T`` only
  (each SQL statement filters on T itself). Scoring builds it once and reuses it for the three
  offer types; ``build_training_set`` builds one per cutoff on one ``ShopIndex``.

DuckDB does the grouped aggregations over the order lines (tens of millions of rows on 2 cores);
numpy does the dense customer × category algebra (ownership, spend profile, lift, collaborative
similarity) in float32.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from ml.config import MODEL, ModelConfig
from ml.contract import CHANNELS_ORDER, Shop
from ml.tiers import N_TIERS, price_tiers, product_margins

# One line per feature: used by the README and the reason-code renderer.
FEATURE_DOCS: dict[str, str] = {
    # customer: recency, frequency, monetary
    "days_since_last_order": "days since the customer's last order",
    "orders_90d": "orders in the last 90 days",
    "orders_365d": "orders in the last 365 days",
    "spend_90d": "spend in the last 90 days",
    "spend_365d": "spend in the last 365 days",
    "avg_order_value": "average spend per order, all history",
    "tenure_days": "days since signup",
    "days_since_first_order": "days since the customer's first order in the data (how much history is known)",
    "n_categories": "number of categories ever bought",
    "order_gap_median": "median days between order days",
    "order_cycle_ratio": "days since last order / median days between order days",
    "trend_4w": "orders last 4 weeks vs the 4 before: (a - b) / (a + b)",
    "trend_90d": "orders last 90 days vs the 90 before: (a - b) / (a + b)",
    # tier habits and price sensitivity
    "overall_tier": "most common price tier over all order lines (0 budget, 1 standard, 2 premium)",
    "share_budget": "share of order lines in the budget tier",
    "share_premium": "share of order lines in the premium tier",
    "share_above_usual": "share of order lines above the usual tier of their category",
    "share_below_usual": "share of order lines below the usual tier of their category",
    "share_below_list": "share of order lines paid below list price",
    "price_vs_cat_median": "price paid / the category's median price paid, averaged over order lines",
    # channel mix
    "share_web": "share of orders on the web",
    "share_app": "share of orders in the app",
    "share_store": "share of orders in a store",
    "share_phone": "share of orders by phone",
    # offer history
    "offers_90d": "offers received in the last 90 days",
    "offer_responses": "offers followed by a purchase in their category within the horizon",
    "offer_response_rate": "share of received offers followed by a purchase in their category",
    "days_since_last_offer": "days since the last offer received",
    # segment parts
    "value_band": "spend band over the last 365 days (low, mid, high terciles)",
    "activity_band": "active (ordered in 30 days), cooling (30-90 days) or lapsed (over 90 days)",
    "age_band": "age band (only when the config allows it)",
    # the candidate category
    "category": "the candidate category",
    "usual_tier": "most common price tier of the customer's lines in this category (ties: lower)",
    "cat_orders_90d": "orders with this category in the last 90 days",
    "cat_orders_365d": "orders with this category in the last 365 days",
    "cat_spend_365d": "spend in this category in the last 365 days",
    "cat_share_spend": "share of all-time spend in this category",
    "cat_days_since_last": "days since the last purchase in this category",
    "cat_gap_median": "median days between purchase days in this category",
    "cat_cycle_ratio": "days since last purchase in this category / usual gap there",
    "cat_share_above_usual": "share of lines in this category above the usual tier there",
    "cat_share_below_usual": "share of lines in this category below the usual tier there",
    "cat_offers_90d": "offers for this category received in the last 90 days",
    "cat_offers_28d": "offers for this category received in the last 28 days",
    "cat_days_since_offer": "days since the last offer for this category (missing: none in 90 days)",
    "cat_buyers_share_90d": "share of the shop's active customers who bought this category in 90 days",
    "lift_max": "highest co-purchase lift between this category and the categories owned",
    "lift_mean": "mean co-purchase lift between this category and the categories owned",
    "collab_sim": "similarity of the customer's category profile to this category's buyers",
    "related_owned": "number of owned categories strongly co-bought with this one (lift >= RELATED_LIFT)",
    "log_lift_sum": "sum of log co-purchase lift between this category and each category owned",
    "related_spend_share": "share of all-time spend in categories strongly co-bought with this one",
    "related_orders_365d": "purchases in the last 365 days in categories strongly co-bought with this one",
    "related_order_rate": "purchases in strongly co-bought categories per order in the last 365 days",
    # the offered product
    "offer_tier": "price tier of the offered product",
    "offer_tier_step": "offered tier minus the usual tier (overall tier for cross-sell)",
    "offer_price_rel": "list price of the offered product / the category's median price paid",
}

CUSTOMER_FEATURES = (
    "days_since_last_order", "orders_90d", "orders_365d", "spend_90d", "spend_365d", "avg_order_value",
    "tenure_days", "days_since_first_order", "n_categories", "order_gap_median", "order_cycle_ratio",
    "trend_4w", "trend_90d",
    "overall_tier", "share_budget", "share_premium", "share_above_usual", "share_below_usual",
    "share_below_list", "price_vs_cat_median",
    "share_web", "share_app", "share_store", "share_phone",
    "offers_90d", "offer_responses", "offer_response_rate", "days_since_last_offer",
)
# Customer × category history: all missing for a never-bought (cross-sell) category.
HISTORY_FEATURES = (
    "usual_tier", "cat_orders_90d", "cat_orders_365d", "cat_spend_365d", "cat_share_spend",
    "cat_days_since_last", "cat_gap_median", "cat_cycle_ratio", "cat_share_above_usual",
    "cat_share_below_usual",
)
CANDIDATE_FEATURES = (
    "cat_offers_90d", "cat_offers_28d", "cat_days_since_offer", "cat_buyers_share_90d",
    "lift_max", "lift_mean", "collab_sim",
    "related_owned", "log_lift_sum", "related_spend_share", "related_orders_365d", "related_order_rate",
    "offer_tier", "offer_tier_step", "offer_price_rel",
)
SEGMENT_FEATURES = ("value_band", "activity_band")

ACTIVE_DAYS, LAPSED_DAYS = 30, 90
# Two categories are "strongly related" when owning one makes owning the other this many times likelier.
RELATED_LIFT = 1.5
AGE_BANDS = ((25, "<25"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (65, "55-64"), (200, "65+"))
_CHANNEL_SQL = " ".join(f"WHEN '{c}' THEN {i}" for i, c in enumerate(CHANNELS_ORDER))
_CHUNK = 262_144
_TIER_COUNTS = ", ".join(f"count(*) FILTER (WHERE tier = {i}) AS t{i}" for i in range(N_TIERS))


def customer_fraction(customer_ids: pd.Series | pd.Index, salt: str) -> np.ndarray:
    """A number in [0, 1) per customer id, the same on every machine and run for the same salt.

    Samples are "fraction < share": nested (a smaller share keeps a subset of a larger one), whole
    customers (all their rows or none) and independent of row order and shop size.
    """
    key = hashlib.blake2b(salt.encode(), digest_size=8).hexdigest()  # pandas wants a 16-character key
    h = pd.util.hash_pandas_object(pd.Series(customer_ids, dtype="string"), index=False, hash_key=key)
    return (h.to_numpy() >> np.uint64(11)).astype("float64") / float(1 << 53)


def _arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _close_duckdb(con: duckdb.DuckDBPyConnection, folder: str) -> None:
    con.close()
    shutil.rmtree(folder, ignore_errors=True)


def cutoff_ts(d: dt.date | dt.datetime | pd.Timestamp) -> dt.datetime:
    """A cutoff as a naive UTC midnight datetime (DuckDB binds it as TIMESTAMP)."""
    return pd.Timestamp(d).tz_localize(None).normalize().to_pydatetime() if pd.Timestamp(d).tzinfo \
        else pd.Timestamp(d).normalize().to_pydatetime()


class ShopIndex:
    """The full shop in DuckDB with integer codes: joined once, then queried per cutoff.

    Customers are coded by their row in ``customers``, categories in sorted order, products by
    their row in ``products``. Orders of unknown customers and lines of unknown orders or products
    are dropped (the quality gate rejects them before this runs).

    ``customer_share`` < 1 keeps only the customers whose ``customer_fraction`` (config salt) is
    below it, with their orders, lines and offers: a training sample then costs what its size costs,
    not what the shop costs. Shop-level statistics (lift, bands, category shares, best products) are
    then estimated on the sample; ``population`` keeps the shop's customer count.
    """

    def __init__(self, shop: Shop, cfg: ModelConfig = MODEL, customer_share: float = 1.0):
        self.cfg = cfg
        self.customer_share = min(float(customer_share), 1.0)
        self.population = len(shop.customers)
        customers = shop.customers.reset_index(drop=True)
        self._fraction: np.ndarray | None = None
        if self.customer_share < 1.0:
            fraction = customer_fraction(customers["customer_id"], cfg.sample_salt)
            keep = fraction < self.customer_share
            customers = customers[keep].reset_index(drop=True)
            self._fraction = fraction[keep]
        self.customer_ids = customers["customer_id"].astype("string").reset_index(drop=True)
        self.signup = customers["signup_date"].to_numpy(dtype="datetime64[us]")
        self.birth_year = customers["birth_year"].astype("float64").to_numpy(na_value=np.nan)
        products = shop.products.reset_index(drop=True)
        tiers = price_tiers(products)
        self.categories = np.array(sorted(products["category"].astype(str).unique()), dtype=object)
        cat_code = pd.Index(self.categories).get_indexer(products["category"].astype(str))
        self.products = pd.DataFrame({
            "product_id": products["product_id"].astype("string"),
            "pcode": np.arange(len(products), dtype=np.int32),
            "cat": cat_code.astype(np.int32),
            "tier": tiers["tier"].to_numpy(np.int8),
            "price": products["price"].astype("float64").to_numpy(),
            "active": products["active"].fillna(False).astype(bool).to_numpy(),
            "margin": product_margins(products, cfg.default_margin_rate).to_numpy(),
        })
        # Highest tier that exists in each category: upsell needs somewhere to go.
        self.top_tier = np.zeros(len(self.categories), dtype=np.int8)
        np.maximum.at(self.top_tier, self.products["cat"].to_numpy(), self.products["tier"].to_numpy())

        # A bounded DuckDB: beyond cfg.duckdb_memory_limit its tables and sorts spill to a private
        # temporary folder (at 1M customers the joined shop is ~8 GB; without a limit the join and its
        # sorts peaked at 16 GB besides the pandas shop). Small shops never reach the limit.
        self._tmp = tempfile.mkdtemp(prefix="offerflow-duckdb-")
        # Results are never read in insertion order (every consumer keys or sorts them), which lets
        # DuckDB aggregate and sort larger-than-memory tables.
        con = duckdb.connect(config={"memory_limit": cfg.duckdb_memory_limit, "temp_directory": self._tmp,
                                     "preserve_insertion_order": False})
        self._finalizer = weakref.finalize(self, _close_duckdb, con, self._tmp)
        self.con = con
        # Registered as Arrow tables: DuckDB scans Arrow text without going through pandas' objects.
        con.register("cust_dim", _arrow(pd.DataFrame({"customer_id": self.customer_ids,
                                                      "cust": np.arange(len(customers), dtype=np.int32)})))
        con.register("prod_dim", _arrow(self.products[["product_id", "pcode", "cat", "tier", "price"]]))
        con.register("orders_raw", _arrow(shop.orders[["order_id", "customer_id", "order_ts", "channel"]]))
        lines = shop.order_lines[["order_id", "product_id", "quantity", "unit_price"]]
        con.register("lines_raw", _arrow(lines))
        offers = shop.offer_history
        con.register("offers_raw", _arrow(offers[["customer_id", "product_id", "sent_at"]]))
        con.execute(f"""
            CREATE TABLE orders AS
            SELECT o.order_id, CAST(row_number() OVER () AS INTEGER) AS ocode, c.cust,
                   CAST(o.order_ts AS TIMESTAMP) AS ts,
                   CAST(CASE o.channel {_CHANNEL_SQL} ELSE NULL END AS TINYINT) AS ch
            FROM orders_raw o JOIN cust_dim c USING (customer_id)""")  # noqa: S608 - constants only
        con.execute("""
            CREATE TABLE lines AS
            SELECT o.cust, o.ocode, o.ts, p.cat, p.tier, p.pcode,
                   CAST(l.quantity AS INTEGER) AS qty, CAST(l.unit_price AS DOUBLE) AS unit_price,
                   p.price AS list_price, l.quantity * l.unit_price AS amount
            FROM lines_raw l JOIN orders o USING (order_id) JOIN prod_dim p USING (product_id)""")
        con.execute("ALTER TABLE orders DROP COLUMN order_id")
        # Order-level rows per category, and purchase days with the gap to the previous purchase day.
        # A gap only looks backwards, so "day < T" keeps both ends of it before T. A basket's ts is its
        # order's ts (every line of an order has it), so its days are the lines' days, from fewer rows.
        con.execute(f"""
            CREATE TABLE baskets AS
            SELECT cust, cat, ocode, min(ts) AS ts, count(*) AS n_lines, sum(amount) AS spend,
                   sum(unit_price) AS price_sum, {_TIER_COUNTS},
                   count(*) FILTER (WHERE unit_price < list_price) AS below_list
            FROM lines GROUP BY cust, cat, ocode""")  # noqa: S608 - constants only
        con.execute("""
            CREATE TABLE cat_days AS
            WITH d AS (SELECT DISTINCT cust, cat, CAST(ts AS DATE) AS day FROM baskets)
            SELECT cust, cat, day, day - lag(day) OVER (PARTITION BY cust, cat ORDER BY day) AS gap FROM d""")
        con.execute("""
            CREATE TABLE order_days AS
            WITH d AS (SELECT DISTINCT cust, CAST(ts AS DATE) AS day FROM orders)
            SELECT cust, day, day - lag(day) OVER (PARTITION BY cust ORDER BY day) AS gap FROM d""")
        con.execute("""
            CREATE TABLE offers AS
            SELECT CAST(row_number() OVER () AS INTEGER) AS oid, c.cust, p.cat,
                   CAST(h.sent_at AS TIMESTAMP) AS ts
            FROM offers_raw h JOIN cust_dim c USING (customer_id) LEFT JOIN prod_dim p USING (product_id)""")
        for name in ("cust_dim", "prod_dim", "orders_raw", "lines_raw", "offers_raw"):
            con.unregister(name)

    def close(self) -> None:
        """Drop the joined shop (DuckDB) once every FeatureContext needed is built: scoring then keeps
        only the codes, the products and the contexts (4 GB less at 1M customers). Labels and new
        contexts need it; querying a closed index raises."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def customer_fraction(self) -> np.ndarray:
        """``customer_fraction`` per customer code (config salt): the same customers at every cutoff."""
        if self._fraction is None:
            self._fraction = customer_fraction(self.customer_ids, self.cfg.sample_salt)
        return self._fraction

    @property
    def n_customers(self) -> int:
        return len(self.customer_ids)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    def query(self, sql: str, params: dict) -> pd.DataFrame:
        """Run SQL with the named parameters it uses (values are always bound, never formatted in)."""
        if self.closed:
            raise RuntimeError("this ShopIndex was closed (its DuckDB is gone): build a new one")
        used = set(re.findall(r"\$(\w+)", sql))
        return self.con.execute(sql, {k: v for k, v in params.items() if k in used}).df()


def _days(since: str) -> str:
    return f"date_diff('second', {since}, $T) / 86400.0"


@dataclass
class FeatureContext:
    """Everything known as of one cutoff T, shared by the three offer types.

    ``cust`` is indexed by customer code (every customer, history or not); ``cc`` has one row per
    (customer, category) bought before T, sorted by ``key`` = cust × n_categories + cat.
    """

    index: ShopIndex
    cutoff: dt.date
    cust: pd.DataFrame
    cc: pd.DataFrame
    owned: np.ndarray  # bool, customers × categories
    profile: np.ndarray  # float32 spend shares, customers × categories
    cat_orders: np.ndarray  # float32 orders per category in the 365 days before T, customers × categories
    lift: np.ndarray  # float32 categories × categories, NaN where a category has no buyer
    buyer_profile: np.ndarray  # float32 mean profile of each category's buyers
    cat_stats: pd.DataFrame  # per category: buyers_share_90d, median_price
    tier_share: np.ndarray  # categories × tiers: share of the category's 90-day buyers buying that tier
    best_product: np.ndarray  # categories × tiers: pcode of the best-selling active product, -1 if none
    cat_offers: pd.DataFrame  # cust, cat, cat_offers_90d, cat_offers_28d, cat_days_since_offer

    @classmethod
    def build(cls, shop_or_index: Shop | ShopIndex, cutoff: dt.date, cfg: ModelConfig = MODEL
              ) -> FeatureContext:
        index = shop_or_index if isinstance(shop_or_index, ShopIndex) else ShopIndex(shop_or_index, cfg)
        return _build_context(index, cutoff, cfg)

    @property
    def has_history(self) -> np.ndarray:
        return self.cust["n_lines"].to_numpy() > 0


def _params(cutoff: dt.date, horizon_days: int) -> dict:
    t = cutoff_ts(cutoff)
    d = dt.timedelta
    return {"T": t, "t28": t - d(28), "t56": t - d(56), "t90": t - d(90), "t180": t - d(180),
            "t365": t - d(365), "H": horizon_days}


def _safe_div(a, b) -> np.ndarray:
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _usual(counts: np.ndarray) -> np.ndarray:
    """Most common tier per row of tier counts; argmax takes the first maximum, i.e. ties → lower tier."""
    return counts.argmax(axis=1).astype(np.int8)


def _build_context(index: ShopIndex, cutoff: dt.date, cfg: ModelConfig) -> FeatureContext:
    p = _params(cutoff, cfg.horizon_days)
    n, k = index.n_customers, index.n_categories
    tier_sums = ", ".join(f"sum(t{i}) AS t{i}" for i in range(N_TIERS))
    channel_cols = ", ".join(f"count(*) FILTER (WHERE ch = {i}) AS ch_{c}"
                             for i, c in enumerate(CHANNELS_ORDER))
    orders = index.query(f"""
        SELECT cust, count(*) AS n_orders,
               count(*) FILTER (WHERE ts >= $t90) AS orders_90d,
               count(*) FILTER (WHERE ts >= $t180 AND ts < $t90) AS orders_prev_90d,
               count(*) FILTER (WHERE ts >= $t365) AS orders_365d,
               count(*) FILTER (WHERE ts >= $t28) AS orders_4w,
               count(*) FILTER (WHERE ts >= $t56 AND ts < $t28) AS orders_prev_4w,
               {_days("max(ts)")} AS days_since_last_order,
               {_days("min(ts)")} AS days_since_first_order,
               {channel_cols}
        FROM orders WHERE ts < $T GROUP BY cust""", p)  # noqa: S608 - constants; values bound
    gaps = index.query("""
        SELECT cust, median(gap) AS order_gap_median FROM order_days
        WHERE day < CAST($T AS DATE) AND gap IS NOT NULL GROUP BY cust""", p)
    cc = index.query(f"""
        SELECT cust, cat, sum(n_lines) AS n_lines,
               count(*) FILTER (WHERE ts >= $t90) AS orders_90d,
               count(*) FILTER (WHERE ts >= $t365) AS orders_365d,
               sum(spend) AS spend,
               coalesce(sum(spend) FILTER (WHERE ts >= $t365), 0) AS spend_365d,
               coalesce(sum(spend) FILTER (WHERE ts >= $t90), 0) AS spend_90d,
               {_days("max(ts)")} AS days_since_last, {tier_sums},
               sum(below_list) AS below_list, sum(price_sum) AS price_sum
        FROM baskets WHERE ts < $T GROUP BY cust, cat""", p)  # noqa: S608 - constants; values bound
    cat_gaps = index.query("""
        SELECT cust, cat, median(gap) AS gap_median FROM cat_days
        WHERE day < CAST($T AS DATE) AND gap IS NOT NULL GROUP BY cust, cat""", p)
    cat_price = index.query("""SELECT cat, median(unit_price) AS median_price FROM lines WHERE ts < $T
                               GROUP BY cat""", {"T": p["T"]})
    units = index.query("""SELECT pcode, sum(qty) AS units FROM lines WHERE ts >= $t365 AND ts < $T
                           GROUP BY pcode""", {"T": p["T"], "t365": p["t365"]})
    buyers = index.query("""
        SELECT cat, tier, count(DISTINCT cust) AS buyers FROM lines WHERE ts >= $t90 AND ts < $T
        GROUP BY GROUPING SETS ((cat, tier), (cat))""", {"T": p["T"], "t90": p["t90"]})
    active_90d = index.query("SELECT count(DISTINCT cust) AS n FROM orders WHERE ts >= $t90 AND ts < $T",
                             {"T": p["T"], "t90": p["t90"]})["n"].iloc[0]
    offers = index.query(f"""
        WITH oh AS (SELECT oid, cust, cat, ts FROM offers WHERE ts < $T),
             resp AS (SELECT DISTINCT oh.oid FROM oh JOIN lines l ON l.cust = oh.cust AND l.cat = oh.cat
                      WHERE l.ts >= oh.ts AND l.ts < least(oh.ts + to_days(CAST($H AS INTEGER)), $T))
        SELECT oh.cust, count(*) AS n_offers, count(*) FILTER (WHERE oh.ts >= $t90) AS offers_90d,
               count(resp.oid) AS offer_responses, {_days("max(oh.ts)")} AS days_since_last_offer
        FROM oh LEFT JOIN resp USING (oid) GROUP BY oh.cust""", p)  # noqa: S608 - constants; values bound
    cat_offers = index.query(f"""
        SELECT cust, cat, count(*) AS cat_offers_90d, count(*) FILTER (WHERE ts >= $t28) AS cat_offers_28d,
               {_days("max(ts)")} AS cat_days_since_offer FROM offers
        WHERE ts >= $t90 AND ts < $T AND cat IS NOT NULL GROUP BY cust, cat""",  # noqa: S608 - constants
                             {"T": p["T"], "t90": p["t90"], "t28": p["t28"]})

    # ---- customer × category rows
    cc = cc.merge(cat_gaps, on=["cust", "cat"], how="left")
    cc["key"] = cc["cust"].to_numpy(np.int64) * k + cc["cat"].to_numpy(np.int64)
    cc = cc.sort_values("key", kind="stable").reset_index(drop=True)
    counts = cc[[f"t{i}" for i in range(N_TIERS)]].to_numpy(np.int64)
    usual = _usual(counts)
    cc["usual_tier"] = usual
    cum = np.cumsum(counts, axis=1)
    below = np.where(usual > 0, cum[np.arange(len(cc)), np.maximum(usual - 1, 0)], 0)
    above = cum[:, -1] - cum[np.arange(len(cc)), usual]
    cc["above"], cc["below"] = above, below

    ci = cc["cust"].to_numpy(np.int64)
    cat_i = cc["cat"].to_numpy(np.int64)

    def per_cust(values) -> np.ndarray:
        return np.bincount(ci, weights=np.asarray(values, dtype="float64"), minlength=n)

    cust = pd.DataFrame(index=pd.RangeIndex(n))
    cust["n_lines"] = per_cust(cc["n_lines"])
    cust["n_categories"] = np.bincount(ci, minlength=n).astype("float64")
    spend = per_cust(cc["spend"])
    tier_tot = np.stack([per_cust(counts[:, i]) for i in range(N_TIERS)], axis=1)
    cust["overall_tier"] = np.where(cust["n_lines"] > 0, _usual(tier_tot), -1)
    cust["share_budget"] = _safe_div(tier_tot[:, 0], cust["n_lines"])
    cust["share_premium"] = _safe_div(tier_tot[:, -1], cust["n_lines"])
    cust["share_above_usual"] = _safe_div(per_cust(above), cust["n_lines"])
    cust["share_below_usual"] = _safe_div(per_cust(below), cust["n_lines"])
    cust["share_below_list"] = _safe_div(per_cust(cc["below_list"]), cust["n_lines"])
    # Σ unit_price / median(cat) over a category's lines = price_sum / median(cat).
    med = cat_price.set_index("cat")["median_price"].reindex(range(k)).to_numpy("float64")
    med_c = med[cat_i]
    ok_med = med_c > 0
    rel_sum = np.where(ok_med, cc["price_sum"].to_numpy("float64") / np.where(ok_med, med_c, 1.0), 0.0)
    rel_n = np.where(ok_med, cc["n_lines"].to_numpy("float64"), 0.0)
    cust["price_vs_cat_median"] = _safe_div(per_cust(rel_sum), per_cust(rel_n))
    cust["spend_90d"] = per_cust(cc["spend_90d"])
    cust["spend_365d"] = per_cust(cc["spend_365d"])

    o = orders.set_index("cust").reindex(cust.index)
    n_orders = o["n_orders"].fillna(0).to_numpy("float64")
    cust["n_orders"] = n_orders
    for col in ("orders_90d", "orders_365d"):
        cust[col] = o[col].fillna(0).to_numpy("float64")
    cust["days_since_last_order"] = o["days_since_last_order"].to_numpy("float64", na_value=np.nan)
    cust["days_since_first_order"] = o["days_since_first_order"].to_numpy("float64", na_value=np.nan)
    cust["avg_order_value"] = _safe_div(spend, n_orders)
    signup = index.signup
    tenure = (np.datetime64(cutoff_ts(cutoff), "us") - signup) / np.timedelta64(1, "D")
    cust["tenure_days"] = np.where(np.isnat(signup), np.nan, tenure)
    cust["order_gap_median"] = gaps.set_index("cust")["order_gap_median"].reindex(cust.index).to_numpy(
        "float64", na_value=np.nan)
    cust["order_cycle_ratio"] = _safe_div(cust["days_since_last_order"], cust["order_gap_median"])
    a, b = o["orders_4w"].fillna(0).to_numpy("float64"), o["orders_prev_4w"].fillna(0).to_numpy("float64")
    cust["trend_4w"] = _safe_div(a - b, a + b)
    a, b = cust["orders_90d"].to_numpy("float64"), o["orders_prev_90d"].fillna(0).to_numpy("float64")
    cust["trend_90d"] = _safe_div(a - b, a + b)
    for c in CHANNELS_ORDER:
        cust[f"share_{c}"] = _safe_div(o[f"ch_{c}"].fillna(0), n_orders)
    off = offers.set_index("cust").reindex(cust.index)
    cust["offers_90d"] = off["offers_90d"].fillna(0).to_numpy("float64")
    cust["offer_responses"] = off["offer_responses"].fillna(0).to_numpy("float64")
    cust["offer_response_rate"] = _safe_div(cust["offer_responses"], off["n_offers"].fillna(0))
    cust["days_since_last_offer"] = off["days_since_last_offer"].to_numpy("float64", na_value=np.nan)

    # At risk (DESIGN §3): activity halved quarter on quarter, or silent for over twice the usual gap.
    prev = o["orders_prev_90d"].fillna(0).to_numpy("float64")
    falling = cust["orders_90d"].to_numpy() < 0.5 * prev
    overdue = cust["days_since_last_order"].to_numpy() > 2.0 * cust["order_gap_median"].to_numpy()
    cust["at_risk"] = (falling | overdue) & (cust["n_lines"].to_numpy() > 0)

    # ---- dense customer × category matrices
    owned = np.zeros((n, k), dtype=bool)
    owned[ci, cat_i] = True
    profile = np.zeros((n, k), dtype=np.float32)
    profile[ci, cat_i] = _safe_div(cc["spend"].to_numpy(), spend[ci])
    profile = np.nan_to_num(profile, copy=False)
    cc["cat_share_spend"] = profile[ci, cat_i]
    cat_orders = np.zeros((n, k), dtype=np.float32)
    cat_orders[ci, cat_i] = cc["orders_365d"].to_numpy("float64")

    has_hist = cust["n_lines"].to_numpy() > 0
    n_hist = float(has_hist.sum())
    n_buyers = owned.sum(axis=0).astype("float64")
    ownf = owned.astype(np.float32)
    co = (ownf.T @ ownf).astype("float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = co * n_hist / np.outer(n_buyers, n_buyers)
    lift[~np.isfinite(lift)] = np.nan
    buyer_profile = _safe_div(ownf.T @ profile, n_buyers[:, None]).astype(np.float32)

    # ---- segment: value band, activity band, dominant category
    value = np.full(n, "low", dtype=object)
    s365 = cust["spend_365d"].to_numpy()
    if has_hist.any():
        q1, q2 = np.quantile(s365[has_hist], [1 / 3, 2 / 3])
        value[s365 > q1] = "mid"
        value[s365 > q2] = "high"
    dsl = cust["days_since_last_order"].to_numpy()
    activity = np.where(dsl <= ACTIVE_DAYS, "active", np.where(dsl <= LAPSED_DAYS, "cooling", "lapsed"))
    dominant = index.categories[np.argmax(profile + owned * np.float32(1e-6), axis=1)] if k else \
        np.full(n, "", dtype=object)
    cust["value_band"] = pd.array(np.where(has_hist, value, None), dtype="string")
    cust["activity_band"] = pd.array(np.where(has_hist, activity, None), dtype="string")
    seg = pd.Series(value, dtype="string") + "/" + pd.Series(activity, dtype="string") + "/" + \
        pd.Series(dominant, dtype="string")
    cust["segment"] = seg.where(has_hist, pd.NA)
    if cfg.use_age_band:
        age = cutoff_ts(cutoff).year - index.birth_year
        band = np.full(n, None, dtype=object)
        for upper, name in reversed(AGE_BANDS):
            band[age < upper] = name
        band[np.isnan(age)] = None
        cust["age_band"] = pd.array(band, dtype="string")

    # ---- category statistics, best products
    cat_stats = pd.DataFrame(index=pd.RangeIndex(k))
    cat_stats["median_price"] = cat_price.set_index("cat")["median_price"].reindex(cat_stats.index)
    cat_buyers = buyers[buyers["tier"].isna()].set_index("cat")["buyers"].reindex(cat_stats.index).fillna(0)
    cat_stats["buyers_90d"] = cat_buyers.to_numpy("float64")
    cat_stats["buyers_share_90d"] = _safe_div(cat_stats["buyers_90d"], float(active_90d))
    tier_buyers = np.zeros((k, N_TIERS))
    tb = buyers[buyers["tier"].notna()]
    tier_buyers[tb["cat"].to_numpy(np.int64), tb["tier"].to_numpy(np.int64)] = tb["buyers"].to_numpy()
    tier_share = _safe_div(tier_buyers, cat_stats["buyers_90d"].to_numpy()[:, None])

    prods = index.products.merge(units, on="pcode", how="left")
    prods["units"] = prods["units"].fillna(0)
    best = prods[prods["active"]].sort_values(["cat", "tier", "units", "product_id"],
                                              ascending=[True, True, False, True], kind="stable")
    best = best.drop_duplicates(["cat", "tier"])
    best_product = np.full((k, N_TIERS), -1, dtype=np.int64)
    best_product[best["cat"].to_numpy(np.int64), best["tier"].to_numpy(np.int64)] = best["pcode"].to_numpy()

    return FeatureContext(index=index, cutoff=cutoff, cust=cust, cc=cc, owned=owned, profile=profile,
                          cat_orders=cat_orders,
                          lift=lift.astype(np.float32), buyer_profile=buyer_profile, cat_stats=cat_stats,
                          tier_share=tier_share, best_product=best_product,
                          cat_offers=cat_offers)


def pair_features(ctx: FeatureContext, cust: np.ndarray, cat: np.ndarray) -> dict[str, np.ndarray]:
    """Lift and collaborative similarity for (customer, category) pairs, the category itself excluded.

    lift(a, b) = P(owns a and b) / (P(owns a) P(owns b)) over customers with history before T.
    collab_sim = cosine between the customer's spend-share profile and the mean profile of the
    category's buyers, both without the category's own coordinate (it would only say "already buys").
    The ``related_*`` features count and weigh only the owned categories with lift >= RELATED_LIFT:
    a mean over all owned categories dilutes two strongly related ones among five unrelated ones, and
    how often the customer buys in the related categories says how strong that taste is.
    """
    m = len(cust)
    names = ("lift_max", "lift_mean", "collab_sim", "related_owned", "log_lift_sum", "related_spend_share",
             "related_orders_365d", "related_order_rate")
    out = {name: np.full(m, np.nan, dtype=np.float32) for name in names}
    lift0 = np.nan_to_num(ctx.lift, nan=0.0)
    # log lift, floored: "never bought together" is strong evidence against, but not -inf.
    with np.errstate(divide="ignore"):
        log_lift = np.log(np.maximum(lift0, np.float32(0.1))).astype(np.float32)
    orders_365d = ctx.cust["orders_365d"].to_numpy("float64")
    for start in range(0, m, _CHUNK):
        sl = slice(start, start + _CHUNK)
        i, c = cust[sl], cat[sl]
        rows = np.arange(len(i))
        mask = ctx.owned[i].copy()
        mask[rows, c] = False
        lc = lift0[c]
        n_own = mask.sum(axis=1)
        mx = np.where(mask, lc, -np.inf).max(axis=1) if len(i) else np.zeros(0)
        mean = np.where(mask, lc, 0).sum(axis=1) / np.maximum(n_own, 1)
        ok = n_own > 0
        out["lift_max"][sl] = np.where(ok, mx, np.nan)
        out["lift_mean"][sl] = np.where(ok, mean, np.nan)
        related = mask & (lc >= RELATED_LIFT)
        out["related_owned"][sl] = related.sum(axis=1)
        out["log_lift_sum"][sl] = np.where(mask, log_lift[c], 0).sum(axis=1)
        pi = ctx.profile[i].copy()
        out["related_spend_share"][sl] = np.where(related, pi, 0).sum(axis=1)
        rel_orders = np.where(related, ctx.cat_orders[i], 0).sum(axis=1)
        out["related_orders_365d"][sl] = rel_orders
        out["related_order_rate"][sl] = _safe_div(rel_orders, orders_365d[i])
        mc = ctx.buyer_profile[c].copy()
        pi[rows, c] = 0
        mc[rows, c] = 0
        dot = (pi * mc).sum(axis=1)
        norm = np.sqrt((pi * pi).sum(axis=1) * (mc * mc).sum(axis=1))
        out["collab_sim"][sl] = _safe_div(dot, norm)
    # A category nobody bought before T has no lift with anything.
    unbought = ctx.owned.sum(axis=0) == 0
    for name in names:
        if name != "collab_sim":
            out[name][unbought[cat]] = np.nan
    return out
