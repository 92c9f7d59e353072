"""A tiny, hand-made, valid shop that tests can read at a glance and break one defect at a time.

``tiny_shop()`` returns raw contract tables (as a producer would store them) holding the valid
edge cases of DESIGN §2: a free sample (unit_price 0), unit_cost null and equal to price, a
customer without orders, a product never sold, an inactive product with history, a customer with
no consent row. Everything happens in the first half of 2025, so ``NOW`` is safely after it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NOW = pd.Timestamp("2025-07-01 00:00:00")  # a `now` later than every row


def _ts(values: list[str]) -> pd.Series:
    return pd.Series(pd.to_datetime(values)).astype("datetime64[us]")


def tiny_shop() -> dict[str, pd.DataFrame]:
    """Fresh frames on every call, so a test may mutate them freely."""
    customers = pd.DataFrame({
        "customer_id": ["c1", "c2", "c3", "c4"],                     # c4 never orders
        "signup_date": _ts(["2024-01-05", "2024-03-10", "2024-06-01", "2025-02-01"]),
        "region": ["north", "south", None, "north"],
        "birth_year": pd.array([1980, None, 1995, 1971], dtype="Int64"),
        "email": ["a@example.com", None, "c@example.com", "d@example.com"],
    })
    products = pd.DataFrame({
        "product_id": ["p1", "p2", "p3", "p4", "p5"],
        "category": ["coffee", "coffee", "tea", "tea", "snacks"],
        "price": [4.5, 12.0, 3.0, 9.0, 2.0],
        "unit_cost": [2.0, 12.0, None, 5.0, 1.0],                    # p2 cost == price, p3 cost null
        "active": [True, True, True, False, True],                   # p4 inactive with history; p5 never sold
    })
    orders = pd.DataFrame({
        "order_id": ["o1", "o2", "o3", "o4", "o5"],
        "customer_id": ["c1", "c1", "c2", "c3", "c3"],
        "order_ts": _ts(["2025-01-10 09:30", "2025-02-14 18:00", "2025-03-01 12:00",
                         "2025-04-20 08:15", "2025-05-30 21:45"]),
        "channel": ["web", "app", "store", "phone", "web"],
    })
    order_lines = pd.DataFrame({
        "order_id": ["o1", "o1", "o2", "o3", "o4", "o4", "o5"],
        "product_id": ["p1", "p3", "p2", "p4", "p1", "p3", "p4"],
        "quantity": pd.array([1, 2, 1, 3, 1, 1, 2], dtype="Int64"),
        "unit_price": [4.5, 0.0, 12.0, 8.0, 4.0, 3.0, 9.0],          # 0.0: free sample
    })
    consents = pd.DataFrame({
        "customer_id": ["c1", "c1", "c2", "c3", "c1"],              # c4: no row = no consent
        "channel": ["email", "sms", "push", "email", "email"],
        "granted": [True, True, False, True, False],
        "updated_at": _ts(["2024-01-05", "2024-01-05", "2024-03-10", "2024-06-01", "2025-03-01"]),
    })
    offer_history = pd.DataFrame({
        "offer_id": ["f1", "f2", "f3"],
        "customer_id": ["c1", "c2", "c3"],
        "offer_type": ["cross_sell", "upsell", "downsell"],
        "product_id": ["p3", "p2", "p1"],
        "channel": ["email", "push", "email"],
        "sent_at": _ts(["2025-02-01 10:00", "2025-03-15 10:00", "2025-05-01 10:00"]),
    })
    return {"customers": customers, "products": products, "orders": orders, "order_lines": order_lines,
            "consents": consents, "offer_history": offer_history}


def equivalent_encodings(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The same shop as another producer would send it (DESIGN §2): every value equal, dtypes not."""
    t = {k: v.copy() for k, v in tables.items()}
    c = t["customers"]
    c["birth_year"] = c["birth_year"].astype("float64")               # nullable int as float + NaN
    c["signup_date"] = c["signup_date"].dt.date                       # python dates (object)
    c["customer_id"] = c["customer_id"].astype(object)
    c["email"] = c["email"].astype("string")
    t["orders"]["order_ts"] = t["orders"]["order_ts"].dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin")
    t["orders"]["customer_id"] = t["orders"]["customer_id"].astype("string")
    t["consents"]["updated_at"] = t["consents"]["updated_at"].dt.tz_localize("UTC")
    t["order_lines"]["quantity"] = t["order_lines"]["quantity"].astype("int32")
    t["products"]["active"] = t["products"]["active"].astype(np.int8)  # 0/1
    return t


def numeric_ids(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Ids as integers (a common export): the contract turns them into strings."""
    t = {k: v.copy() for k, v in tables.items()}
    for df in t.values():
        for col in df.columns:
            if col.endswith("_id"):
                df[col] = df[col].str[1:].astype("int64")
    return t


def write_shop(tables: dict[str, pd.DataFrame], folder: Path) -> Path:
    from ml.contract import write_parquet

    return write_parquet(tables, folder)
