"""Registry, aliases, the promotion gate and the alias audit trail, on private MLflow stores."""

from __future__ import annotations

import datetime as dt
import math
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from test_train import FEATURES, synthetic_frame

from ml import registry
from ml.config import GateConfig
from ml.train import TrainResult, fit, gate_version, small_config, track

LOOSE = GateConfig(min_auc_gain_over_baseline=-1.0, champion_tolerance=0.005, max_brier=1.0, max_ece=1.0)
AS_OF = dt.date(2025, 3, 26)


@pytest.fixture
def tracking(mlflow_store):
    """A private, pre-migrated SQLite store (conftest.mlflow_store)."""
    return mlflow_store


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synthetic_frame(n_customers=200)


def _register(frame: pd.DataFrame, features: list[str], offer_type: str = "cross_sell") -> TrainResult:
    res = fit(frame, offer_type, small_config(), features=features)
    return TrainResult.from_dict(track(res, AS_OF, "fp", quality={"success": True}, plots=False).to_dict())


def _gate(result: TrainResult, cfg: GateConfig) -> registry.GateDecision:
    return TrainResult.from_dict(gate_version(result, cfg)).decision


def test_decide_fails_closed():
    good = {"roc_auc": 0.8, "baseline_roc_auc": 0.6, "brier": 0.1, "ece": 0.01}
    assert registry.decide(good, None, None, GateConfig())[0]
    assert registry.decide(good, 0.8, "1", GateConfig())[0]
    assert not registry.decide(good, 0.81, "1", GateConfig(champion_tolerance=0.005))[0]
    assert not registry.decide({**good, "roc_auc": math.nan}, None, None, GateConfig())[0]
    assert not registry.decide({**good, "brier": 0.3}, None, None, GateConfig(max_brier=0.25))[0]
    ok, reasons = registry.decide(good, None, "3", GateConfig())  # champion could not be scored
    assert not ok and any("could not score" in r for r in reasons)


def test_champion_alias_loads_and_predicts_on_string_categoricals(tracking, frame):
    result = _register(frame, FEATURES)
    assert result.version == "1"
    assert registry.challenger_version("cross_sell") == "1"
    assert registry.champion_version("cross_sell") is None
    decision = _gate(result, GateConfig())
    assert decision.promoted, decision.reasons
    pyfunc = mlflow.pyfunc.load_model("models:/offerflow-cross_sell@champion")
    schema = {c.name: str(c.type) for c in pyfunc.metadata.get_input_schema().inputs}
    assert schema["f_channel"].lower().endswith("string") and "double" in schema["f_signal"].lower()
    X = frame[FEATURES].head(8).copy()
    X["f_channel"] = X["f_channel"].astype(object)  # plain Python strings, as a CRM job would send
    X.iloc[0, X.columns.get_loc("f_channel")] = "never-seen"
    pred = np.asarray(pyfunc.predict(X))
    model, version = registry.load_champion("cross_sell")
    assert version == "1"
    np.testing.assert_allclose(pred, model.predict_proba(X))
    assert pyfunc.unwrap_python_model().contributions(X).shape == (8, len(FEATURES) + 1)
    assert ((pred > 0) & (pred < 1)).all()
    assert "offerflow-cross_sell: champion v1, challenger v1" in registry.list_models()
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["offer_type"] == "cross_sell" and run.data.tags["git_commit"]
    assert run.data.params["data_fingerprint"] == "fp" and "roc_auc" in run.data.metrics
    assert "baseline_topk_hit_rate" in run.data.metrics


def test_gate_refuses_a_worse_challenger_and_promotes_a_better_one(tracking, frame):
    weak = _register(frame, ["f_channel", "f_noise"])
    assert _gate(weak, LOOSE).promoted  # first version, nothing to compare with
    worse = _register(frame, ["f_noise", "f_recency"])  # no signal at all
    decision = _gate(worse, LOOSE)
    assert not decision.promoted
    assert any(r.startswith("fail:") and "champion v1" in r for r in decision.reasons), decision.reasons
    assert registry.champion_version("cross_sell") == "1"
    assert registry.challenger_version("cross_sell") == worse.version == "2"
    better = _register(frame, FEATURES)
    decision = _gate(better, LOOSE)
    assert decision.promoted, decision.reasons
    assert decision.metrics["champion_roc_auc"] < decision.metrics["roc_auc"]
    assert registry.champion_version("cross_sell") == "3"
    assert "promoted" in TrainResult.from_dict({**better.to_dict(), "decision": decision.to_dict()}).summary()


def test_gate_refuses_poor_calibration_and_stale_comparisons(tracking, frame):
    result = _register(frame, FEATURES)
    decision = _gate(result, GateConfig(max_ece=1e-6))
    assert not decision.promoted
    assert any(r.startswith("fail: ece") for r in decision.reasons)
    assert registry.champion_version("cross_sell") is None
    assert "not promoted: ece" in TrainResult.from_dict(
        {**result.to_dict(), "decision": decision.to_dict()}).summary()
    second = _register(frame, FEATURES)  # evaluated while there was no champion
    assert registry.promote("cross_sell", "1", reason="accepted by hand").endswith("(accepted by hand)")
    assert "nothing moved" in registry.promote("cross_sell", "1", reason="again")
    decision = _gate(second, LOOSE)  # the champion appeared after v2 was evaluated: stale comparison
    assert not decision.promoted and "compared with v-" in decision.reasons[0]
    assert registry.champion_version("cross_sell") == "1"
    assert len(registry.alias_history("cross_sell", registry.CHAMPION)) == 1


def _copy_version(offer_type: str, version: str) -> str:
    """Another registry version of the same logged model: enough for alias bookkeeping, and cheap."""
    client = registry.use_tracking()
    mv = client.get_model_version(registry.model_name(offer_type), version)
    return str(client.create_model_version(mv.name, mv.source, run_id=mv.run_id).version)


def test_rollback_history_and_champion_at(tracking, frame):
    res = fit(frame, "upsell", small_config(), features=FEATURES)
    v1 = track(res, AS_OF, "fp", plots=False).version
    registry.promote("upsell", v1, reason="first")
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    v2 = _copy_version("upsell", v1)
    registry.promote("upsell", v2, reason="second")
    v3 = _copy_version("upsell", v1)
    registry.promote("upsell", v3, reason="third")
    assert registry.rollback("upsell", reason="v3 misbehaves").endswith("v3 -> v2 (v3 misbehaves)")
    assert registry.champion_version("upsell") == "2"
    registry.rollback("upsell", reason="v2 too")
    assert registry.champion_version("upsell") == "1"
    with pytest.raises(ValueError, match="no previous champion"):
        registry.rollback("upsell", reason="nothing left")
    with pytest.raises(ValueError, match="no version '99'"):
        registry.promote("upsell", "99", reason="typo")

    hist = registry.alias_history("upsell", registry.CHAMPION)
    moves = list(zip(hist["from_version"], hist["to_version"], hist["kind"], hist["reason"], strict=True))
    assert moves == [("", "1", "promote", "first"), ("1", "2", "promote", "second"),
                     ("2", "3", "promote", "third"), ("3", "2", "rollback", "v3 misbehaves"),
                     ("2", "1", "rollback", "v2 too")]
    assert hist["moved_at"].is_monotonic_increasing and str(hist["moved_at"].dt.tz) == "UTC"
    assert (hist["actor"] != "").all()
    text = registry.alias_history_text("upsell")
    assert "v3 -> v2" in text and "v3 misbehaves" in text and "challenger" in text

    assert registry.champion_at("upsell", between) == "1"
    assert registry.champion_at("upsell", dt.datetime.now(dt.UTC)) == "1"
    assert registry.champion_at("upsell", dt.date.today() - dt.timedelta(days=1)) is None
    assert registry.champion_at("upsell", dt.datetime.now(dt.UTC).date()) == "1"  # a date = end of that day
    assert registry.alias_history("cross_sell").empty  # per model


@pytest.mark.postgres
def test_register_gate_rollback_on_postgres(pg_url, tmp_path, monkeypatch, frame):
    home = tmp_path / "var"
    monkeypatch.setenv("OFFERFLOW_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg_url)
    try:
        weak = _register(frame, ["f_channel", "f_noise"], offer_type="downsell")
        assert _gate(weak, LOOSE).promoted
        strong = _register(frame, FEATURES, offer_type="downsell")
        assert _gate(strong, LOOSE).promoted
        assert registry.champion_version("downsell") == "2"
        registry.rollback("downsell", reason="pg rollback")
        assert registry.champion_version("downsell") == "1"
        hist = registry.alias_history("downsell", registry.CHAMPION)
        assert list(hist["to_version"]) == ["1", "2", "1"] and hist["reason"].iloc[-1] == "pg rollback"
        assert registry.champion_at("downsell", dt.datetime.now(dt.UTC)) == "1"
        model, version = registry.load_champion("downsell")
        assert version == "1" and model.features == ["f_channel", "f_noise"]
        assert list((home / "mlartifacts").rglob("python_model.pkl")), "artifacts belong under OFFERFLOW_HOME"
    finally:
        mlflow.set_tracking_uri(None)
        import sqlalchemy as sa

        sa.create_engine(pg_url).dispose()
