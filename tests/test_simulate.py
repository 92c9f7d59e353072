"""The synthetic shop: contract-valid, deterministic, with real structure and a calibrated oracle."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from ml import simulate
from ml.contract import CONTACT_CHANNELS, OFFER_TYPES, coerce_table, load_source
from ml.simulate import CATEGORIES, FAMILY_OF_CATEGORY, TIERS, run_simulation, simulate_shop, simulate_to

START = dt.date(2025, 1, 1)
DAYS = 365


def isin(values: pd.Series, allowed: pd.Series) -> np.ndarray:
    """Hash lookup; pandas 3.1's Arrow-string ``isin`` loops in Python over ``allowed``."""
    return pd.Index(allowed.unique()).get_indexer(values) >= 0


@pytest.fixture(scope="module")
def sim() -> simulate.Simulation:
    return run_simulation(1500, days=DAYS, seed=3, start=START)


@pytest.fixture(scope="module")
def shop(sim) -> dict[str, pd.DataFrame]:
    return {name: coerce_table(name, df) for name, df in sim.tables.items()}


@pytest.fixture(scope="module")
def lines(shop, sim) -> pd.DataFrame:
    """Order lines with their order, customer, category and generating tier."""
    tier = sim.product_tier.astype("string").rename("tier").reset_index()
    return (shop["order_lines"].merge(shop["orders"], on="order_id")
            .merge(shop["products"], on="product_id").merge(tier, on="product_id"))


def test_same_seed_same_shop_other_seed_other_shop():
    a_tables, a_truth = simulate_shop(300, days=120, seed=5)
    b_tables, b_truth = simulate_shop(300, days=120, seed=5)
    for name in a_tables:
        pd.testing.assert_frame_equal(a_tables[name], b_tables[name])
    pd.testing.assert_frame_equal(a_truth, b_truth)
    c_tables, _ = simulate_shop(300, days=120, seed=6)
    assert not a_tables["orders"]["order_ts"].equals(c_tables["orders"]["order_ts"])


def test_tables_coerce_and_follow_the_contract_rules(shop):
    end = pd.Timestamp(START + dt.timedelta(days=DAYS))
    cust, prod, orders, lines = shop["customers"], shop["products"], shop["orders"], shop["order_lines"]
    cons, offers = shop["consents"], shop["offer_history"]
    assert cust["customer_id"].is_unique and cust["customer_id"].notna().all()
    assert prod["product_id"].is_unique and orders["order_id"].is_unique and offers["offer_id"].is_unique
    assert cust["customer_id"].str.fullmatch(r"C\d{7}").all()
    assert (prod["price"] > 0).all()
    cost = prod["unit_cost"].dropna()
    assert ((cost >= 0) & (cost <= prod.loc[cost.index, "price"])).all()
    assert (lines["quantity"] > 0).all() and (lines["unit_price"] >= 0).all()
    assert isin(orders["customer_id"], cust["customer_id"]).all()
    assert isin(lines["order_id"], orders["order_id"]).all()
    assert isin(lines["product_id"], prod["product_id"]).all()
    assert isin(orders["order_id"], lines["order_id"]).all()  # no empty baskets
    for df, col in ((orders, "order_ts"), (cons, "updated_at"), (offers, "sent_at"), (cust, "signup_date")):
        assert (df[col] < end).all(), col
    assert (orders["order_ts"] >= pd.Timestamp(START)).all()
    assert set(orders["channel"]) <= {"web", "app", "store", "phone"}
    assert set(cons["channel"]) <= set(CONTACT_CHANNELS) and set(offers["channel"]) <= set(CONTACT_CHANNELS)
    assert set(offers["offer_type"]) == set(OFFER_TYPES)
    assert isin(offers["customer_id"], cust["customer_id"]).all()
    assert isin(offers["product_id"], prod["product_id"]).all()
    assert set(prod["category"]) == set(CATEGORIES)
    # Orders only after signup.
    signup = orders.merge(cust, on="customer_id")
    assert (signup["order_ts"] >= signup["signup_date"]).all()


def test_every_offer_went_to_a_channel_consented_at_send_time(shop):
    offers = shop["offer_history"].sort_values("sent_at")
    cons = shop["consents"].sort_values("updated_at")
    latest = pd.merge_asof(offers, cons, left_on="sent_at", right_on="updated_at",
                           by=["customer_id", "channel"], direction="backward")
    assert latest["granted"].fillna(False).astype(bool).all()


def test_valid_edge_cases_are_present(shop, lines):
    cust, prod, cons = shop["customers"], shop["products"], shop["consents"]
    assert (~isin(cust["customer_id"], shop["orders"]["customer_id"])).sum() > 0  # never ordered
    assert (~isin(prod["product_id"], lines["product_id"])).sum() > 0  # never sold
    inactive = prod.loc[~prod["active"].astype(bool), "product_id"]
    assert isin(inactive, lines["product_id"]).any()  # inactive, with history
    assert prod["unit_cost"].isna().any() and (prod["unit_cost"] == prod["price"]).any()
    assert (lines["unit_price"] == 0).any()  # free samples
    assert (lines["unit_price"].between(0.01, lines["price"] - 0.01)).any()  # bought on discount
    no_consent = ~isin(cust["customer_id"], cons["customer_id"])
    assert 0.2 < no_consent.mean() < 0.6  # no row = no consent, a sizeable share
    per = cons.sort_values("updated_at").groupby(["customer_id", "channel"], observed=True)["granted"]
    assert ((per.first() == True) & (per.last() == False)).any()  # noqa: E712 - granted, then revoked
    assert cust["email"].dropna().str.fullmatch(r"c\d{7}@example\.com").all()
    assert cust["birth_year"].isna().any() and cust["signup_date"].min() < pd.Timestamp(START)
    assert cust["signup_date"].max() >= pd.Timestamp(START)  # tenure: before and during the period


def test_price_terciles_recover_the_tiers(shop, sim):
    prod = shop["products"].set_index("product_id")
    rank = prod.groupby("category", observed=True)["price"].rank(method="first", pct=True)
    tercile = np.ceil(rank * 3).astype(int) - 1
    truth = sim.product_tier.cat.codes.reindex(prod.index)
    assert (tercile == truth).all()


def test_category_families_give_co_purchase_lift(lines):
    owned = pd.crosstab(lines["customer_id"], lines["category"]).gt(0).astype(float)
    n = len(owned)
    both = owned.T @ owned / n
    p = owned.mean()
    lift = both / np.outer(p, p)
    fam = pd.Series(FAMILY_OF_CATEGORY)[lift.index]
    same = fam.to_numpy()[:, None] == fam.to_numpy()[None, :]
    off_diag = ~np.eye(len(fam), dtype=bool)
    within = lift.to_numpy()[same & off_diag].mean()
    across = lift.to_numpy()[~same].mean()
    assert within > 1.5 and across < 1.2 and within > across + 0.4, (within, across)


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Rank correlation without pandas' scipy import (seconds on a busy machine)."""
    return float(a.rank().corr(b.rank()))


def test_price_sensitive_customers_buy_more_budget(lines, sim):
    share = lines.assign(b=lines["tier"] == "budget").groupby("customer_id")["b"].agg(["mean", "size"])
    share = share[share["size"] >= 5].join(sim.latent.set_index("customer_id")["price_sensitivity"])
    q = share["price_sensitivity"].quantile([0.25, 0.75])
    high = share.loc[share["price_sensitivity"] >= q[0.75], "mean"].mean()
    low = share.loc[share["price_sensitivity"] <= q[0.25], "mean"].mean()
    assert high > low + 0.2, (high, low)
    assert spearman(share["mean"], share["price_sensitivity"]) > 0.4
    # ... and they buy on discount more often.
    below_list = lines["unit_price"].between(0.01, lines["price"] - 0.01)
    disc = lines.assign(d=below_list).groupby("customer_id")["d"].mean().to_frame()
    disc = disc.join(sim.latent.set_index("customer_id")["price_sensitivity"])
    assert spearman(disc["d"], disc["price_sensitivity"]) > 0.2


def test_customers_trade_down_before_churn_and_some_trade_up(lines, sim):
    lat = sim.latent.set_index("customer_id")
    day = (lines["order_ts"] - pd.Timestamp(START)).dt.days
    df = lines.assign(day=day.to_numpy(), budget=(lines["tier"] == "budget").to_numpy(),
                      premium=(lines["tier"] == "premium").to_numpy()).join(lat, on="customer_id")
    declined = df[df["decline_day"] < DAYS]
    before = declined.loc[declined["day"] < declined["decline_day"], "budget"].mean()
    after = declined.loc[declined["day"] >= declined["decline_day"], "budget"].mean()
    assert after > before + 0.1, (before, after)
    # Customers who trade up buy more premium in the second half of the year than the others do.
    def premium_gain(part: pd.DataFrame) -> float:
        late = part["day"] >= DAYS // 2
        return part.loc[late, "premium"].mean() - part.loc[~late, "premium"].mean()

    stayed = df[df["decline_day"] >= DAYS]
    up_gain = premium_gain(stayed[stayed["trade_up"] > 0])
    flat_gain = premium_gain(stayed[stayed["trade_up"] == 0])
    assert up_gain > flat_gain + 0.05, (up_gain, flat_gain)


def roc_auc_score(y: pd.Series, score: pd.Series) -> float:
    """Mann-Whitney AUC with average ranks for ties (sklearn's import alone costs seconds)."""
    y = np.asarray(y, dtype=bool)
    ranks = pd.Series(np.asarray(score, dtype=float)).rank().to_numpy()
    n1, n0 = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_auc_helper_matches_the_definition():
    assert roc_auc_score(pd.Series([0, 0, 1, 1]), pd.Series([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc_score(pd.Series([0, 1]), pd.Series([0.5, 0.5])) == 0.5


def _realised(lines: pd.DataFrame, truth: pd.DataFrame, cutoff: pd.Timestamp, horizon: int) -> pd.DataFrame:
    win = lines[(lines["order_ts"] >= cutoff) & (lines["order_ts"] < cutoff + pd.Timedelta(days=horizon))]
    tier_no = win["tier"].map({t: i for i, t in enumerate(TIERS)}).astype(int)
    key = ["customer_id", "category"]
    gt = truth.assign(customer_id=truth["customer_id"].astype("string"),
                      category=truth["category"].astype("string"))
    win = win.assign(customer_id=win["customer_id"].astype("string"),
                     category=win["category"].astype("string"), t=tier_no)
    y = win.groupby(key)["t"].agg(["min", "max"]).reset_index()
    gt = gt.merge(y, on=key, how="left")
    usual = gt["usual_tier"].map({t: i for i, t in enumerate(TIERS)}).astype(float)
    gt["y_buy"] = gt["max"].notna()
    gt["y_up"] = gt["max"] > usual
    gt["y_down"] = gt["min"] < usual
    return gt


def test_ground_truth_is_complete_and_calibrated(sim, lines, shop):
    truth = sim.ground_truth
    cutoff = pd.Timestamp(sim.cutoff)
    assert sim.cutoff == START + dt.timedelta(days=DAYS - 28)
    assert (truth["cutoff"] == cutoff).all() and (truth["horizon_days"] == 28).all()
    existing = shop["customers"].loc[shop["customers"]["signup_date"] < cutoff, "customer_id"]
    assert len(truth) == len(existing) * len(CATEGORIES)
    assert set(truth["customer_id"].astype(str)) == set(existing)
    assert not truth.duplicated(["customer_id", "category"]).any()
    assert truth["p_buy"].between(0, 1).all()
    gt = _realised(lines, truth, cutoff, 28)
    assert abs(gt["p_buy"].mean() - gt["y_buy"].mean()) < 0.01
    # Per decile of p_buy the realised rate matches (no sign of a realised-future leak: not 0/1).
    bins = pd.qcut(gt["p_buy"], 10, duplicates="drop")
    by = gt.groupby(bins, observed=True)[["p_buy", "y_buy"]].mean()
    assert (by["p_buy"] - by["y_buy"]).abs().max() < 0.04, by
    assert roc_auc_score(gt["y_buy"], gt["p_buy"]) > 0.85
    before = lines[lines["order_ts"] < cutoff][["customer_id", "category"]].drop_duplicates()
    assert gt["bought_before"].sum() == len(before)
    never = gt[~gt["bought_before"]]
    assert roc_auc_score(never["y_buy"], never["p_buy"]) > 0.75  # cross-sell is learnable
    has_usual = gt["usual_tier"].notna()
    assert gt.loc[has_usual, "p_up"].notna().all() and gt.loc[~has_usual, "p_up"].isna().all()
    for k in ("up", "down"):
        sub = gt[has_usual]
        assert abs(sub[f"p_{k}"].mean() - sub[f"y_{k}"].mean()) < 0.02, k
        assert roc_auc_score(sub[f"y_{k}"], sub[f"p_{k}"]) > 0.75, k


def test_offers_have_the_configured_causal_effect(monkeypatch):
    def conversion(uplift: float) -> float:
        monkeypatch.setattr(simulate, "TRUE_UPLIFT", dict.fromkeys(OFFER_TYPES, uplift))
        tables, _ = simulate_shop(1200, days=150, seed=11)
        off, orders, lines = tables["offer_history"], tables["orders"], tables["order_lines"]
        bought = lines.merge(orders, on="order_id")[["customer_id", "product_id", "order_ts"]]
        m = off.astype({"product_id": "string"}).merge(bought.astype({"product_id": "string"}),
                                                       on=["customer_id", "product_id"])
        hit = m[(m["order_ts"] > m["sent_at"]) & (m["order_ts"] < m["sent_at"] + pd.Timedelta(days=29))]
        return hit["offer_id"].nunique() / len(off)

    base, treated = conversion(0.0), conversion(0.8)
    assert treated - base > 0.6 * (1 - base), (base, treated)


def test_written_shop_round_trips_through_the_contract(tmp_path):
    summary = simulate_to(tmp_path / "shop", customers=300, days=120, seed=2)
    loaded = load_source(tmp_path / "shop")
    tables, truth = simulate_shop(300, days=120, seed=2)
    for name, df in tables.items():
        assert len(loaded[name]) == len(df), name
        pd.testing.assert_frame_equal(loaded[name], coerce_table(name, df), check_categorical=False)
    gt = pd.read_parquet(tmp_path / "shop" / "ground_truth.parquet")
    pd.testing.assert_frame_equal(gt, truth)
    assert "ground truth" in summary.lower() and "peak RSS" in summary and "cutoff 2025-04-03" in summary


# ------------------------------------------------------------------ offers from outside, behaviour shift
def _hash(df: pd.DataFrame) -> str:
    import hashlib

    return hashlib.sha256(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes()
                          + str(list(df.dtypes)).encode() + str(list(df.columns)).encode()).hexdigest()[:16]


def test_default_output_is_unchanged_by_the_options():
    """The model-quality test's thin oracle margin rests on this exact shop: hashes from before the
    external-offer and shift options existed (1,500 customers, 150 days, seed 3, horizon 21)."""
    sim = run_simulation(1500, days=150, seed=3, horizon_days=21)
    got = {k: _hash(v) for k, v in sim.tables.items()}
    got["ground_truth"] = _hash(sim.ground_truth)
    assert got == {"customers": "258cb1a5f3e6ad49", "products": "a9b589e88e0baa34",
                   "orders": "183cd5107dba95a2", "order_lines": "5bd37e49f1f8f86e",
                   "consents": "516b65e96cc08401", "offer_history": "efb6f16f454ee0e1",
                   "ground_truth": "a2ee99d41f6877aa"}
    assert sim.external_truth is None


def _external(base: simulate.Simulation, n: int, seed: int, control_share: float = 0.5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    customers = base.tables["customers"]["customer_id"].astype(str)
    products = base.tables["products"]["product_id"].astype(str)
    return pd.DataFrame({"customer_id": rng.choice(customers, n, replace=False),
                         "product_id": rng.choice(products, n),
                         "offer_type": rng.choice(list(OFFER_TYPES), n), "channel": "email",
                         "valid_from": pd.Timestamp(base.cutoff),
                         "is_control": rng.random(n) < control_share})


def test_external_offers_leave_the_past_alone_and_only_add_answers():
    base = run_simulation(2000, days=120, seed=4)
    offers = _external(base, 1500, seed=1)
    with_offers = run_simulation(2000, days=120, seed=4, external_offers=offers)
    zero = run_simulation(2000, days=120, seed=4, external_offers=offers, external_uplift=dict.fromkeys(
        OFFER_TYPES, 0.0))
    d = pd.Timestamp(base.cutoff)
    for sim in (with_offers, zero):
        for name in ("customers", "products", "consents"):
            pd.testing.assert_frame_equal(base.tables[name], sim.tables[name])
        o = sim.tables["orders"]
        pd.testing.assert_frame_equal(base.tables["orders"].query("order_ts < @d"), o[o["order_ts"] < d])
        pd.testing.assert_frame_equal(base.ground_truth, sim.ground_truth)
        hist = sim.tables["offer_history"]
        sent = hist[hist["sent_at"] >= d]  # the shop's own campaigns stopped at the cutoff
        assert len(sent) == int((~offers["is_control"]).sum())
        assert set(sent["customer_id"]) == set(offers.loc[~offers["is_control"], "customer_id"])
        assert (sent["sent_at"].dt.normalize() == d).all()
    # zero uplift: the very same orders; with uplift: the same plus answers (the offered products, after D)
    pd.testing.assert_frame_equal(base.tables["orders"], zero.tables["orders"])
    extra = with_offers.tables["orders"].merge(base.tables["orders"], how="left", indicator=True,
                                               on=["customer_id", "order_ts", "channel"])
    extra = extra[extra["_merge"] == "left_only"]
    assert len(extra) > 0 and (extra["order_ts"] > d).all()
    assert set(extra["customer_id"]) <= set(offers.loc[~offers["is_control"], "customer_id"])
    truth = with_offers.external_truth
    assert len(truth) == len(offers.drop_duplicates(["customer_id", "offer_type"]))
    assert (truth["p_treated"] >= truth["p_control"] - 1e-12).all()
    assert (zero.external_truth["p_treated"] == zero.external_truth["p_control"]).all()


def test_external_truth_is_the_realised_conversion_in_expectation():
    """Everyone offered at D: the realised share converting in the offered category within [D, D + H)
    matches the oracle's mean probability, treated (with exposure) and control (without)."""
    n = 12_000
    base = run_simulation(n, days=120, seed=9)
    offers = _external(base, n, seed=2)
    sim = run_simulation(n, days=120, seed=9, external_offers=offers)
    t = sim.tables
    lines = t["order_lines"].astype({"product_id": "string"}).merge(t["orders"], on="order_id").merge(
        t["products"][["product_id", "category"]].astype({"product_id": "string"}), on="product_id")
    d = pd.Timestamp(base.cutoff)
    window = lines[(lines["order_ts"] >= d) & (lines["order_ts"] < d + pd.Timedelta(days=28))]
    bought = set(zip(window["customer_id"].astype(str), window["category"].astype(str), strict=True))
    o = offers.merge(t["products"][["product_id", "category"]].astype(str), on="product_id")
    o["converted"] = [(c, k) in bought for c, k in zip(o["customer_id"], o["category"], strict=True)]
    m = o.merge(sim.external_truth.astype({"customer_id": str, "offer_type": str}),
                on=["customer_id", "offer_type"], suffixes=("", "_truth"))
    assert len(m) == n
    for control, g in m.groupby("is_control"):
        p = g["p_control"] if control else g["p_treated"]
        se = float(np.sqrt((p * (1 - p)).sum()) / len(g))
        assert abs(g["converted"].mean() - p.mean()) < 4 * se, (control, g["converted"].mean(), p.mean(), se)
    treated = m[~m["is_control"]]
    effect = (treated["p_treated"] - treated["p_control"]).groupby(treated["offer_type"]).mean()
    # u·(1 − p0) per type, a little less (28 − 1 answer days in the window, churn)
    for k, u in simulate.TRUE_UPLIFT.items():
        assert 0.5 * u < effect[k] < u, (k, effect[k])


def test_a_behaviour_shift_changes_prices_and_tastes_from_its_start_only():
    start = dt.date(2025, 1, 1)
    base = run_simulation(3000, days=150, seed=5, start=start)
    when = start + dt.timedelta(days=90)
    shift = simulate.BehaviourShift(when, price_factor={"Coffee": 1.5},
                                    affinity_delta={"Pets": 2.5, "Baby": -2.5})
    shifted = run_simulation(3000, days=150, seed=5, start=start, shift=shift)
    t0 = pd.Timestamp(when)
    pd.testing.assert_frame_equal(base.tables["orders"].query("order_ts < @t0"),
                                  shifted.tables["orders"].query("order_ts < @t0"))

    def lines(sim):
        t = sim.tables
        x = t["order_lines"].merge(t["orders"], on="order_id").astype({"product_id": "string"})
        return x.merge(t["products"][["product_id", "category"]].astype({"product_id": "string"}),
                       on="product_id")

    a, b = lines(base), lines(shifted)
    coffee = b[(b["category"] == "Coffee") & (b["unit_price"] > 0)]
    ref = a[(a["category"] == "Coffee") & (a["unit_price"] > 0)]
    assert coffee[coffee["order_ts"] >= t0]["unit_price"].median() > 1.3 * ref["unit_price"].median()
    after_a, after_b = a[a["order_ts"] >= t0], b[b["order_ts"] >= t0]
    family = after_b["category"].astype(str).map(FAMILY_OF_CATEGORY)
    family_a = after_a["category"].astype(str).map(FAMILY_OF_CATEGORY)
    assert (family == "Pets").mean() > 1.3 * (family_a == "Pets").mean()
    assert (family == "Baby").mean() < 0.8 * (family_a == "Baby").mean()
    with pytest.raises(ValueError, match="unknown category"):
        run_simulation(100, days=60, seed=1, shift=simulate.BehaviourShift(start, {"Beer": 2.0}))
