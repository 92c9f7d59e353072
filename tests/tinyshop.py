"""Hand-made tiny shops for feature and label tests, in the contract's columns, coerced to a ``Shop``.

``make_shop`` takes readable rows; ``random_shop`` generates a seeded shop of the contract's shape
(also used for the scale measurement with many customers).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from ml.contract import Shop, coerce_table

T0 = dt.date(2025, 6, 1)  # the cutoff most tests use


def day(n: float, base: dt.date = T0) -> pd.Timestamp:
    """A timestamp ``n`` days after ``base`` (negative: before), at noon unless fractional."""
    return pd.Timestamp(base) + pd.Timedelta(days=n) + (pd.Timedelta(hours=12) if float(n).is_integer()
                                                        else pd.Timedelta(0))


# Three categories, three products each: prices 10/20/30 → tiers 0/1/2.
CATALOGUE = [
    (f"{cat[:3].lower()}{tier}", cat, price, True)
    for cat in ("Coffee", "Tea", "Snacks") for tier, price in enumerate((10.0, 20.0, 30.0))
]


def make_shop(orders: list[tuple], products: list[tuple] = CATALOGUE, customers: list[str] | None = None,
              offers: list[tuple] = ()) -> Shop:
    """orders: (order_id, customer_id, ts, channel, [(product_id, quantity, unit_price | None), ...]);
    products: (product_id, category, price, active); offers: (customer_id, product_id, sent_at)."""
    prods = pd.DataFrame(products, columns=["product_id", "category", "price", "active"])
    prods["unit_cost"] = prods["price"] * 0.6
    price = dict(zip(prods["product_id"], prods["price"], strict=True))
    ids = customers if customers is not None else sorted({o[1] for o in orders})
    cust = pd.DataFrame({"customer_id": ids, "signup_date": pd.Timestamp("2024-01-01"), "region": "north",
                         "birth_year": 1980, "email": [f"{c}@example.com" for c in ids]})
    ords = pd.DataFrame([o[:4] for o in orders], columns=["order_id", "customer_id", "order_ts", "channel"])
    lines = pd.DataFrame(
        [(o[0], p, q, price[p] if u is None else u) for o in orders for p, q, u in o[4]],
        columns=["order_id", "product_id", "quantity", "unit_price"])
    hist = pd.DataFrame([(f"x{i}", c, "cross_sell", p, "email", s) for i, (c, p, s) in enumerate(offers)],
                        columns=["offer_id", "customer_id", "offer_type", "product_id", "channel", "sent_at"])
    consents = pd.DataFrame({"customer_id": ids, "channel": "email", "granted": True,
                             "updated_at": pd.Timestamp("2024-01-01")})
    raw = {"customers": cust, "products": prods, "orders": ords, "order_lines": lines,
           "consents": consents, "offer_history": hist}
    return Shop({name: coerce_table(name, df) for name, df in raw.items()})


def random_shop(n_customers: int = 60, n_days: int = 400, n_categories: int = 6,
                products_per_category: int = 6, seed: int = 0, end: dt.date = T0 + dt.timedelta(days=60),
                orders_per_customer: float = 12.0,
                n_offers: int | None = None) -> Shop:
    """A seeded shop: customers with category affinities and a preferred tier, orders spread over
    ``n_days`` before ``end``, 1–3 lines per order, some discounted lines, offer history."""
    rng = np.random.default_rng(seed)
    cats = [f"Cat{i:02d}" for i in range(n_categories)]
    n_prod = n_categories * products_per_category
    prod_cat = np.repeat(np.arange(n_categories), products_per_category)
    price = np.round(rng.uniform(2, 100, n_prod), 2)
    products = pd.DataFrame({"product_id": [f"p{i:05d}" for i in range(n_prod)],
                             "category": np.array(cats)[prod_cat], "price": price,
                             "unit_cost": np.where(rng.random(n_prod) < 0.2, np.nan, price * 0.5),
                             "active": rng.random(n_prod) > 0.1})
    cids = np.array([f"c{i:07d}" for i in range(n_customers)])
    start = pd.Timestamp(end) - pd.Timedelta(days=n_days)
    signup = start + pd.to_timedelta(rng.integers(0, n_days // 2, n_customers), unit="D")
    customers = pd.DataFrame({"customer_id": cids, "signup_date": signup,
                              "region": rng.choice(["north", "south", None], n_customers),
                              "birth_year": rng.integers(1940, 2005, n_customers).astype(float),
                              "email": [f"{c}@example.com" for c in cids]})
    n_orders_each = rng.poisson(orders_per_customer, n_customers)
    n_orders = int(n_orders_each.sum())
    ocust = np.repeat(np.arange(n_customers), n_orders_each)
    ts = start + pd.to_timedelta(rng.uniform(0, n_days * 86400, n_orders).astype("int64"), unit="s")
    orders = pd.DataFrame({"order_id": [f"o{i:08d}" for i in range(n_orders)], "customer_id": cids[ocust],
                           "order_ts": ts, "channel": rng.choice(["web", "app", "store", "phone"], n_orders,
                                                                 p=[0.4, 0.3, 0.2, 0.1])})
    n_lines_each = rng.integers(1, 4, n_orders)
    lorder = np.repeat(np.arange(n_orders), n_lines_each)
    # Each customer favours a few categories (Dirichlet weights); products uniform within category.
    affinity = rng.dirichlet(np.full(n_categories, 0.4), n_customers)
    lcust = ocust[lorder]
    u = rng.random(len(lorder))
    lcat = (affinity.cumsum(axis=1)[lcust] < u[:, None]).sum(axis=1).clip(0, n_categories - 1)
    lprod = lcat * products_per_category + rng.integers(0, products_per_category, len(lorder))
    discount = np.where(rng.random(len(lorder)) < 0.2, rng.uniform(0.5, 0.95, len(lorder)), 1.0)
    lines = pd.DataFrame({"order_id": orders["order_id"].to_numpy()[lorder],
                          "product_id": products["product_id"].to_numpy()[lprod],
                          "quantity": rng.integers(1, 4, len(lorder)),
                          "unit_price": np.round(price[lprod] * discount, 2)})
    n_off = n_offers if n_offers is not None else n_customers
    offers = pd.DataFrame({"offer_id": [f"x{i:08d}" for i in range(n_off)],
                           "customer_id": cids[rng.integers(0, n_customers, n_off)],
                           "offer_type": rng.choice(["cross_sell", "upsell", "downsell"], n_off),
                           "product_id": products["product_id"].to_numpy()[rng.integers(0, n_prod, n_off)],
                           "channel": rng.choice(["email", "sms", "push"], n_off),
                           "sent_at": start + pd.to_timedelta(rng.uniform(0, n_days * 86400, n_off)
                                                              .astype("int64"), unit="s")})
    consents = pd.DataFrame({"customer_id": cids, "channel": "email", "granted": True,
                             "updated_at": start})
    raw = {"customers": customers, "products": products, "orders": orders, "order_lines": lines,
           "consents": consents, "offer_history": offers}
    return Shop({name: coerce_table(name, df) for name, df in raw.items()})
