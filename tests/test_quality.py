"""The data-quality gate: a valid shop passes in every equivalent encoding, each defect fails with a
message naming its table and check, personal data never shows, and the CLI exits 0/1/2."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from factories import NOW, equivalent_encodings, numeric_ids, tiny_shop, write_shop

import ml.quality as quality
from ml.quality import DataQualityError, Failure, require_valid, run_suite, validate_source, validate_tables


@pytest.fixture(autouse=True, scope="module")
def _memo_suites():
    """GE spends ~0.3 s of fixed Python overhead per suite run. A defect touches one table, so the
    other five frames are byte-identical between tests: reuse their result (keyed by content and
    dtypes), and every distinct frame still goes through Great Expectations once."""
    real = quality._suite_failures
    memo: dict[tuple, list] = {}

    def cached(name: str, df: pd.DataFrame):
        digest = hashlib.sha256(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes()).hexdigest()
        key = (name, tuple(df.columns), tuple(map(str, df.dtypes)), digest, str(quality.expectations_dir()))
        if key not in memo:
            memo[key] = real(name, df)
        return memo[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality, "_suite_failures", cached)
        yield


def _set(table: str, column: str, row: int, value: object) -> Callable[[dict], None]:
    def mutate(t: dict) -> None:
        df = t[table]
        if isinstance(value, str) and not pd.api.types.is_string_dtype(df[column].dtype):
            df[column] = df[column].astype(object)
        df.loc[row, column] = value
    return mutate


def _drop_column(table: str, column: str) -> Callable[[dict], None]:
    def mutate(t: dict) -> None:
        t[table] = t[table].drop(columns=column)
    return mutate


def _empty(table: str) -> Callable[[dict], None]:
    def mutate(t: dict) -> None:
        t[table] = t[table].iloc[0:0]
    return mutate


def _drop_table(table: str) -> Callable[[dict], None]:
    return lambda t: t.pop(table)


def _fractional_quantity(t: dict) -> None:
    t["order_lines"]["quantity"] = t["order_lines"]["quantity"].astype("float64")
    t["order_lines"].loc[2, "quantity"] = 1.5


def _duplicate_consent(t: dict) -> None:
    t["consents"] = pd.concat([t["consents"], t["consents"].iloc[[0]].assign(granted=False)],
                              ignore_index=True)


# (id, mutation, table, column, check) — the check is the stable name in the summary.
DEFECTS = [
    ("missing column", _drop_column("products", "category"), "products", "category", "missing column"),
    ("price as text", _set("products", "price", 1, "abc"), "products", "price", "wrong type"),
    ("fractional quantity", _fractional_quantity, "order_lines", "quantity", "wrong type"),
    ("bool as text", _set("products", "active", 0, "maybe"), "products", "active", "wrong type"),
    ("null key", _set("orders", "order_id", 2, None), "orders", "order_id", "null key"),
    ("null timestamp", _set("orders", "order_ts", 1, pd.NaT), "orders", "order_ts", "null value"),
    ("duplicate id", _set("customers", "customer_id", 1, "c1"), "customers", "customer_id", "duplicate id"),
    ("duplicate offer id", _set("offer_history", "offer_id", 2, "f1"), "offer_history", "offer_id",
     "duplicate id"),
    ("orphan order line", _set("order_lines", "order_id", 3, "o99"), "order_lines", "order_id",
     "orphan: unknown order"),
    ("unknown product", _set("order_lines", "product_id", 0, "p99"), "order_lines", "product_id",
     "orphan: unknown product"),
    ("unknown customer", _set("orders", "customer_id", 4, "c99"), "orders", "customer_id",
     "orphan: unknown customer"),
    ("consent unknown customer", _set("consents", "customer_id", 2, "c99"), "consents", "customer_id",
     "orphan: unknown customer"),
    ("offer unknown product", _set("offer_history", "product_id", 0, "p99"), "offer_history", "product_id",
     "orphan: unknown product"),
    ("negative price", _set("products", "price", 0, -4.5), "products", "price", "non-positive price"),
    ("zero price", _set("products", "price", 4, 0.0), "products", "price", "non-positive price"),
    ("negative cost", _set("products", "unit_cost", 0, -1.0), "products", "unit_cost", "negative cost"),
    ("negative unit price", _set("order_lines", "unit_price", 0, -0.5), "order_lines", "unit_price",
     "negative price"),
    ("zero quantity", _set("order_lines", "quantity", 1, 0), "order_lines", "quantity",
     "non-positive quantity"),
    ("order in the future", _set("orders", "order_ts", 0, NOW + pd.Timedelta(hours=1)), "orders", "order_ts",
     "in the future"),
    ("consent in the future", _set("consents", "updated_at", 0, NOW + pd.Timedelta(days=3)), "consents",
     "updated_at", "in the future"),
    ("empty table", _empty("orders"), "orders", None, "empty table"),
    ("unknown order channel", _set("orders", "channel", 0, "email"), "orders", "channel", "unknown value"),
    ("unknown consent channel", _set("consents", "channel", 0, "phone"), "consents", "channel",
     "unknown value"),
    ("unknown offer type", _set("offer_history", "offer_type", 0, "bundle"), "offer_history", "offer_type",
     "unknown value"),
    ("unit_cost above price", _set("products", "unit_cost", 0, 5.0), "products", "unit_cost",
     "unit_cost above price"),
    ("duplicate consent", _duplicate_consent, "consents", "customer_id+channel+updated_at", "duplicate key"),
    ("birth year out of range", _set("customers", "birth_year", 0, 1700), "customers", "birth_year",
     "out of range"),
    ("missing table", _drop_table("consents"), "consents", None, "missing table"),
]


def test_valid_shop_passes():
    report = validate_tables(tiny_shop(), now=NOW)
    assert report.success, report.summary()
    assert report.failures == []
    assert report.tables == {"customers": 4, "products": 5, "orders": 5, "order_lines": 7, "consents": 5,
                             "offer_history": 3}
    assert report.summary().startswith("data quality PASSED")
    assert "orders 5" in report.summary()
    assert json.loads(json.dumps(report.to_dict()))["success"] is True


@pytest.mark.parametrize("encode", [equivalent_encodings, numeric_ids], ids=["encodings", "int ids"])
def test_equivalent_encodings_pass(encode):
    report = validate_tables(encode(tiny_shop()), now=NOW)
    assert report.success, report.summary()


def test_optional_offer_history_absent_or_empty_passes():
    shop = tiny_shop()
    shop["offer_history"] = shop["offer_history"].iloc[0:0]
    assert validate_tables(shop, now=NOW).success
    del shop["offer_history"]
    report = validate_tables(shop, now=NOW)
    assert report.success, report.summary()
    assert "offer_history" not in report.tables


@pytest.mark.parametrize(("mutate", "table", "column", "check"), [d[1:] for d in DEFECTS],
                         ids=[d[0] for d in DEFECTS])
def test_defect_fails_naming_table_and_check(mutate, table, column, check):
    shop = tiny_shop()
    mutate(shop)
    report = validate_tables(shop, now=NOW)
    assert not report.success
    hits = [f for f in report.failures if (f.table, f.column, f.check) == (table, column, check)]
    assert hits, report.summary()
    where = f"{table}.{column}" if column else table
    assert f"{where}: {check}" in report.summary()
    assert str(hits[0].count or "") in hits[0].line()
    json.dumps(report.to_dict())  # JSON-able whatever broke


def test_enough_distinct_defects():
    assert len({(d[2], d[4]) for d in DEFECTS}) >= 14


def test_counts_and_examples_name_the_bad_rows():
    shop = tiny_shop()
    shop["order_lines"].loc[[1, 3], "product_id"] = "p404"
    shop["orders"].loc[[0, 1, 2], "channel"] = ["fax", "fax", "telex"]
    failures = {(f.table, f.check): f for f in validate_tables(shop, now=NOW).failures}
    orphan = failures["order_lines", "orphan: unknown product"]
    assert (orphan.count, orphan.examples, orphan.detail) == (2, ["p404"], "not in products.product_id")
    channel = failures["orders", "unknown value"]
    assert channel.count == 3 and set(channel.examples) == {"fax", "telex"}


def test_broken_column_does_not_hide_other_defects():
    shop = tiny_shop()
    _set("products", "price", 1, "abc")(shop)
    _set("products", "product_id", 4, "p1")(shop)
    _set("order_lines", "product_id", 0, "p99")(shop)
    checks = {(f.table, f.column, f.check) for f in validate_tables(shop, now=NOW).failures}
    assert checks == {("products", "price", "wrong type"), ("products", "product_id", "duplicate id"),
                      ("order_lines", "product_id", "orphan: unknown product")}


def test_personal_data_never_shown():
    shop = tiny_shop()
    shop["customers"]["birth_year"] = pd.array([1980, 1777, 1995, 1971], dtype="Int64")
    shop["customers"]["email"] = [1234.5, None, 6789.5, None]  # a numeric email: wrong type
    report = validate_tables(shop, now=NOW)
    checks = {(f.column, f.check) for f in report.failures}
    assert checks == {("birth_year", "out of range"), ("email", "wrong type")}
    text = report.summary() + json.dumps(report.to_dict())
    assert "<personal data>" in text
    for secret in ("1777", "1234", "6789"):
        assert secret not in text


def test_as_of_ignores_rows_at_or_after_it():
    shop = tiny_shop()
    late = NOW + pd.Timedelta(days=10)
    shop["orders"].loc[5] = ["o6", "c1", late, "web"]
    shop["order_lines"].loc[7] = ["o6", "p404", 1, 2.0]  # a future line may even name an unknown product
    shop["consents"].loc[5] = ["c2", "email", True, late]
    shop["customers"].loc[4] = ["c5", late.normalize(), None, pd.NA, None]
    failing = validate_tables(shop, now=NOW)
    assert {(f.table, f.check) for f in failing.failures} == {
        ("customers", "in the future"), ("orders", "in the future"), ("consents", "in the future"),
        ("order_lines", "orphan: unknown product")}
    report = validate_tables(shop, now=NOW, as_of=NOW)
    assert report.success, report.summary()
    assert report.tables["orders"] == 5 and report.tables["order_lines"] == 7
    assert report.as_of == "2025-07-01"
    # an order exactly at as_of is ignored too; an earlier one is checked
    assert validate_tables(shop, now=NOW, as_of=late).tables["orders"] == 5
    after = validate_tables(shop, now=late + pd.Timedelta(days=1), as_of=late + pd.Timedelta(seconds=1))
    assert ("order_lines", "orphan: unknown product") in {(f.table, f.check) for f in after.failures}


def test_as_of_does_not_hide_orphan_lines():
    shop = tiny_shop()
    shop["order_lines"].loc[0, "order_id"] = "o404"  # a line of no order has no time: always an error
    report = validate_tables(shop, now=NOW, as_of=NOW)
    assert [(f.table, f.check) for f in report.failures] == [("order_lines", "orphan: unknown order")]


def test_tz_aware_now_and_default_wall_clock():
    shop = tiny_shop()
    berlin_now = NOW.tz_localize("UTC").tz_convert("Europe/Berlin")
    assert validate_tables(shop, now=berlin_now).success
    shop["orders"].loc[0, "order_ts"] = pd.Timestamp.now() + pd.Timedelta(days=1)
    report = validate_tables(shop)  # now = the wall clock
    assert [(f.table, f.check) for f in report.failures] == [("orders", "in the future")]


def test_require_valid_returns_coerced_cut_shop(tmp_path):
    src = write_shop(equivalent_encodings(tiny_shop()), tmp_path / "shop")
    shop = require_valid(src, as_of="2025-03-01", now=NOW)
    assert list(shop.orders["order_id"]) == ["o1", "o2"]  # o3 at 2025-03-01 12:00 is after the cut
    assert set(shop.order_lines["order_id"]) == {"o1", "o2"}
    assert str(shop.orders["order_ts"].dtype) == "datetime64[us]"
    assert str(shop.customers["birth_year"].dtype) == "Int64"
    assert str(shop.products["active"].dtype) == "boolean"
    assert shop.orders.loc[0, "order_ts"] == pd.Timestamp("2025-01-10 09:30")  # Berlin → UTC


def test_require_valid_raises_with_the_summary(tmp_path):
    shop = tiny_shop()
    shop["orders"].loc[0, "customer_id"] = "c404"
    del shop["offer_history"]
    src = write_shop(shop, tmp_path / "shop")
    with pytest.raises(DataQualityError) as err:
        require_valid(src, now=NOW)
    assert str(err.value) == err.value.report.summary()
    assert "orders.customer_id: orphan: unknown customer: 1 row, e.g. ['c404']" in str(err.value)
    clone = pickle.loads(pickle.dumps(err.value))
    assert clone.report == err.value.report


def test_sql_source_and_missing_tables(tmp_path):
    from ml.contract import write_sql

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    shop = tiny_shop()
    write_sql(shop, url)
    assert validate_source(url, now=NOW).success
    folder = tmp_path / "partial"
    write_shop({k: v for k, v in shop.items() if k not in ("consents", "products")}, folder)
    report = validate_source(folder, now=NOW)
    assert {(f.table, f.check) for f in report.failures} >= {("consents", "missing table"),
                                                            ("products", "missing table")}
    missing = validate_source(tmp_path / "nowhere", now=NOW)
    assert [(f.table, f.check) for f in missing.failures] == [("<source>", "missing source")]


def test_run_suite_is_generic(tmp_path, monkeypatch):
    suite = {"name": "scored", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "customer_id"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "propensity", "min_value": 0,
                                                                  "max_value": 1}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "channel",
                                                                 "value_set": ["email", "sms", "push"]},
         "meta": {"check": "unknown channel"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "segment"}},
        {"type": "expect_column_values_to_not_match_regex", "kwargs": {"column": "customer_id", "regex": "@"},
         "meta": {"check": "personal data"}},
    ]}
    (tmp_path / "scored.json").write_text(json.dumps(suite))
    monkeypatch.setenv("OFFERFLOW_EXPECTATIONS", str(tmp_path))
    df = pd.DataFrame({"customer_id": ["a", None, "jane@example.com"], "propensity": [0.1, 1.5, np.nan],
                       "channel": ["email", "fax", "sms"]})
    failures = run_suite("scored", df)
    assert [(f.check, f.column, f.count) for f in failures] == [
        ("null value", "customer_id", 1), ("out of range", "propensity", 1),
        ("unknown channel", "channel", 1), ("missing column", "segment", None),
        ("personal data", "customer_id", 1)]
    assert failures[-1].examples == ["<personal data>"] and "jane" not in failures[-1].line()
    fixed = df.assign(propensity=0.5, channel="push", customer_id="x", segment="s")
    assert run_suite("scored", fixed) == []
    with pytest.raises(FileNotFoundError):
        run_suite("no_such_suite", df)
    assert isinstance(Failure("t", "c").line(), str)


# ---------------------------------------------------------------------------- CLI end to end

def test_cli_validate_exit_codes(tmp_path):
    from typer.testing import CliRunner

    from ml.cli import app

    runner = CliRunner()
    good = write_shop(tiny_shop(), tmp_path / "good")
    result = runner.invoke(app, ["validate", "--data", str(good)])
    assert result.exit_code == 0, result.output
    assert "data quality PASSED" in result.output

    bad_shop = tiny_shop()
    bad_shop["order_lines"].loc[2, "quantity"] = 0
    bad = write_shop(bad_shop, tmp_path / "bad")
    result = runner.invoke(app, ["validate", "--data", str(bad)])
    assert result.exit_code == 1, result.output
    assert "order_lines.quantity: non-positive quantity: 1 row, e.g. [0]" in result.output

    result = runner.invoke(app, ["validate", "--data", str(good), "--as-of", "2025-13-45"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["validate", "--data", str(good), "--as-of", "2025-03-01"])
    assert result.exit_code == 0, result.output
    assert "as of 2025-03-01" in result.output
