"""Model behaviour on synthetic training frames with a planted signal (the shape of build_training_set)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from ml.evaluate import evaluate
from ml.train import fit, small_config, split_by_cutoff

FEATURES = ["f_signal", "f_noise", "f_channel", "f_recency"]


@pytest.fixture
def tracking(mlflow_store: Path) -> Path:
    """``mlflow_store``: a private, pre-migrated SQLite store + OFFERFLOW_HOME under tmp_path."""
    return mlflow_store


def synthetic_frame(n_customers: int = 300, n_cutoffs: int = 5, per_customer: int = 5, strength: float = 2.0,
                    seed: int = 0, shuffle_labels: bool = False, offer_type: str = "cross_sell",
                    drift_intercept: float = 0.0) -> pd.DataFrame:
    """Key columns + label + features like ``ml.dataset.build_training_set``; label ~ f_signal, f_channel.

    ``drift_intercept`` raises the conversion rate of the two latest cutoffs (validation and test) only:
    a model fitted on the earlier cutoffs is then miscalibrated there.
    """
    rng = np.random.default_rng(seed)
    cutoffs = [dt.date(2025, 1, 1) + dt.timedelta(days=14 * i) for i in range(n_cutoffs)]
    n = n_customers * n_cutoffs * per_customer
    cust = np.tile(np.repeat([f"c{i:05d}" for i in range(n_customers)], per_customer), n_cutoffs)
    cut = np.repeat(np.array(cutoffs, dtype=object), n_customers * per_customer)
    cats = rng.choice([f"cat{i}" for i in range(8)], n)
    signal = rng.normal(size=n)
    channel = rng.choice(["web", "app", "store"], n)
    channel_effect = pd.Series(channel).map({"web": 0.6, "app": 0.0, "store": -0.6}).to_numpy()
    logit = -1.5 + strength * signal + channel_effect
    logit = logit + drift_intercept * (cut >= cutoffs[-2])
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")
    if shuffle_labels:
        label = rng.permutation(label)
    recency = rng.integers(0, 100, n).astype("float32")
    recency[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({
        "customer_id": pd.array(cust, dtype="string"), "category": pd.array(cats, dtype="string"),
        "product_id": pd.array([f"p_{c}" for c in cats], dtype="string"), "cutoff": cut,
        "offer_type": offer_type, "segment": pd.array(rng.choice(["A", "B"], n), dtype="string"),
        "at_risk": rng.random(n) < 0.2, "margin": rng.uniform(1, 10, n),
        "popularity": 1 / (1 + np.exp(-(-1.5 + 0.4 * signal + rng.normal(size=n)))),  # a weak baseline
        "label": label, "f_signal": signal.astype("float32"), "f_noise": rng.normal(size=n).astype("float32"),
        "f_channel": pd.array(channel, dtype="string"), "f_recency": recency,
    })


def _auc(frame: pd.DataFrame, **kw) -> float:
    res = fit(frame, "cross_sell", small_config(**kw), features=FEATURES)
    return evaluate(res.test, res.test_proba())["roc_auc"]


def test_split_is_by_time():
    frame = synthetic_frame(n_customers=50)
    train, valid, test, split = split_by_cutoff(frame)
    assert pd.to_datetime(train["cutoff"]).max() < pd.to_datetime(valid["cutoff"]).min()
    assert pd.to_datetime(valid["cutoff"]).max() < pd.to_datetime(test["cutoff"]).min()
    assert split.test_cutoff == "2025-02-26" and split.valid_cutoff == "2025-02-12"
    assert split.n_rows == {"train": 750, "valid": 250, "test": 250}


def test_shuffled_labels_give_chance_auc():
    assert abs(_auc(synthetic_frame(shuffle_labels=True)) - 0.5) <= 0.06


def test_stronger_signal_gives_higher_auc():
    weak, strong = _auc(synthetic_frame(strength=0.4)), _auc(synthetic_frame(strength=2.0))
    assert strong > weak + 0.1
    assert strong > 0.8


def test_two_fits_are_identical():
    frame = synthetic_frame()
    a = fit(frame, "cross_sell", small_config(), features=FEATURES)
    b = fit(frame.copy(), "cross_sell", small_config(), features=FEATURES)
    assert a.best_iteration == b.best_iteration
    np.testing.assert_array_equal(a.test_proba(), b.test_proba())
    assert a.model.reference == b.model.reference


def test_calibration_fixes_a_shifted_base_rate():
    frame = synthetic_frame(n_customers=500, drift_intercept=1.5, seed=4)
    res = fit(frame, "cross_sell", small_config(), features=FEATURES)
    assert res.model.calibrator.method != "identity"
    y = res.test["label"].to_numpy()
    raw = log_loss(y, res.model.predict_raw(res.test))
    calibrated = log_loss(y, res.model.predict_proba(res.test))
    assert calibrated < raw - 0.01
    assert res.valid_log_loss["calibrated"] <= res.valid_log_loss["raw"]


def test_calibration_keeps_log_loss_on_a_calibrated_case():
    res = fit(synthetic_frame(seed=5), "cross_sell", small_config(), features=FEATURES)
    assert res.valid_log_loss["calibrated"] <= res.valid_log_loss["raw"] + 1e-3


def test_contributions_add_up_and_unseen_categories_do_not_break_scoring():
    res = fit(synthetic_frame(), "cross_sell", small_config(), features=FEATURES)
    model = res.model
    rows = res.test.head(20).copy()
    contrib = model.contributions(rows)
    assert list(contrib.columns) == [*model.feature_names, "bias"] == [*FEATURES, "bias"]
    raw = model.predict_raw(rows)
    np.testing.assert_allclose(contrib.sum(axis=1), np.log(raw / (1 - raw)), rtol=1e-6, atol=1e-6)
    assert contrib["f_signal"].abs().mean() > contrib["f_noise"].abs().mean()  # the planted signal leads
    rows["f_channel"] = ["never-seen"] * 10 + [None] * 10
    unseen = model.predict_proba(rows)
    missing = model.predict_proba(rows.assign(f_channel=pd.array([None] * 20, dtype="string")))
    np.testing.assert_allclose(unseen, missing)  # unseen → the missing-value branch
    assert ((unseen > 0) & (unseen < 1)).all()


def test_customers_are_sampled_in_training_only_when_over_the_cap():
    frame = synthetic_frame(n_customers=200)
    res = fit(frame, "cross_sell", small_config(max_train_rows=1000), features=FEATURES)
    s = res.split
    assert 0 < s.sampled_customer_share < 1
    assert s.n_rows["train"] < 3000 and s.n_rows["valid"] == 1000 and s.n_rows["test"] == 1000
    train, *_ = split_by_cutoff(frame, small_config(max_train_rows=1000))
    per_customer = train.groupby("customer_id").size()
    assert (per_customer == 15).all()  # whole customers kept: all their rows or none


def test_missing_feature_column_is_a_clear_error():
    with pytest.raises(KeyError, match="f_missing"):
        fit(synthetic_frame(n_customers=50), "cross_sell", small_config(), features=[*FEATURES, "f_missing"])


EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def test_no_personal_data_in_the_tracking_store(tracking):
    """Train on a frame that carries email and birth_year next to the features; nothing may leak."""
    from ml.train import gate_version, track

    frame = synthetic_frame(n_customers=150)
    frame["email"] = [f"{c}@example.com" for c in frame["customer_id"]]
    frame["birth_year"] = 1980
    res = fit(frame, "cross_sell", small_config(), features=FEATURES)
    result = track(res, dt.date(2025, 3, 26), "fp123",
                   quality={"success": True, "tables": {"customers": 150}}, plots=False)
    gate_version(result)
    assert_no_personal_data(tracking, ids=[b"c00001"])


def assert_no_personal_data(store: Path, ids: list[bytes]) -> None:
    """Grep every file of a local store (SQLite bytes and artifacts) for personal data and row ids."""
    files = [p for p in store.rglob("*") if p.is_file() and "shop" not in p.relative_to(store).parts]
    assert any(p.name == "python_model.pkl" for p in files) and any(p.suffix == ".db" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not EMAIL.search(data), f"email-like text in {path}"
        for word in (b"birth_year", b"email", *ids):  # nor customer ids: no row-level data
            assert word not in data, f"{word!r} in {path}"


@pytest.mark.slow
def test_train_offer_types_end_to_end(tracking, monkeypatch):
    """Simulated shop → quality gate → point-in-time training set → fit → MLflow run → registry → gate."""
    import mlflow

    from ml import registry
    from ml.contract import load_source
    from ml.quality import DataQualityError
    from ml.simulate import simulate_to
    from ml.train import train_offer_types

    start, days = dt.date(2025, 1, 1), 200
    shop_dir = tracking / "shop"
    simulate_to(shop_dir, customers=300, days=days, seed=3, start=start)
    as_of = start + dt.timedelta(days=days)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "offers_train")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__1")
    [result] = train_offer_types(str(shop_dir), as_of, ["cross_sell"], cfg=small_config())
    assert result.version == "1" and result.decision is not None
    assert result.summary().startswith("cross_sell: v1 test AUC")
    assert registry.challenger_version("cross_sell") == "1"
    assert (registry.champion_version("cross_sell") == "1") == result.decision.promoted
    run = mlflow.get_run(result.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["airflow_dag_id"] == "offers_train" and tags["airflow_run_id"] == "manual__1"
    assert tags["as_of"] == as_of.isoformat() and tags["data_quality"] == "passed"
    assert params["data_fingerprint"] == tags["data_fingerprint"] == \
        load_source(shop_dir, as_of=pd.Timestamp(as_of)).fingerprint()
    assert params["test_cutoff"] == (as_of - dt.timedelta(days=28)).isoformat()
    artifacts = {p.relative_to(tracking).as_posix() for p in (tracking / "mlartifacts").rglob("*")}
    assert any(a.endswith("data_quality/report.json") for a in artifacts)
    assert any(a.endswith("plots/calibration.png") for a in artifacts)
    customers = pd.read_parquet(shop_dir / "customers.parquet")
    assert customers["email"].notna().any()  # the source holds personal data, the store must not
    assert_no_personal_data(tracking, ids=[c.encode() for c in customers["customer_id"].head(20)])

    (shop_dir / "orders.parquet").unlink()  # broken input: nothing is trained or registered
    with pytest.raises(DataQualityError):
        train_offer_types(str(shop_dir), as_of, ["cross_sell"], cfg=small_config())
    assert registry.challenger_version("cross_sell") == "1"
