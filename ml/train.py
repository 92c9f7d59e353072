"""Training: one calibrated LightGBM model per offer type, evaluated out of time, tracked and registered.

The cutoffs of the training frame split it in time: the latest cutoff is the out-of-time TEST set, the
one before it the VALIDATION set (early stopping and calibration), all earlier ones TRAIN. Nothing is
shuffled across time, so test metrics are what the model will do on the next, unseen period.

Pieces for Airflow (each a task, JSON-able in and out): ``train_one`` → ``gate_version``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from ml import registry
from ml.config import GATE, MODEL, POLICY, GateConfig, ModelConfig
from ml.contract import Shop, as_date
from ml.evaluate import evaluate, figures
from ml.model import OfferModel, choose_calibrator, drift_reference, log_offer_model
from ml.progress import log, step

META_COLUMNS = ("customer_id", "category", "product_id", "cutoff", "offer_type", "segment", "at_risk",
                "margin", "popularity", "label")


@dataclass
class Split:
    train_cutoffs: list[str]
    valid_cutoff: str
    test_cutoff: str
    n_rows: dict[str, int]
    n_positive: dict[str, int]
    sampled_customer_share: float = 1.0  # of the shop's customers, at training cutoffs
    sampling: dict = field(default_factory=dict)  # the training set's attrs["sampling"] (ml.dataset)


@dataclass
class FitResult:
    """A fitted model plus what evaluation and tracking need; ``test`` holds the out-of-time rows."""

    model: OfferModel
    offer_type: str
    params: dict
    split: Split
    best_iteration: int
    test: pd.DataFrame
    calibration_scores: dict[str, float] = field(default_factory=dict)
    valid_log_loss: dict[str, float] = field(default_factory=dict)

    def test_proba(self) -> np.ndarray:
        return self.model.predict_proba(self.test)


@dataclass
class TrainResult:
    offer_type: str
    version: str
    run_id: str
    metrics: dict
    as_of: str = ""
    decision: registry.GateDecision | None = None
    compared_champion: str | None = None

    def summary(self) -> str:
        m = self.metrics
        line = (f"{self.offer_type}: v{self.version} test AUC {m.get('roc_auc', math.nan):.3f} vs baseline "
                f"{m.get('baseline_roc_auc', math.nan):.3f}, top-{POLICY.offers_per_customer} hit "
                f"{m.get('topk_hit_rate', math.nan):.3f} "
                f"vs {m.get('baseline_topk_hit_rate', math.nan):.3f}")
        if self.decision is None:
            return line + " — not gated"
        if self.decision.promoted:
            return line + " — promoted to champion"
        failed = [r.removeprefix("fail: ") for r in self.decision.reasons if r.startswith("fail:")]
        return line + " — not promoted: " + "; ".join(failed)

    def to_dict(self) -> dict:
        return {"offer_type": self.offer_type, "version": self.version, "run_id": self.run_id,
                "metrics": self.metrics, "as_of": self.as_of, "compared_champion": self.compared_champion,
                "decision": self.decision.to_dict() if self.decision else None}

    @classmethod
    def from_dict(cls, d: dict) -> TrainResult:
        dec = d.get("decision")
        return cls(d["offer_type"], str(d["version"]), d["run_id"], dict(d["metrics"]), d.get("as_of", ""),
                   registry.GateDecision(**dec) if dec else None, d.get("compared_champion"))


# -- features and split ------------------------------------------------------------------------------
def resolve_features(offer_type: str, cfg: ModelConfig = MODEL) -> list[str]:
    """The model's inputs are exactly ``ml.dataset.feature_columns`` (``category``: key and feature)."""
    from ml.dataset import feature_columns

    return list(feature_columns(offer_type, cfg))


def categorical_features(frame: pd.DataFrame, features: list[str]) -> list[str]:
    """Strings and categories are LightGBM categoricals; numbers and booleans are numeric."""
    return [c for c in features if not pd.api.types.is_numeric_dtype(frame[c]) or
            isinstance(frame[c].dtype, pd.CategoricalDtype)]


def split_by_cutoff(frame: pd.DataFrame, cfg: ModelConfig = MODEL
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Split]:
    """TRAIN < VALIDATION < TEST by cutoff; customers are sampled in TRAIN only when it exceeds the cap.

    The frame's ``attrs["sampling"]`` (``ml.dataset.build_training_sets``) says which share of the
    shop's customers it already holds; a further cut uses the same customer hash, so the logged share
    stays the share of the shop's customers whatever sampled where.
    """
    from ml.features import customer_fraction

    sampling = dict(frame.attrs.get("sampling") or {})
    cutoffs = sorted(pd.to_datetime(frame["cutoff"]).unique())
    if len(cutoffs) < 3:
        raise ValueError(f"need at least 3 cutoffs (train, validation, test), the frame has {len(cutoffs)}")
    c = pd.to_datetime(frame["cutoff"])
    train, valid, test = frame[c < cutoffs[-2]], frame[c == cutoffs[-2]], frame[c == cutoffs[-1]]
    share = float(sampling.get("train_customer_share", 1.0))
    if len(train) > cfg.max_train_rows:
        n_before = len(train)
        share *= cfg.max_train_rows / n_before
        train = train[customer_fraction(train["customer_id"], cfg.sample_salt) < share]
        log.info("training rows %s > max_train_rows %s: kept customers with hash fraction < %.4f (%s rows)",
                 f"{n_before:,}", f"{cfg.max_train_rows:,}", share, f"{len(train):,}")
    parts = {"train": train, "valid": valid, "test": test}
    split = Split([pd.Timestamp(x).date().isoformat() for x in cutoffs[:-2]],
                  pd.Timestamp(cutoffs[-2]).date().isoformat(), pd.Timestamp(cutoffs[-1]).date().isoformat(),
                  {k: len(v) for k, v in parts.items()},
                  {k: int(v["label"].sum()) for k, v in parts.items()}, share, sampling)
    return train, valid, test, split


def lgb_params(cfg: ModelConfig = MODEL) -> dict:
    """Config params plus fixed seeds and threads: the same data gives the same model, bit for bit.

    The validation metric is log loss only: early stopping reads it alone, and LightGBM's per-round
    AUC (a sort of the validation scores every round) cost up to a minute at 1M customers for nothing.
    """
    return {**cfg.lgb_params, "metric": ["binary_logloss"], "seed": cfg.seed,
            "bagging_seed": cfg.seed, "feature_fraction_seed": cfg.seed, "data_random_seed": cfg.seed,
            "num_threads": cfg.num_threads, "deterministic": True, "verbose": -1}


# -- fit -----------------------------------------------------------------------------------------------
def fit(frame: pd.DataFrame, offer_type: str, cfg: ModelConfig = MODEL,
        features: list[str] | None = None) -> FitResult:
    """Train with early stopping on the validation cutoff, then calibrate on it (method chosen out of fold).

    ``features`` defaults to ``ml.dataset.feature_columns(offer_type)``; tests pass their own.
    """
    features = list(features or resolve_features(offer_type, cfg))
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise KeyError(f"{offer_type}: training frame lacks feature columns {missing}")
    train, valid, test, split = split_by_cutoff(frame, cfg)
    for name, part in (("train", train), ("validation", valid)):
        if part["label"].nunique() < 2:
            raise ValueError(f"{offer_type}: the {name} rows have a single label class; nothing to learn")
    cats = categorical_features(frame, features)
    vocab = {c: sorted(train[c].dropna().astype(str).unique().tolist()) for c in cats}
    model = OfferModel(booster=None, features=features, vocabularies=vocab, offer_type=offer_type)
    params = lgb_params(cfg)
    dtrain = lgb.Dataset(model.to_booster_input(train), train["label"].astype("int64").to_numpy(),
                         categorical_feature=cats or "auto", free_raw_data=True)
    dvalid = lgb.Dataset(model.to_booster_input(valid), valid["label"].astype("int64").to_numpy(),
                         reference=dtrain)
    model.booster = lgb.train(
        params, dtrain, num_boost_round=cfg.num_boost_round, valid_sets=[dvalid], valid_names=["valid"],
        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, first_metric_only=True, verbose=False)])
    raw_valid = model.predict_raw(valid)
    model.calibrator, cal_scores = choose_calibrator(raw_valid, valid["label"].to_numpy(),
                                                     valid["customer_id"])
    y_valid = valid["label"].astype("int64").to_numpy()
    from sklearn.metrics import log_loss

    valid_ll = {"raw": float(log_loss(y_valid, raw_valid, labels=[0, 1])),
                "calibrated": float(log_loss(y_valid, model.calibrator(raw_valid), labels=[0, 1]))}
    # The drift reference is the newest cutoff (the out-of-time rows): the population closest to the one
    # scored next. The oldest training cutoffs would flag every 365-day feature that is still filling up.
    model.reference = drift_reference(model.to_model_input(test), model.predict_proba(test), cats)
    keep = [c for c in dict.fromkeys([*META_COLUMNS, *features]) if c in test.columns]
    return FitResult(model, offer_type, params, split, int(model.booster.best_iteration or 0),
                     test[keep].reset_index(drop=True), cal_scores, valid_ll)


# -- evaluate against the live champion ----------------------------------------------------------------
def champion_on(test: pd.DataFrame, offer_type: str) -> tuple[str | None, float | None]:
    """ROC AUC of the current champion on the SAME out-of-time rows; (None, None) without a champion."""
    from sklearn.metrics import roc_auc_score

    version = registry.champion_version(offer_type)
    if version is None:
        return None, None
    try:
        champ = registry.load_model_version(offer_type, version)
        p = champ.predict_proba(test)
    except Exception as exc:  # e.g. its features left the frame: the gate then fails closed
        log.warning("champion v%s cannot score the new test rows: %s: %s", version, type(exc).__name__, exc)
        return version, None
    y = test["label"].astype("int64").to_numpy()
    return version, float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None


# -- tracking ------------------------------------------------------------------------------------------
def track(fit_result: FitResult, as_of: dt.date, data_fingerprint: str, quality: dict | None = None,
          cfg: ModelConfig = MODEL, run_tags: dict | None = None, plots: bool = True) -> TrainResult:
    """Evaluate, log the run (params, metrics, plots, model, data-quality result), register, alias challenger.

    Only aggregates leave this function: the test rows (customer level) are scored here and never logged.
    ``plots=False`` skips the four figures (about half of the logging time; tests of the registry).
    """
    import matplotlib.pyplot as plt
    import mlflow

    offer_type = fit_result.offer_type
    model = fit_result.model
    test = fit_result.test
    with step(f"evaluate {offer_type}") as info:
        proba = model.predict_proba(test)
        metrics = evaluate(test, proba)
        compared, champ_auc = champion_on(test, offer_type)
        if champ_auc is not None:
            metrics["champion_roc_auc"] = champ_auc
        metrics.update({"best_iteration": float(fit_result.best_iteration),
                        "valid_log_loss_raw": fit_result.valid_log_loss["raw"],
                        "valid_log_loss_calibrated": fit_result.valid_log_loss["calibrated"]})
        metrics.update({f"calibration_cv_log_loss_{k}": v for k, v in fit_result.calibration_scores.items()})
        info["detail"] = f"AUC {metrics['roc_auc']:.3f} vs baseline {metrics['baseline_roc_auc']:.3f}"
    s = fit_result.split
    params = {f"lgb_{k}": (",".join(v) if isinstance(v, list) else v) for k, v in fit_result.params.items()}
    params.update({
        "offer_type": offer_type, "as_of": as_of.isoformat(), "horizon_days": cfg.horizon_days,
        "cutoff_step_days": cfg.cutoff_step_days, "train_cutoffs": ",".join(s.train_cutoffs),
        "valid_cutoff": s.valid_cutoff, "test_cutoff": s.test_cutoff, "num_boost_round": cfg.num_boost_round,
        "early_stopping_rounds": cfg.early_stopping_rounds, "data_fingerprint": data_fingerprint,
        "sampled_customer_share": round(s.sampled_customer_share, 6), "max_train_rows": cfg.max_train_rows,
        "max_train_customers": cfg.max_train_customers, "sample_salt": cfg.sample_salt,
        "sample_population_customers": s.sampling.get("population_customers", "unknown"),
        "sample_customers": s.sampling.get("sample_customers", "unknown"),
        "sample_customer_share": round(float(s.sampling.get("customer_share", 1.0)), 6),
        "calibration": model.calibrator.method, "n_features": len(model.features),
        "categorical_features": ",".join(model.vocabularies) or "-",
        **{f"n_rows_{k}": v for k, v in s.n_rows.items()},
        **{f"n_positive_{k}": v for k, v in s.n_positive.items()},
    })
    tags = registry.run_context_tags({"offer_type": offer_type, "as_of": as_of.isoformat(),
                                      "data_fingerprint": data_fingerprint,
                                      "compared_champion_version": compared or "", **(run_tags or {})})
    tags["data_quality"] = "passed" if quality is not None else "not run by this step"
    exp_id = registry.ensure_experiment(registry.experiment_name(offer_type))
    with step(f"log + register {offer_type}"), \
            mlflow.start_run(experiment_id=exp_id, run_name=f"{offer_type} as of {as_of}", tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and not math.isnan(v)})
        importance = model.feature_importance()
        for path, fig in (figures(test, proba, importance) if plots else {}).items():
            mlflow.log_figure(fig, path)
            plt.close(fig)
        mlflow.log_dict(importance.to_dict(orient="list"), "tables/feature_importance.json")
        mlflow.log_dict(model.reference, "reference/training_reference.json")
        mlflow.log_dict({**s.sampling, "train_customer_share_final": s.sampled_customer_share,
                         "n_rows": s.n_rows}, "data/sampling.json")
        mlflow.log_dict({"method": model.calibrator.method, "cv_log_loss": fit_result.calibration_scores,
                         "valid_log_loss": fit_result.valid_log_loss}, "calibration.json")
        if quality is not None:
            mlflow.log_dict(quality, "data_quality/report.json")
        info = log_offer_model(model, test[model.features], registry.model_name(offer_type))
        version = str(info.registered_model_version)
    client = registry.use_tracking()
    for key, value in {"offer_type": offer_type, "as_of": as_of.isoformat(),
                       "data_fingerprint": data_fingerprint, "test_roc_auc": f"{metrics['roc_auc']:.4f}",
                       "baseline_roc_auc": f"{metrics['baseline_roc_auc']:.4f}"}.items():
        client.set_model_version_tag(registry.model_name(offer_type), version, key, value)
    registry.move_alias(offer_type, registry.CHALLENGER, version, f"new version from run {run.info.run_id}",
                        kind="register")
    return TrainResult(offer_type, version, run.info.run_id, metrics, as_of.isoformat(), None, compared)


# -- orchestration -------------------------------------------------------------------------------------
def validated_shop(source: str | Path, as_of: dt.date) -> tuple[Shop, dict]:
    """The data-quality gate and the data cut at ``as_of``, read once; raises ``DataQualityError``.

    Returns the report as a JSON-able dict too, because every training run logs it.
    """
    from ml import quality

    report, shop = quality.validate_and_load(source, as_of)
    if not report.success:
        raise quality.DataQualityError(report)
    return shop, json.loads(json.dumps(report.to_dict(), default=str))


def train_one(source: str | Path | Shop, as_of: dt.date | str, offer_type: str, cfg: ModelConfig = MODEL,
              run_tags: dict | None = None, quality: dict | None = None, frame: pd.DataFrame | None = None,
              fingerprint: str | None = None) -> dict:
    """One offer type: (validate) → training set → fit → evaluate → log → register → alias challenger.

    A ``Shop`` is taken as already validated (pass its report as ``quality`` to log it); a path or URL is
    validated here. ``frame`` skips building the training set (``train_offer_types`` builds all three in
    one pass). Returns ``TrainResult.to_dict()`` so it can travel as an Airflow XCom.
    """
    from ml.dataset import build_training_set

    as_of = as_date(as_of)
    if isinstance(source, Shop):
        shop = source
    else:
        with step("validate inputs"):
            shop, quality = validated_shop(source, as_of)
    if frame is None:
        with step(f"training set {offer_type}") as info:
            frame = build_training_set(shop, as_of, offer_type, cfg)
            info["detail"] = f"{len(frame):,} rows, {int(frame['label'].sum()):,} positive"
    with step(f"fit {offer_type}") as info:
        fitted = fit(frame, offer_type, cfg)
        info["detail"] = f"{fitted.best_iteration} trees, calibration {fitted.model.calibrator.method}"
    return track(fitted, as_of, fingerprint or shop.fingerprint(), quality, cfg, run_tags).to_dict()


def gate_version(train_result: dict | TrainResult, gate_cfg: GateConfig = GATE) -> dict:
    """The promotion gate for the version ``train_one`` registered; returns the result with its decision."""
    result = train_result if isinstance(train_result, TrainResult) else TrainResult.from_dict(train_result)
    with step(f"gate {result.offer_type} v{result.version}") as info:
        result.decision = registry.gate(result.offer_type, result.version, gate_cfg)
        info["detail"] = "promoted" if result.decision.promoted else "not promoted"
    return result.to_dict()


def train_offer_types(source: str | Path, as_of: dt.date, offer_types: list[str], promote: bool = True,
                      cfg: ModelConfig = MODEL, gate_cfg: GateConfig = GATE) -> list[TrainResult]:
    """The CLI's ``train``: validate once, then train, register and (optionally) gate each type."""
    from ml.dataset import build_training_sets

    as_of = as_date(as_of)
    with step("validate inputs"):
        shop, quality = validated_shop(source, as_of)
    with step("training sets " + ", ".join(offer_types)) as info:
        frames = build_training_sets(shop, as_of, offer_types, cfg)
        info["detail"] = "; ".join(f"{t} {len(f):,} rows, {int(f['label'].sum()):,} positive"
                                   for t, f in frames.items())
    fingerprint = shop.fingerprint()
    results = []
    for offer_type in offer_types:
        result = TrainResult.from_dict(train_one(shop, as_of, offer_type, cfg, quality=quality,
                                                 frame=frames.pop(offer_type), fingerprint=fingerprint))
        if promote:
            result = TrainResult.from_dict(gate_version(result, gate_cfg))
        log.info(result.summary())
        results.append(result)
    return results


def small_config(**overrides) -> ModelConfig:
    """A quick config for tests and demos: few rounds, small leaves (same seeds and threads)."""
    params = {**MODEL.lgb_params, "min_data_in_leaf": 20, "min_data_per_group": 20, "num_leaves": 15,
              "learning_rate": 0.1}
    return dataclasses.replace(MODEL, lgb_params=params, num_boost_round=100, early_stopping_rounds=15,
                               **overrides)
