"""Monitoring: PSI/KS drift against the stored training reference, outcomes (uplift) of closed CRM batches."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from tinyshop import T0, day, make_shop

from ml import crm
from ml.model import drift_reference
from ml.monitor import (
    MonitorConfig,
    drift_retrain_reasons,
    drift_status,
    feature_drift,
    outcomes,
    read_outcomes,
    uplift_ci,
    uplift_decay,
    write_outcomes,
)

OK = lambda df: []  # noqa: E731 - accept any batch (the output suite is tested elsewhere)
EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


# ------------------------------------------------------------------------------------------- drift
def frame(n: int, seed: int, shift: float = 0.0, cats: tuple[float, ...] = (0.5, 0.3, 0.2),
          missing: float = 0.05) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, n)
    x[rng.random(n) < missing] = np.nan
    counts = rng.poisson(2.0 + shift, n).astype("float64")  # a discrete feature (ties at the edges)
    channel = rng.choice(["web", "app", "store"], n, p=list(cats))
    return pd.DataFrame({"x": x, "counts": counts, "channel": pd.array(channel, dtype="string")})


def fake_model(train: pd.DataFrame, offer_type: str = "cross_sell") -> SimpleNamespace:
    """What feature_drift needs of an OfferModel: reference, offer_type, predict_proba."""
    def score(df: pd.DataFrame) -> np.ndarray:
        return 1 / (1 + np.exp(-np.nan_to_num(pd.to_numeric(df["x"]).to_numpy("float64"))))

    ref = drift_reference(train, score(train), categorical=["channel"])
    return SimpleNamespace(reference=ref, offer_type=offer_type, predict_proba=score)


def test_psi_is_near_zero_for_the_same_distribution():
    model = fake_model(frame(20_000, seed=1))
    table = feature_drift(model, frame(20_000, seed=2))
    assert list(table["feature"]) == ["x", "counts", "channel", "score"]
    assert (table["psi"] < 0.01).all(), table
    assert (table.loc[table["kind"] != "categorical", "ks"] < 0.02).all(), table
    assert (table["status"] == "ok").all()
    assert drift_status(table) == ("ok", [])


def test_psi_and_ks_are_large_for_a_shifted_numeric_distribution():
    model = fake_model(frame(20_000, seed=1))
    table = feature_drift(model, frame(20_000, seed=2, shift=1.0)).set_index("feature")
    for f in ("x", "counts", "score"):
        assert table.loc[f, "psi"] > 0.25 and table.loc[f, "status"] == "alert"
    # true KS of N(0,1) vs N(1,1) is 0.383; the reference's percentile grid measures it closely
    assert table.loc["x", "ks_points"] > 90
    assert abs(table.loc["x", "ks"] - 0.383) < 0.03
    assert table.loc["x", "top_bin"].startswith(">")  # the mass moved to the top bin
    assert table.loc["channel", "status"] == "ok"


def test_psi_is_large_for_shifted_categories_and_unseen_ones():
    model = fake_model(frame(20_000, seed=1))
    shifted = feature_drift(model, frame(20_000, seed=2, cats=(0.2, 0.3, 0.5))).set_index("feature")
    assert shifted.loc["channel", "psi"] > 0.25 and shifted.loc["channel", "status"] == "alert"
    assert np.isnan(shifted.loc["channel", "ks"])  # no KS for categories
    assert shifted.loc["x", "status"] == "ok"
    unseen = frame(5_000, seed=3)
    unseen.loc[: 2_000, "channel"] = "kiosk"  # a channel never seen in training → the "other" bin
    t = feature_drift(model, unseen).set_index("feature")
    assert t.loc["channel", "status"] == "alert" and t.loc["channel", "top_bin"] == "(other)"


def test_a_feature_going_missing_is_drift():
    model = fake_model(frame(20_000, seed=1))
    cur = frame(5_000, seed=2)
    cur["counts"] = np.nan
    t = feature_drift(model, cur).set_index("feature")
    assert t.loc["counts", "status"] == "alert" and t.loc["counts", "top_bin"] == "missing"
    assert t.loc["counts", "missing_cur"] == 1.0


def test_too_few_rows_are_not_judged_and_a_finer_reference_grid_is_used():
    model = fake_model(frame(20_000, seed=1))
    t = feature_drift(model, frame(50, seed=2, shift=3.0), MonitorConfig(min_rows=100))
    assert (t["status"] == "n/a").all()
    assert drift_status(t) == ("ok", [])
    # A reference with a fine CDF grid (what ml.model should add): KS gets close to the exact value.
    train = frame(20_000, seed=1)
    v = train["x"].dropna().to_numpy()
    q = np.unique(np.quantile(v, np.linspace(0, 1, 101)))
    cdf = np.searchsorted(np.sort(v), q, side="right") / len(v)
    model.reference["features"]["x"].update(quantiles=q.tolist(), cdf=cdf.tolist())
    fine = feature_drift(model, frame(20_000, seed=2, shift=1.0)).set_index("feature")
    assert fine.loc["x", "ks_points"] == 101
    assert abs(fine.loc["x", "ks"] - 0.383) < 0.02


def test_ks_of_a_mostly_missing_feature_is_not_judged_but_its_psi_is():
    """A few dozen non-missing values give a noisy KS; the missing share is PSI's (and still judged)."""
    train = frame(20_000, seed=1, missing=0.99)
    model = fake_model(train)
    cur = frame(20_000, seed=2, missing=0.99, shift=0.5)  # ~200 values, shifted: a real KS of 0.2
    cfg = MonitorConfig(min_rows=1_000)
    t = feature_drift(model, cur, cfg).set_index("feature")
    assert t.loc["x", "ks"] > cfg.ks_alert and t.loc["x", "psi"] < cfg.psi_warn
    assert t.loc["x", "status"] == "ok"
    assert feature_drift(model, cur, MonitorConfig(min_rows=100)).set_index("feature").loc["x", "status"] \
        == "alert"  # enough values: KS counts


def test_exempt_features_are_reported_but_raise_neither_status_nor_retraining():
    t = pd.DataFrame({"offer_type": "upsell", "kind": "numeric",
                      "feature": ["days_since_first_order", "cat_buyers_share_90d", "a", "b"],
                      "psi": [2.4, 1.6, 0.3, 0.02], "ks": [0.6, 0.2, 0.1, 0.0], "top_bin": "",
                      "status": ["alert", "alert", "alert", "ok"]})
    cfg = MonitorConfig()
    assert drift_status(t, cfg.exempt_features)[0] == "alert"  # "a" is still an alert
    assert drift_status(t.iloc[[0, 1, 3]], cfg.exempt_features) == ("ok", [])
    assert drift_status(t.iloc[[0, 1, 3]])[0] == "alert"  # without the exemption they would count
    assert drift_retrain_reasons(t, cfg) == []  # 1 counted alert < min_alert_features
    three = pd.concat([t, t.iloc[[2]].assign(feature="c"), t.iloc[[2]].assign(feature="d")])
    [why] = drift_retrain_reasons(three, cfg)
    assert "3 features" in why and "days_since_first_order" not in why
    assert drift_retrain_reasons(t, MonitorConfig(exempt_features=())) != []


def test_drift_status_escalates():
    base = pd.DataFrame({"offer_type": "upsell", "feature": ["a", "b", "cat_orders_90d"],
                         "psi": [0.01, 0.02, 0.03], "ks": [0.0, 0.0, 0.0], "top_bin": "",
                         "status": ["ok", "ok", "ok"]})
    assert drift_status(base) == ("ok", [])
    warn = base.assign(psi=[0.01, 0.15, 0.03], status=["ok", "warn", "ok"])
    status, reasons = drift_status(warn)
    assert status == "warn" and len(reasons) == 1 and reasons[0].startswith("upsell/b PSI 0.15")
    alert = base.assign(psi=[0.01, 0.15, 0.31], status=["ok", "warn", "alert"])
    status, reasons = drift_status(alert)
    assert status == "alert" and reasons[0].startswith("upsell/cat_orders_90d PSI 0.31")
    assert "[alert]" in reasons[0] and "[warn]" in reasons[1]
    assert drift_status(pd.DataFrame(columns=base.columns)) == ("ok", [])


# --------------------------------------------------------------------------------- the statistics
def test_newcombe_interval_matches_the_published_example():
    """Newcombe (1998), Stat Med 17:873, table II: 56/70 − 48/80, method 10 → (0.0524, 0.3339)."""
    ci = uplift_ci(56, 70, 48, 80)
    assert ci["uplift_abs"][0] == pytest.approx(0.2)
    assert ci["uplift_ci_low"][0] == pytest.approx(0.0524, abs=5e-4)
    assert ci["uplift_ci_high"][0] == pytest.approx(0.3339, abs=5e-4)
    zero = uplift_ci(0, 50, 0, 50)  # Wald would collapse to [0, 0]
    assert zero["uplift_ci_low"][0] < 0 < zero["uplift_ci_high"][0]
    assert np.isnan(zero["uplift_rel"][0])


@pytest.mark.parametrize("p_control, uplift", [(0.05, 0.02), (0.20, 0.0), (0.02, 0.10)])
def test_ci_covers_the_true_uplift(p_control, uplift):
    rng = np.random.default_rng(11)
    n_t, n_c = 200_000, 20_000  # a 10% control group, as the policy draws it
    ci = uplift_ci(rng.binomial(n_t, p_control + uplift), n_t, rng.binomial(n_c, p_control), n_c)
    assert ci["uplift_ci_low"][0] <= uplift <= ci["uplift_ci_high"][0]
    if uplift == 0:
        assert ci["uplift_ci_low"][0] <= 0 <= ci["uplift_ci_high"][0]
    else:
        assert ci["uplift_ci_low"][0] > 0  # n is large enough to see it
    p_t = p_control + uplift
    rel_true = p_t / p_control - 1
    assert ci["uplift_rel_ci_low"][0] <= rel_true <= ci["uplift_rel_ci_high"][0]


def test_ci_coverage_over_many_replicates_is_95_percent():
    rng = np.random.default_rng(5)
    reps, n_t, n_c = 4000, 2000, 300
    for p_c, u in ((0.05, 0.03), (0.10, 0.0)):
        ci = uplift_ci(rng.binomial(n_t, p_c + u, reps), n_t, rng.binomial(n_c, p_c, reps), n_c)
        covered = np.mean((ci["uplift_ci_low"] <= u) & (u <= ci["uplift_ci_high"]))
        assert 0.93 <= covered <= 0.975, (p_c, u, covered)


# ------------------------------------------------------------------------------------- outcomes
TREATED = [f"t{i}" for i in range(1, 7)]
CONTROL = [f"k{i}" for i in range(1, 5)]


def offer_rows(as_of: dt.date, rows: list[tuple]) -> pd.DataFrame:
    """rows: (customer_id, rank, offer_type, category, product_id, channel, is_control)."""
    df = pd.DataFrame(rows, columns=["customer_id", "rank", "offer_type", "category", "product_id", "channel",
                                     "is_control"])
    start = pd.Timestamp(as_of)
    return df.assign(propensity=0.2, expected_value=1.0, reason_codes="[]", segment="s",
                     valid_from=start, valid_until=start + pd.Timedelta(days=7),
                     model_version="offerflow-cross_sell/1")


def outcome_shop(sent: list[tuple] = ()):
    """Tea is offered to t1..t6 (treated, email) and k1..k4 (control); t1, t2 also get an upsell by sms."""
    o = [
        ("o1", "t1", day(3), "web", [("tea1", 1, None)]),
        ("o2", "t2", day(10), "web", [("tea0", 2, None)]),
        ("o3", "t3", day(27.9), "app", [("tea2", 1, None)]),  # last hours of the window
        ("o4", "t4", day(5), "web", [("cof1", 1, None)]),  # bought, but not the offered category
        ("o5", "t5", day(29), "web", [("tea1", 1, None)]),  # after the window closed
        ("o6", "k1", day(12), "web", [("tea1", 1, None)]),
        ("o7", "k2", day(-3), "web", [("tea1", 1, None)]),  # before the window
        ("o8", "t1", day(-40), "web", [("sna0", 1, None)]),
        ("o9", "t2", day(20), "web", [("sna2", 1, None)]),  # upsell conversion for t2
    ]
    return make_shop(o, customers=TREATED + CONTROL, offers=list(sent))


def publish_batches(url: str) -> dict[str, dt.date]:
    rows = [(c, 1, "cross_sell", "Tea", "tea1", "email", False) for c in TREATED]
    rows += [(c, 1, "cross_sell", "Tea", "tea1", "email", True) for c in CONTROL]
    rows += [(c, 2, "upsell", "Snacks", "sna2", "sms", False) for c in ("t1", "t2")]
    rows += [("k3", 2, "upsell", "Snacks", "sna2", "sms", True)]
    crm.publish(url, offer_rows(T0, rows), "b1", T0, {"cross_sell": "1"}, {}, validate=OK)
    later = T0 + dt.timedelta(days=14)  # its window closes at T0 + 42: not yet
    crm.publish(url, offer_rows(later, rows), "b2", later, {"cross_sell": "1"}, {}, validate=OK)
    return {"b1": T0, "b2": later}


@pytest.fixture
def crm_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    publish_batches(url)
    return url


def test_outcomes_of_a_hand_made_crm(crm_url):
    as_of = T0 + dt.timedelta(days=30)
    out = outcomes(crm_url, outcome_shop(), as_of)
    assert set(out["batch_id"]) == {"b1"}  # b2's window is still open
    assert "customer_id" not in out.columns
    by = out.set_index(["offer_type", "channel"])
    cs = by.loc[("cross_sell", "email")]
    assert cs["exposure"] == "assigned"
    assert (cs["n_treated"], cs["conv_treated"], cs["n_control"], cs["conv_control"]) == (6, 3, 4, 1)
    assert cs["rate_treated"] == pytest.approx(0.5) and cs["rate_control"] == pytest.approx(0.25)
    assert cs["uplift_abs"] == pytest.approx(0.25) and cs["uplift_rel"] == pytest.approx(1.0)
    assert cs["uplift_ci_low"] < 0.25 < cs["uplift_ci_high"]
    assert cs["margin_per_conversion"] == pytest.approx(8.0)  # tea1: 20 − 12
    assert cs["incr_margin_per_1000"] == pytest.approx(1000 * 0.25 * 8.0)
    assert cs["window_end"] == T0 + dt.timedelta(days=28) and cs["batch_as_of"] == T0
    up = by.loc[("upsell", "sms")]
    assert (up["n_treated"], up["conv_treated"], up["n_control"], up["conv_control"]) == (2, 1, 1, 0)
    # "all" channels per type: customers counted once
    assert by.loc[("cross_sell", "all"), "n_treated"] == 6
    assert list(out["channel"]) == ["email", "all", "sms", "all"]
    # Evaluated before b1's window closed: nothing to report.
    assert outcomes(crm_url, outcome_shop(), T0 + dt.timedelta(days=27)).empty
    # Later, both windows closed.
    later = outcomes(crm_url, outcome_shop(), T0 + dt.timedelta(days=42))
    assert list(dict.fromkeys(later["batch_id"])) == ["b1", "b2"]


def test_outcomes_count_only_sent_offers_when_the_crm_reports_them(crm_url):
    sent = [("t1", "tea1", day(1)), ("t2", "tea1", day(1)), ("t4", "tea1", day(2)),
            ("t1", "sna2", day(1)), ("t2", "sna2", day(3)),
            ("t6", "tea1", day(-20))]  # sent long before this batch: not this batch's exposure
    out = outcomes(crm_url, outcome_shop(sent), T0 + dt.timedelta(days=30))
    cs = out.set_index(["offer_type", "channel"]).loc[("cross_sell", "email")]
    assert cs["exposure"] == "sent"
    assert (cs["n_assigned"], cs["n_treated"], cs["conv_treated"]) == (6, 3, 2)
    assert (cs["n_control"], cs["conv_control"]) == (4, 1)
    assert cs["share_sent"] == pytest.approx(0.5)
    up = out.set_index(["offer_type", "channel"]).loc[("upsell", "sms")]
    assert (up["n_treated"], up["conv_treated"], up["share_sent"]) == (2, 1, 1.0)
    # A history that shows only a few of the batch's offers belongs to other campaigns: intent to treat.
    few = outcomes(crm_url, outcome_shop(sent[:2]), T0 + dt.timedelta(days=30))
    cs = few.set_index(["offer_type", "channel"]).loc[("cross_sell", "email")]
    assert cs["exposure"] == "assigned" and (cs["n_treated"], cs["conv_treated"]) == (6, 3)
    assert cs["share_sent"] == pytest.approx(2 / 6)


def test_an_empty_or_missing_crm_gives_no_outcomes(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert outcomes(url, outcome_shop(), T0 + dt.timedelta(days=60)).empty
    assert write_outcomes(url, outcomes(url, outcome_shop(), T0)) == 0
    assert read_outcomes(url).empty


def test_write_outcomes_is_an_idempotent_upsert(crm_url):
    first = outcomes(crm_url, outcome_shop(), T0 + dt.timedelta(days=30))
    assert write_outcomes(crm_url, first) == len(first) == 4
    assert write_outcomes(crm_url, first) == 4
    stored = read_outcomes(crm_url)
    assert len(stored) == 4 and not stored.duplicated(["batch_id", "offer_type", "channel"]).any()
    later = outcomes(crm_url, outcome_shop(), T0 + dt.timedelta(days=42))  # b1 again + b2
    write_outcomes(crm_url, later)
    stored = read_outcomes(crm_url)
    assert len(stored) == 8 and not stored.duplicated(["batch_id", "offer_type", "channel"]).any()
    row = stored.set_index(["batch_id", "offer_type", "channel"]).loc[("b1", "cross_sell", "email")]
    assert (row["n_treated"], row["conv_treated"]) == (6, 3)
    assert pd.Timestamp(row["evaluated_as_of"]).date() == T0 + dt.timedelta(days=42)
    # the CRM's own tables are untouched
    assert set(crm.list_batches(crm_url)["batch_id"]) == {"b1", "b2"}
    with sa.create_engine(crm_url).connect() as conn:
        cols = [c["name"] for c in sa.inspect(conn).get_columns("crm_offer_outcomes")]
    assert "customer_id" not in cols


@pytest.mark.postgres
def test_write_outcomes_on_postgres(pg_url):
    publish_batches(pg_url)
    out = outcomes(pg_url, outcome_shop(), T0 + dt.timedelta(days=30))
    write_outcomes(pg_url, out)
    write_outcomes(pg_url, out)
    stored = read_outcomes(pg_url)
    assert len(stored) == len(out) == 4
    cs = stored.set_index(["offer_type", "channel"]).loc[("cross_sell", "email")]
    assert (cs["n_treated"], cs["conv_treated"], cs["n_control"], cs["conv_control"]) == (6, 3, 4, 1)


def _outcome_series(uplifts: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    rows = []
    for i, (xt, nt, xc, nc) in enumerate(uplifts):
        ci = {k: v[0] for k, v in uplift_ci(xt, nt, xc, nc).items()}
        rows.append({"batch_id": f"b{i}", "batch_as_of": T0 + dt.timedelta(days=7 * i),
                     "offer_type": "cross_sell", "channel": "all", "n_treated": nt, "conv_treated": xt,
                     "n_control": nc, "conv_control": xc, **ci})
    return pd.DataFrame(rows)


def test_uplift_decay_triggers_retraining():
    steady = _outcome_series([(1000, 10_000, 50, 1000)] * 3)  # 10% vs 5%
    assert uplift_decay(steady) == []
    decayed = _outcome_series([(1000, 10_000, 50, 1000)] * 3 + [(560, 10_000, 50, 1000)])  # 5.6% vs 5%
    [why] = uplift_decay(decayed)
    assert why.startswith("cross_sell: uplift decayed")
    harmful = _outcome_series([(300, 10_000, 60, 1000)])  # 3% vs 6%: offers hurt
    [why] = uplift_decay(harmful)
    assert "below" in why
    tiny = _outcome_series([(0, 10, 5, 10)])  # too few customers to judge
    assert uplift_decay(tiny) == []


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_monitor_end_to_end(mlflow_store: Path):
    """Simulated shop → champion (cross_sell) → a published batch → monitor 35 days later."""
    import mlflow

    from ml.monitor import MONITOR_EXPERIMENT, monitor
    from ml.score import score
    from ml.simulate import simulate_to
    from ml.train import small_config, train_offer_types

    start, days = dt.date(2025, 1, 1), 200
    shop_dir = mlflow_store / "shop"
    simulate_to(shop_dir, customers=300, days=days, seed=3, start=start)
    as_of = start + dt.timedelta(days=days)
    scored_at = as_of - dt.timedelta(days=35)
    [result] = train_offer_types(str(shop_dir), scored_at, ["cross_sell"], cfg=small_config())
    from ml import registry

    if registry.champion_version("cross_sell") is None:
        registry.promote("cross_sell", result.version, "test")
    url = f"sqlite:///{mlflow_store / 'crm.db'}"
    published = score(str(shop_dir), scored_at, crm_url=url, offer_types=["cross_sell"])
    assert published.n_offers > 0

    res = monitor(str(shop_dir), as_of, crm_url=url)
    assert res.champions == {"cross_sell": "1"}
    assert set(res.skipped) == {"upsell", "downsell"}
    assert set(res.drift["offer_type"]) == {"cross_sell"} and "score" in set(res.drift["feature"])
    assert res.drift_status in ("ok", "warn", "alert")
    assert set(res.outcomes["batch_id"]) == {published.batch_id}
    assert (res.outcomes["n_treated"] + res.outcomes["n_control"] > 0).all()
    d = res.to_dict()
    assert isinstance(d["retrain"], bool) and d["why"]
    import json

    json.dumps(d, allow_nan=False)  # JSON-able, XCom-safe
    assert d["new_batches"] == [published.batch_id] and d["n_batches_measured"] == 1
    assert {r["offer_type"] for r in d["latest_outcomes"]} == {"cross_sell"}
    assert len(read_outcomes(url)) == len(res.outcomes)
    again = monitor(str(shop_dir), as_of, crm_url=url, log_mlflow=False)  # a closed window is final
    assert again.new_batches == [] and len(again.outcomes) == len(res.outcomes)
    assert len(read_outcomes(url)) == len(res.outcomes)

    run = mlflow.get_run(res.run_id)
    assert mlflow.get_experiment(run.info.experiment_id).name == MONITOR_EXPERIMENT
    assert run.data.tags["retrain"] == str(res.retrain).lower()
    assert any(k.startswith("psi.cross_sell.") for k in run.data.metrics)
    artifacts = {p.name for p in (mlflow_store / "mlartifacts").rglob("*") if p.is_file()}
    assert {"drift_table.csv", "outcomes.csv", "psi_cross_sell.png", "uplift_over_batches.png",
            "monitor_result.json"} <= artifacts

    # No personal data and no row-level ids anywhere in the tracking store or the outcomes.
    customers = pd.read_parquet(shop_dir / "customers.parquet")
    ids = [c.encode() for c in customers["customer_id"].head(50)]
    for path in (p for p in mlflow_store.rglob("*") if p.is_file() and "shop" not in p.parts
                 and p.name != "crm.db" and not p.name.startswith("crm.db")):
        data = path.read_bytes()
        assert not EMAIL.search(data), f"email-like text in {path}"
        assert not any(i in data for i in ids), f"a customer id in {path}"
    stored = read_outcomes(url).to_csv(index=False).encode()
    assert not EMAIL.search(stored) and not any(i in stored for i in ids)
