"""Settings in one place: paths and stores from the environment, modelling and policy defaults.

Everything a user may want to change is here with its default (Kedro-style parameters), so the
CLI, the DAGs and the tests read the same values instead of scattering literals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _quiet_libraries() -> None:
    """Switch off telemetry, URL banners and progress bars of MLflow and GE before they are imported."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "ERROR",
        "GX_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
    }.items():
        os.environ.setdefault(key, value)


_quiet_libraries()


def var_dir() -> Path:
    """The working folder for local stores (``./var`` unless ``OFFERFLOW_HOME`` says otherwise)."""
    return Path(os.environ.get("OFFERFLOW_HOME", "var")).resolve()


def _env_or_local_sqlite(variable: str, filename: str) -> str:
    """The URL in ``variable``, else an embedded SQLite database under ``var_dir()``."""
    url = os.environ.get(variable)
    if url:
        return url
    path = var_dir() / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def tracking_uri() -> str:
    return _env_or_local_sqlite("MLFLOW_TRACKING_URI", "mlflow.db")


def artifact_root() -> str:
    """Where experiments created by offerflow keep artifacts when the store is local."""
    return (var_dir() / "mlartifacts").as_uri()


def crm_url() -> str:
    return _env_or_local_sqlite("OFFERFLOW_CRM_URL", "crm.db")


def default_data() -> str | None:
    return os.environ.get("OFFERFLOW_DATA")


@dataclass(frozen=True)
class ModelConfig:
    horizon_days: int = 28
    cutoff_step_days: int = 14
    n_cutoffs: int = 6  # training cutoffs, the last with a full window is the out-of-time test set
    cross_sell_candidates: int = 5  # top N never-bought categories per customer, by lift
    default_margin_rate: float = 0.3  # margin where unit_cost is null
    use_age_band: bool = False  # an age band may be a feature only when allowed
    seed: int = 42
    num_threads: int = int(os.environ.get("OFFERFLOW_THREADS", "1"))
    # Training at scale (logged to MLflow): a shop with more customers than max_train_customers builds
    # its training set from a stable hash-sample of that many (before any feature is computed, so time
    # and memory follow the sample); training cutoffs beyond max_train_rows keep a nested sub-sample.
    max_train_customers: int = 200_000
    max_train_rows: int = 2_000_000
    sample_salt: str = "offerflow-training-sample"
    # DuckDB (the joined shop of ShopIndex) spills to a temporary folder beyond this (DuckDB syntax).
    duckdb_memory_limit: str = os.environ.get("OFFERFLOW_DUCKDB_MEMORY", "4GB")
    lgb_params: dict = field(default_factory=lambda: {
        "objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
        "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
        "min_data_per_group": 50, "cat_smooth": 10, "verbose": -1, "deterministic": True,
    })
    num_boost_round: int = 1000
    early_stopping_rounds: int = 50


@dataclass(frozen=True)
class GateConfig:
    """Promotion gate (DESIGN §4)."""

    min_auc_gain_over_baseline: float = 0.0
    champion_tolerance: float = 0.005  # challenger may be this much worse than champion (ROC AUC)
    max_brier: float = 0.25
    max_ece: float = 0.05


@dataclass(frozen=True)
class PolicyConfig:
    """Offer policy (DESIGN §5)."""

    offers_per_customer: int = 3
    cooldown_days: int = 14
    cap_per_channel_7d: int = 1
    cap_per_customer_7d: int = 2
    control_share: float = 0.10
    control_salt: str = "offerflow"
    value_weights: dict = field(default_factory=lambda: {"cross_sell": 1.0, "upsell": 1.0, "downsell": 1.0})
    offer_valid_days: int = 7
    # Keep batches until their outcome window (28 days) has closed and been measured, with daily scoring.
    retention_batches: int = 40


MODEL = ModelConfig()
GATE = GateConfig()
POLICY = PolicyConfig()
