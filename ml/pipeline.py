"""Task-level API for the DAGs: JSON-able arguments in, JSON-able dicts out (they travel as XCom).

Each function is one Airflow task; together they are the same steps as the CLI. Airflow-free:
the DAG files import this module inside their tasks.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ml import config
from ml.contract import OFFER_TYPES, as_date


def _offer_type(offer_type: str) -> str:
    if offer_type not in OFFER_TYPES:
        raise ValueError(f"unknown offer type {offer_type!r}; choose from {list(OFFER_TYPES)}")
    return offer_type


def work_dir(as_of: str | dt.date) -> Path:
    """Per-as-of folder for intermediate files; shared storage when workers are on several machines."""
    path = config.var_dir() / "runs" / as_date(as_of).isoformat()
    path.mkdir(parents=True, exist_ok=True)
    return path


def validate_inputs(source: str, as_of: str) -> dict:
    """The data-quality gate; raises ``DataQualityError`` (readable summary) when the data fails."""
    from ml.quality import DataQualityError, validate_source

    report = validate_source(source, as_of=as_date(as_of))
    if not report.success:
        raise DataQualityError(report)
    return {**report.to_dict(), "summary": report.summary()}


def train_offer(source: str, as_of: str, offer_type: str, run_tags: dict | None = None) -> dict:
    """Build the training set, fit, evaluate, log and register one offer type's model."""
    from ml.train import train_one

    return train_one(source, as_date(as_of), _offer_type(offer_type), run_tags=run_tags or {})


def gate_offer(train_result: dict) -> dict:
    """Promotion gate for the version ``train_offer`` registered."""
    from ml.train import gate_version

    result = gate_version(train_result)
    decision = result.get("decision") or {}
    return {**result, "promoted": bool(decision.get("promoted")),
            "reasons": list(decision.get("reasons", []))}


def score_offer(source: str, as_of: str, offer_type: str, shard: int = 0, n_shards: int = 1,
                version: str | None = None) -> dict:
    """Champion propensities for one offer type (and one customer shard), written to Parquet.

    Pass ``version`` (resolved once per DAG run) so that every shard scores with the same model even
    if the champion alias moves while the run is in flight.
    """
    from ml.quality import require_valid
    from ml.registry import load_champion, load_model_version
    from ml.score import score_offer_type

    day = as_date(as_of)
    shop = require_valid(source, as_of=day)
    if version is None:
        model, version = load_champion(_offer_type(offer_type))
    else:
        model = load_model_version(_offer_type(offer_type), str(version))
    scored = score_offer_type(shop, day, offer_type, model, version, shard=shard, n_shards=n_shards)
    path = work_dir(day) / f"scored_{offer_type}_{shard:04d}_of_{n_shards:04d}.parquet"
    scored.to_parquet(path, index=False)
    return {"offer_type": offer_type, "path": str(path), "rows": len(scored), "model_version": str(version),
            "shard": shard, "n_shards": n_shards}


def decide_and_load(source: str, as_of: str, scored: list[dict], crm_url: str | None = None) -> dict:
    """Policy, arbitration and reason codes over all scored parts; load the rows as a `loading` batch."""
    import pandas as pd

    from ml import crm
    from ml.config import POLICY
    from ml.quality import require_valid
    from ml.registry import load_model_version
    from ml.score import batch_id, decide

    day = as_date(as_of)
    shop = require_valid(source, as_of=day)
    frames: dict[str, list] = {}
    versions: dict[str, str] = {}
    for part in scored:
        frames.setdefault(part["offer_type"], []).append(pd.read_parquet(part["path"]))
        versions[part["offer_type"]] = part["model_version"]
    by_type = {t: pd.concat(fs, ignore_index=True) for t, fs in frames.items()}
    models = {t: load_model_version(t, v) for t, v in versions.items()}
    decision = decide(by_type, models, shop, day, POLICY)
    url = crm_url or config.crm_url()
    bid = batch_id(shop, day, decision.model_versions, POLICY)
    crm.ensure_schema(url)
    status = crm.start_batch(url, bid, day, decision.model_versions, run_ids={})
    if status != "published":
        crm.load_rows(url, bid, decision.offers)
        status = "loading"
    return {"batch_id": bid, "status": status, "n_offers": len(decision.offers),
            "n_control": int(decision.offers["is_control"].sum()) if len(decision.offers) else 0}


def publish(load_result: dict, crm_url: str | None = None) -> dict:
    """The atomic flip (old batch superseded, this one published), after the output suite."""
    from ml import crm
    from ml.config import POLICY

    url = crm_url or config.crm_url()
    if load_result.get("status") == "published":
        return {**load_result, "published": False, "note": "already published by an earlier run"}
    res = crm.publish_batch(url, load_result["batch_id"], retention=POLICY.retention_batches)
    return {**load_result, "published": True, "status": getattr(res, "status", "published")}


def monitor(source: str, as_of: str, crm_url: str | None = None, run_tags: dict | None = None) -> dict:
    """Drift of features and scores vs the champions' references, outcomes of closed batches."""
    from ml.monitor import monitor as run_monitor

    result = run_monitor(source, as_date(as_of), crm_url=crm_url or config.crm_url(), run_tags=run_tags)
    return result.to_dict()


def crm_url_from_airflow(conn_uri: str | None) -> str:
    """Turn an Airflow connection URI into a SQLAlchemy URL (postgres:// → postgresql+psycopg://)."""
    if not conn_uri:
        return config.crm_url()
    if conn_uri.startswith("sqlite:"):
        # Airflow's Connection.get_uri() percent-quotes the path (sqlite:///%2Ftmp%2Fcrm.db).
        from urllib.parse import unquote

        return "sqlite:///" + unquote(conn_uri.removeprefix("sqlite:").removeprefix("///"))
    from ml.crm import normalise_url

    return normalise_url(conn_uri).render_as_string(hide_password=False)
