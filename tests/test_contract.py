"""The data contract: equivalent encodings coerce to one canonical layout, bad encodings raise a
ContractError naming table/column/check, ``cut_at`` drops rows at or after T, and a shop loads the
same from PostgreSQL as from Parquet."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from factories import equivalent_encodings, numeric_ids, tiny_shop, write_shop

from ml.contract import (
    CANONICAL_DTYPES,
    TABLES,
    ContractError,
    Shop,
    coerce_table,
    cut_at,
    load_source,
    write_sql,
)


def _canonical(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    return {name: coerce_table(name, df) for name, df in tables.items()}


def test_canonical_dtypes_and_columns():
    for name, df in _canonical(tiny_shop()).items():
        spec = TABLES[name]
        assert list(df.columns) == spec.column_names
        assert {c: str(t) for c, t in df.dtypes.items()} == {
            c.name: CANONICAL_DTYPES[c.type] for c in spec.columns}, name


def test_equivalent_encodings_coerce_to_the_same_frames():
    raw = equivalent_encodings(tiny_shop())
    assert raw["customers"]["birth_year"].dtype == "float64" and raw["customers"]["birth_year"].isna().any()
    assert isinstance(raw["customers"]["signup_date"].iloc[0], dt.date)
    assert isinstance(raw["orders"]["order_ts"].dtype, pd.DatetimeTZDtype)
    expected, got = _canonical(tiny_shop()), _canonical(raw)
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], obj=name)


def test_timestamps_normalise_to_naive_utc():
    base = pd.DataFrame({"order_id": ["o1"], "customer_id": ["c1"], "channel": ["web"]})
    forms = [pd.Series(pd.to_datetime(["2025-03-30 09:30"])),                               # naive UTC
             pd.Series(pd.to_datetime(["2025-03-30 11:30"])).dt.tz_localize("Europe/Berlin"),  # CEST
             pd.Series(pd.to_datetime(["2025-03-30 09:30"]).tz_localize("UTC").astype("datetime64[ns, UTC]")),
             pd.Series(["2025-03-30T09:30:00Z"]),                                          # ISO text
             pd.Series(pd.to_datetime(["2025-03-30 09:30"])).astype("datetime64[ms]")]
    for ts in forms:
        out = coerce_table("orders", base.assign(order_ts=ts))["order_ts"]
        assert str(out.dtype) == "datetime64[us]"
        assert out.iloc[0] == pd.Timestamp("2025-03-30 09:30"), ts.dtype


def test_dates_as_midnight_timestamps_dates_or_text():
    base = pd.DataFrame({"customer_id": ["c1", "c2"], "region": [None, "x"], "birth_year": [np.nan, 1990.0],
                         "email": [None, None]})
    forms = [pd.Series([dt.date(2025, 1, 2), dt.date(2025, 2, 3)]),
             pd.Series(pd.to_datetime(["2025-01-02", "2025-02-03"])),
             pd.Series(["2025-01-02", "2025-02-03"]),
             pd.Series(pd.to_datetime(["2025-01-02", "2025-02-03"])).dt.tz_localize("UTC")]
    for d in forms:
        out = coerce_table("customers", base.assign(signup_date=d))
        assert list(out["signup_date"]) == [pd.Timestamp("2025-01-02"), pd.Timestamp("2025-02-03")]
        assert out["birth_year"].tolist() == [pd.NA, 1990]
        assert str(out["email"].dtype) == "string" and out["email"].isna().all()


def test_integer_ids_become_strings():
    got = _canonical(numeric_ids(tiny_shop()))
    assert got["orders"]["order_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert str(got["order_lines"]["product_id"].dtype) == "string"


@pytest.mark.parametrize(("table", "column", "values"), [
    ("products", "price", ["abc", 1.0, 2.0, 3.0, 4.0]),
    ("order_lines", "quantity", [1.5, 1, 1, 1, 1, 1, 1]),
    ("products", "active", ["yes", "no", "true", "false", "1"]),
    ("orders", "order_id", [1.0, 2.0, 3.0, 4.0, 5.0]),  # a float id is a producer error, not an encoding
    ("orders", "order_ts", ["soon", "2025-01-01", "2025-01-01", "2025-01-01", "2025-01-01"]),
])
def test_bad_encodings_raise_contract_error(table, column, values):
    df = tiny_shop()[table].assign(**{column: values})
    with pytest.raises(ContractError) as err:
        coerce_table(table, df)
    assert (err.value.table, err.value.column, err.value.check) == (table, column, "wrong type")


def test_missing_column_raises_and_extra_columns_are_dropped():
    df = tiny_shop()["orders"]
    with pytest.raises(ContractError) as err:
        coerce_table("orders", df.drop(columns="channel"))
    assert (err.value.table, err.value.column, err.value.check) == ("orders", "channel", "missing column")
    assert list(coerce_table("orders", df.assign(note="x")).columns) == TABLES["orders"].column_names


def test_cut_at_drops_rows_at_or_after_t_and_lines_follow_orders():
    shop = Shop(_canonical(tiny_shop()))
    t = pd.Timestamp("2025-03-01 12:00")  # exactly o3's timestamp
    cut = cut_at(shop, t)
    assert cut.orders["order_id"].tolist() == ["o1", "o2"]
    assert set(cut.order_lines["order_id"]) == {"o1", "o2"} and len(cut.order_lines) == 3
    assert len(cut.consents) == 5  # c1's 2025-03-01 00:00 row is before T
    assert len(cut_at(shop, t.normalize()).consents) == 4  # ... and exactly at T it goes
    assert cut.offer_history["offer_id"].tolist() == ["f1"]
    assert cut.customers["customer_id"].tolist() == ["c1", "c2", "c3", "c4"]  # all signed up before T
    pd.testing.assert_frame_equal(cut.products, shop.products)  # no time column: untouched
    assert cut.orders.index.equals(pd.RangeIndex(2))
    assert len(cut_at(shop, t + pd.Timedelta(microseconds=1)).orders) == 3
    assert cut_at(shop, None) is shop
    assert len(shop.orders) == 5  # the input is not modified


@pytest.mark.postgres
def test_postgres_source_loads_like_parquet(pg_url, tmp_path):
    raw = equivalent_encodings(tiny_shop())  # tz-aware, dates as objects, nullable int as float
    folder = write_shop(raw, tmp_path / "shop")
    write_sql(raw, pg_url)
    from_pg, from_parquet = load_source(pg_url), load_source(folder)
    assert set(from_pg.tables) == set(from_parquet.tables) == set(TABLES)
    for name in TABLES:
        pd.testing.assert_frame_equal(from_pg[name], from_parquet[name], check_dtype=True, obj=name)
    as_of = "2025-03-01"
    for name in TABLES:
        pd.testing.assert_frame_equal(load_source(pg_url, as_of=as_of)[name],
                                      load_source(folder, as_of=as_of)[name], obj=f"{name} as of {as_of}")
