"""Point-in-time features, candidates, tiers and cutoffs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinyshop import T0, day, make_shop, random_shop

from ml.config import MODEL
from ml.contract import OFFER_TYPES, PERSONAL_COLUMNS, Shop
from ml.dataset import CATEGORICAL_FEATURES, build_examples, build_training_sets, cutoffs_for, feature_columns
from ml.features import FEATURE_DOCS, FeatureContext, ShopIndex, customer_fraction
from ml.tiers import price_tiers, product_margins

# ---------------------------------------------------------------------------- leakage

BASE = random_shop(n_customers=40, n_categories=6, seed=3, n_offers=120)
T = pd.Timestamp(T0)


def _as_of_t(shop: Shop) -> dict[str, pd.DataFrame]:
    ctx = FeatureContext.build(shop, T0)
    return {t: build_examples(shop, T0, t, with_labels=False, context=ctx) for t in OFFER_TYPES}


BASE_FRAMES = _as_of_t(BASE)
BASE_INDEX = ShopIndex(BASE)  # shared by the tests that do not change the shop


def _future_ts(rng: np.random.Generator, n: int) -> pd.Series:
    """Timestamps at or after T, a quarter of them exactly at T (the boundary a `<=` bug would read)."""
    secs = rng.uniform(0, 90 * 86400, n).astype("int64")
    secs[rng.random(n) < 0.25] = 0
    return pd.Series(T + pd.to_timedelta(secs, unit="s")).astype("datetime64[us]")


def perturb_future(shop: Shop, seed: int, ops: set[str]) -> Shop:
    """Change only rows at or after T: lines of future orders, future orders, future offers."""
    rng = np.random.default_rng(seed)
    orders = shop.orders.copy()
    lines = shop.order_lines.copy()
    offers = shop.offer_history.copy()
    products = shop.products
    future = orders.loc[orders["order_ts"] >= T, "order_id"]
    fl = lines["order_id"].isin(future).to_numpy()
    pick = fl & (rng.random(len(lines)) < 0.5)
    if "prices" in ops:
        lines.loc[pick, "unit_price"] = np.round(rng.uniform(0, 200, pick.sum()), 2)
        lines.loc[pick, "quantity"] = pd.array(rng.integers(1, 9, pick.sum()), dtype="Int64")
    if "products" in ops:  # other categories and tiers bought in the future
        lines.loc[pick, "product_id"] = rng.choice(products["product_id"].to_numpy(), pick.sum())
    if "move" in ops:
        fo = (orders["order_ts"] >= T).to_numpy()
        orders.loc[fo, "order_ts"] = _future_ts(rng, fo.sum()).to_numpy()
    if "delete" in ops:
        gone = future[rng.random(len(future)) < 0.4]
        orders = orders[~orders["order_id"].isin(gone)]
        lines = lines[~lines["order_id"].isin(gone) & ~(fl & (rng.random(len(lines)) < 0.2))]
    if "add" in ops:
        n = int(rng.integers(1, 30))
        new = pd.DataFrame({"order_id": [f"new{seed}_{i}" for i in range(n)],
                            "customer_id": rng.choice(shop.customers["customer_id"].to_numpy(), n),
                            "order_ts": _future_ts(rng, n).to_numpy(),
                            "channel": rng.choice(["web", "app", "store", "phone"], n)})
        new_lines = pd.DataFrame({"order_id": np.repeat(new["order_id"].to_numpy(), 2),
                                  "product_id": rng.choice(products["product_id"].to_numpy(), 2 * n),
                                  "quantity": rng.integers(1, 5, 2 * n),
                                  "unit_price": np.round(rng.uniform(0, 100, 2 * n), 2)})
        orders = pd.concat([orders, new.astype(orders.dtypes.to_dict())], ignore_index=True)
        lines = pd.concat([lines, new_lines.astype(lines.dtypes.to_dict())], ignore_index=True)
    if "offers" in ops:
        fo = (offers["sent_at"] >= T).to_numpy()
        offers.loc[fo, "sent_at"] = _future_ts(rng, fo.sum()).to_numpy()
        offers.loc[fo, "product_id"] = rng.choice(products["product_id"].to_numpy(), fo.sum())
        offers = offers[~(fo & (rng.random(len(offers)) < 0.3))]
        n = int(rng.integers(1, 10))
        extra = pd.DataFrame({"offer_id": [f"newx{seed}_{i}" for i in range(n)],
                              "customer_id": rng.choice(shop.customers["customer_id"].to_numpy(), n),
                              "offer_type": "upsell", "product_id": rng.choice(products["product_id"], n),
                              "channel": "sms", "sent_at": _future_ts(rng, n).to_numpy()})
        offers = pd.concat([offers, extra.astype(offers.dtypes.to_dict())], ignore_index=True)
    # Shuffle rows too: nothing may depend on the physical order of the input.
    tables = dict(shop.tables, orders=orders.sample(frac=1, random_state=seed).reset_index(drop=True),
                  order_lines=lines.sample(frac=1, random_state=seed + 1).reset_index(drop=True),
                  offer_history=offers.reset_index(drop=True))
    return Shop(tables)


OPS = ["prices", "products", "move", "delete", "add", "offers"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), ops=st.sets(st.sampled_from(OPS), min_size=1))
def test_future_rows_never_change_what_is_known_at_t(seed, ops):
    perturbed = perturb_future(BASE, seed, ops)
    frames = _as_of_t(perturbed)
    for offer_type, frame in frames.items():
        pd.testing.assert_frame_equal(frame, BASE_FRAMES[offer_type], check_exact=True,
                                      obj=f"{offer_type} {sorted(ops)}")


def test_perturbation_does_reach_the_labels():
    """Guards the leakage test itself: the perturbation changes what happens after T."""
    perturbed = perturb_future(BASE, 1, set(OPS))
    before = build_examples(BASE, T0, "cross_sell")["label"]
    after = build_examples(perturbed, T0, "cross_sell")["label"]
    assert len(before) == len(after) and (before.to_numpy() != after.to_numpy()).any()


def test_a_past_change_does_change_features():
    """And the features do read the past: a price change before T shows up."""
    lines = BASE.order_lines.copy()
    past = BASE.orders.loc[BASE.orders["order_ts"] < T, "order_id"]
    lines.loc[lines["order_id"].isin(past), "unit_price"] *= 2
    frame = build_examples(Shop(dict(BASE.tables, order_lines=lines)), T0, "upsell", with_labels=False)
    assert not np.allclose(frame["spend_365d"], BASE_FRAMES["upsell"]["spend_365d"])


# ---------------------------------------------------------------------------- frame shape

def test_columns_dtypes_and_no_personal_data():
    for offer_type, frame in BASE_FRAMES.items():
        cols = feature_columns(offer_type)
        keys = ["customer_id", "category", "product_id", "cutoff", "offer_type", "segment", "at_risk",
                "margin", "popularity"]
        assert "category" in cols  # the key column doubles as the categorical feature
        assert list(frame.columns) == keys + [c for c in cols if c not in keys]
        assert len(frame) > 0
        assert not set(cols) & PERSONAL_COLUMNS and "age_band" not in cols
        assert set(cols) <= set(FEATURE_DOCS)
        for c in cols:
            if c in CATEGORICAL_FEATURES:
                assert pd.api.types.is_string_dtype(frame[c]), c
            else:
                assert pd.api.types.is_float_dtype(frame[c]), c
        assert not frame.duplicated(["customer_id", "category"]).any()
        assert (frame["cutoff"] == T0).all()
        assert frame["segment"].notna().all() and frame["margin"].notna().all()
        assert frame["popularity"].between(0, 1).all()
        assert frame["segment"].str.count("/").eq(2).all()


def test_age_band_only_when_allowed():
    cfg = dataclasses.replace(MODEL, use_age_band=True)
    frame = build_examples(None, T0, "upsell", with_labels=False, cfg=cfg,
                           context=FeatureContext.build(BASE_INDEX, T0, cfg))
    assert "age_band" in feature_columns("upsell", cfg) and frame["age_band"].notna().any()
    assert "birth_year" not in frame.columns


def test_shared_context_equals_fresh_build_and_training_sets():
    ctx = FeatureContext.build(BASE_INDEX, T0)
    pd.testing.assert_frame_equal(build_examples(BASE, T0, "downsell", context=ctx),
                                  build_examples(BASE, T0, "downsell"))
    with pytest.raises(ValueError, match="context"):
        build_examples(BASE, T0 - dt.timedelta(days=1), "upsell", context=ctx)
    cfg = dataclasses.replace(MODEL, n_cutoffs=3)
    sets = build_training_sets(BASE, T0 + dt.timedelta(days=56), ["upsell", "downsell"], cfg=cfg,
                               index=BASE_INDEX)
    assert sorted(sets["upsell"]["cutoff"].unique()) == cutoffs_for(T0 + dt.timedelta(days=56), cfg)
    last = sets["downsell"][sets["downsell"]["cutoff"] == T0]
    pd.testing.assert_frame_equal(last.reset_index(drop=True),
                                  build_examples(None, T0, "downsell", context=ctx))


# ---------------------------------------------------------------------------- tiers

def test_price_tiers_are_terciles_within_category():
    products = pd.DataFrame({
        "product_id": [f"p{i}" for i in range(11)],
        "category": ["A"] * 6 + ["B"] * 3 + ["C"] + ["D"],
        "price": [60, 10, 50, 20, 40, 30, 5, 5, 9, 7, 3.0],
    })
    tiers = price_tiers(products).set_index("product_id")["tier"]
    assert tiers[[f"p{i}" for i in range(6)]].tolist() == [2, 0, 2, 0, 1, 1]
    assert tiers[["p6", "p7", "p8"]].tolist() == [0, 0, 2]  # equal prices share the lower tier
    assert tiers["p9"] == 0 and tiers["p10"] == 0  # a category of one product is budget
    assert list(price_tiers(products).columns) == ["product_id", "category", "tier"]


def test_product_margins_use_default_rate_when_cost_unknown():
    products = pd.DataFrame({"product_id": ["a", "b", "c"], "price": [10.0, 20.0, 5.0],
                             "unit_cost": [4.0, None, 5.0]})
    m = product_margins(products, 0.25)
    assert m.to_dict() == {"a": 6.0, "b": 5.0, "c": 0.0}


# ---------------------------------------------------------------------------- habits and risk

def _steady(cid: str, days: range, product: str = "cof1", prefix: str = "") -> list[tuple]:
    return [(f"{prefix}{cid}-{d}", cid, day(d), "web", [(product, 1, None)]) for d in days]


def test_usual_tier_ties_go_to_the_lower_tier():
    orders = (_steady("tie01", range(-60, -20, 10), "cof0")[:2] + _steady("tie01", range(-15, -1, 7), "cof2")
              + _steady("tie12", range(-60, -40, 10), "tea1") + _steady("tie12", range(-30, -10, 10), "tea2"))
    shop = make_shop(orders)
    up = build_examples(shop, T0, "upsell", with_labels=False).set_index(["customer_id", "category"])
    assert up.loc[("tie01", "Coffee"), "usual_tier"] == 0
    assert up.loc[("tie01", "Coffee"), "product_id"] == "cof1"  # one tier up from the usual tier
    assert up.loc[("tie12", "Tea"), "usual_tier"] == 1
    assert up.loc[("tie12", "Tea"), "product_id"] == "tea2"


def test_at_risk_both_branches():
    falling = _steady("falling", range(-175, -99, 15)) + _steady("falling", [-50, -5])
    overdue = _steady("overdue", range(-120, -40, 7))
    steady = _steady("steady", range(-120, 0, 7))
    shop = make_shop(falling + overdue + steady)
    ctx = FeatureContext.build(shop, T0)
    c = ctx.cust.assign(customer_id=ctx.index.customer_ids.to_numpy()).set_index("customer_id")
    # falling: 2 orders in 90 days vs 6 before, but the last was 5 days ago with a 15-day median gap.
    assert c.loc["falling", "orders_90d"] == 2 and c.loc["falling", "order_gap_median"] == 15
    assert c.loc["falling", "at_risk"]
    # overdue: activity did not fall (7 vs 5) but silent for 43 days > 2 × 7.
    assert c.loc["overdue", "orders_90d"] >= 0.5 * 5 and c.loc["overdue", "days_since_last_order"] > 14
    assert c.loc["overdue", "at_risk"]
    assert not c.loc["steady", "at_risk"]
    down = build_examples(shop, T0, "downsell", with_labels=False)
    assert set(down["customer_id"]) == {"falling", "overdue"} and down["at_risk"].all()


def test_tier_habits_and_price_sensitivity():
    orders = [("o1", "a", day(-30), "web", [("cof0", 1, 5.0), ("cof2", 1, None)]),
              ("o2", "a", day(-20), "app", [("cof0", 2, None), ("tea1", 1, 15.0)])]
    f = build_examples(make_shop(orders), T0, "upsell", with_labels=False).set_index("category")
    row = f.loc["Coffee"]
    assert row["share_budget"] == pytest.approx(2 / 4) and row["share_premium"] == pytest.approx(1 / 4)
    assert row["share_below_list"] == pytest.approx(2 / 4)
    assert row["share_web"] == 0.5 and row["share_app"] == 0.5
    assert row["usual_tier"] == 0 and row["cat_share_above_usual"] == pytest.approx(1 / 3)
    assert row["days_since_last_order"] == pytest.approx(19.5)
    assert row["spend_365d"] == pytest.approx(5 + 30 + 20 + 15)


# ---------------------------------------------------------------------------- candidates

def test_cross_sell_never_offers_an_owned_category():
    frame = BASE_FRAMES["cross_sell"]
    past = BASE.orders[BASE.orders["order_ts"] < T].merge(BASE.order_lines, on="order_id") \
        .merge(BASE.products, on="product_id")
    owned = set(zip(past["customer_id"], past["category"], strict=True))
    pairs = set(zip(frame["customer_id"], frame["category"], strict=True))
    assert pairs and not pairs & owned
    assert frame.groupby("customer_id").size().max() <= MODEL.cross_sell_candidates
    assert set(frame["customer_id"]) <= set(past["customer_id"])  # cold start: no history, no candidates
    up = BASE_FRAMES["upsell"]
    assert set(zip(up["customer_id"], up["category"], strict=True)) <= owned
    offered = BASE.products.set_index("product_id").loc[frame["product_id"]]
    assert (offered["category"].to_numpy() == frame["category"].to_numpy()).all()
    assert offered["active"].all()


def test_offered_products_step_one_tier():
    tiers = price_tiers(BASE.products).set_index("product_id")["tier"]
    up, down = BASE_FRAMES["upsell"], BASE_FRAMES["downsell"]
    assert (tiers[up["product_id"]].to_numpy() > up["usual_tier"].to_numpy()).all()
    assert (tiers[down["product_id"]].to_numpy() < down["usual_tier"].to_numpy()).all()
    assert (up["offer_tier"] - up["usual_tier"] >= 1).all()


# ---------------------------------------------------------------------------- cutoffs

@pytest.mark.parametrize(("h", "step", "n"), [(28, 14, 6), (30, 7, 5), (10, 14, 4), (28, 28, 3)])
def test_cutoffs_shape(h, step, n):
    cfg = dataclasses.replace(MODEL, horizon_days=h, cutoff_step_days=step, n_cutoffs=n)
    as_of = dt.date(2025, 12, 31)
    cuts = cutoffs_for(as_of, cfg)
    hd = dt.timedelta(days=h)
    assert len(cuts) == n and cuts == sorted(set(cuts))
    assert cuts[-1] == as_of - hd and cuts[-2] == as_of - 2 * hd
    assert cuts[-2] + hd == cuts[-1]  # validation labels end exactly at the test cutoff
    assert all(c + hd <= cuts[-2] for c in cuts[:-2])
    assert all(c + hd <= as_of for c in cuts)
    assert all((b - a).days == step for a, b in itertools.pairwise(cuts[:-2]))
    assert (cuts[-2] - cuts[-3]).days < h + step  # training starts as late as the windows allow
    with pytest.raises(ValueError):
        cutoffs_for(as_of, dataclasses.replace(cfg, n_cutoffs=2))


def test_training_cutoffs_sample_customers_past_the_row_cap():
    as_of = T0 + dt.timedelta(days=56)
    cfg = dataclasses.replace(MODEL, n_cutoffs=4, max_train_rows=60)
    frame = build_training_sets(BASE, as_of, ["upsell"], cfg=cfg, index=BASE_INDEX)["upsell"]
    cuts = cutoffs_for(as_of, cfg)

    def full_at(cutoff):
        return build_examples(None, cutoff, "upsell", context=FeatureContext.build(BASE_INDEX, cutoff))

    full = full_at(cuts[0])
    sampled = frame[frame["cutoff"] == cuts[0]]
    assert 0 < len(sampled) < len(full)
    # a stable sample: whole customers, and the same customers at both training cutoffs
    kept = set(sampled["customer_id"])
    assert len(sampled) == full["customer_id"].isin(kept).sum()
    both = set(full["customer_id"]) & set(full_at(cuts[1])["customer_id"])
    later = set(frame.loc[frame["cutoff"] == cuts[1], "customer_id"])
    assert later & both == kept & both
    pd.testing.assert_frame_equal(frame[frame["cutoff"] == cuts[-1]].reset_index(drop=True),
                                  full_at(cuts[-1]))


def test_large_shops_build_the_training_set_on_a_logged_customer_sample():
    as_of = T0 + dt.timedelta(days=56)
    cfg = dataclasses.replace(MODEL, n_cutoffs=4, max_train_customers=20)
    frames = build_training_sets(BASE, as_of, ["cross_sell", "upsell"], cfg=cfg)
    ids = BASE.customers["customer_id"].astype("string")
    expected = set(ids[customer_fraction(ids, cfg.sample_salt) < 20 / 40])
    assert 0 < len(expected) < 40
    for frame in frames.values():
        s = frame.attrs["sampling"]
        assert s["population_customers"] == 40 and s["sample_customers"] == len(expected)
        assert s["customer_share"] == pytest.approx(0.5) and s["salt"] == cfg.sample_salt
        assert set(frame["customer_id"]) <= expected  # nobody outside the sample, at any cutoff
    # The sample is drawn before any feature: the examples equal those of a shop holding only the
    # sampled customers (features of the sampled customers never read the others' rows).
    small = Shop({**BASE.tables,
                  "customers": BASE.customers[ids.isin(expected).to_numpy()],
                  "orders": BASE.orders[BASE.orders["customer_id"].isin(expected)],
                  "offer_history": BASE.offer_history[BASE.offer_history["customer_id"].isin(expected)]})
    small = Shop({**small.tables, "order_lines": BASE.order_lines[
        BASE.order_lines["order_id"].isin(small.orders["order_id"])]})
    everyone = dataclasses.replace(cfg, max_train_customers=10**6)
    direct = build_training_sets(small, as_of, ["upsell"], everyone)["upsell"]
    pd.testing.assert_frame_equal(frames["upsell"], direct)
    # nested: a sampled cut of the training cutoffs keeps a subset of the same customers
    capped = build_training_sets(BASE, as_of, ["upsell"], cfg=dataclasses.replace(cfg, max_train_rows=10))
    s = capped["upsell"].attrs["sampling"]
    assert s["train_customer_share"] < s["customer_share"]
    train = capped["upsell"][capped["upsell"]["cutoff"] < cutoffs_for(as_of, cfg)[-2]]
    assert set(train["customer_id"]) <= {c for c in expected
                                         if customer_fraction(pd.Series([c]), cfg.sample_salt)[0]
                                         < s["train_customer_share"]}


@pytest.mark.parametrize("offer_type", OFFER_TYPES)
def test_examples_for_a_customer_subset_equal_the_full_rows_of_those_customers(offer_type):
    ctx = FeatureContext.build(BASE_INDEX, T0)
    full = build_examples(None, T0, offer_type, context=ctx)
    keep = np.arange(BASE_INDEX.n_customers) % 3 == 1  # e.g. one scoring shard
    part = build_examples(None, T0, offer_type, context=ctx, customers=keep)
    chosen = set(BASE_INDEX.customer_ids[keep])
    assert 0 < len(part) < len(full)
    pd.testing.assert_frame_equal(part, full[full["customer_id"].isin(chosen)].reset_index(drop=True))
    with pytest.raises(ValueError, match="entries"):
        build_examples(None, T0, offer_type, context=ctx, customers=keep[:-1])


def test_a_closed_index_keeps_its_contexts_and_refuses_queries():
    index = ShopIndex(BASE)
    ctx = FeatureContext.build(index, T0)
    index.close()
    assert index.closed
    pd.testing.assert_frame_equal(build_examples(None, T0, "upsell", with_labels=False, context=ctx),
                                  build_examples(None, T0, "upsell", with_labels=False,
                                                 context=FeatureContext.build(BASE_INDEX, T0)))
    with pytest.raises(RuntimeError, match="closed"):
        FeatureContext.build(index, T0)
    index.close()  # twice is fine
