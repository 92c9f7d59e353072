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


def _model_versions(scored: list[dict]) -> dict[str, str]:
    """The registered model behind each type that produced candidates, as ``decide`` names them."""
    rows: dict[str, int] = {}
    versions: dict[str, str] = {}
    for part in scored:
        rows[part["offer_type"]] = rows.get(part["offer_type"], 0) + int(part.get("rows", 1))
        versions[part["offer_type"]] = f"offerflow-{part['offer_type']}/{part['model_version']}"
    return {t: v for t, v in versions.items() if rows[t] > 0}


def open_batch(source: str, as_of: str, scored: list[dict], crm_url: str | None = None) -> list[dict]:
    """Open the run's `loading` batch once, then one load job per customer shard.

    The batch id is deterministic (data, models, policy), so a rerun reopens its own batch and a
    published one is left alone (every job then says so and loads nothing).
    """
    from ml import crm
    from ml.config import POLICY
    from ml.quality import require_valid
    from ml.score import batch_id

    day = as_date(as_of)
    shop = require_valid(source, as_of=day)
    versions = _model_versions(scored)
    bid = batch_id(shop, day, versions, POLICY)
    url = crm_url or config.crm_url()
    crm.ensure_schema(url)
    status = crm.start_batch(url, bid, day, versions, run_ids={})
    shards: dict[int, list[dict]] = {}
    for part in scored:
        shards.setdefault(int(part.get("shard", 0)), []).append(part)
    return [{"batch_id": bid, "status": status, "shard": shard, "parts": parts}
            for shard, parts in sorted(shards.items())]


def load_shard(source: str, as_of: str, job: dict, crm_url: str | None = None) -> dict:
    """Policy, arbitration and reason codes for one customer shard, appended to the `loading` batch.

    Every rule of the policy is per customer (consent, caps, cooldown, arbitration, control group)
    and shards split customers, so the shards' rows together are the unsharded decision
    (tests/test_sharding.py); a worker holds only its shard's candidates.
    """
    import pandas as pd

    from ml import crm
    from ml.config import POLICY
    from ml.quality import require_valid
    from ml.registry import load_model_version
    from ml.score import decide

    out = {"batch_id": job["batch_id"], "shard": job["shard"], "n_offers": 0, "n_control": 0}
    if job["status"] == "published":
        return {**out, "status": "published"}
    day = as_date(as_of)
    shop = require_valid(source, as_of=day)
    frames: dict[str, list] = {}
    versions: dict[str, str] = {}
    for part in job["parts"]:
        frames.setdefault(part["offer_type"], []).append(pd.read_parquet(part["path"]))
        versions[part["offer_type"]] = part["model_version"]
    by_type = {t: pd.concat(fs, ignore_index=True) for t, fs in frames.items()}
    models = {t: load_model_version(t, v) for t, v in versions.items()}
    offers = decide(by_type, models, shop, day, POLICY).offers
    if len(offers):
        crm.load_rows(crm_url or config.crm_url(), job["batch_id"], offers)
    return {**out, "status": "loading", "n_offers": len(offers),
            "n_control": int(offers["is_control"].sum()) if len(offers) else 0}


def _combine(loads: list[dict]) -> dict:
    """One result for the batch from its shards' load results."""
    ids = {r["batch_id"] for r in loads}
    if len(ids) != 1:
        raise ValueError(f"shard results name {len(ids)} batches, expected one: {sorted(ids)}")
    status = "published" if any(r["status"] == "published" for r in loads) else "loading"
    return {"batch_id": ids.pop(), "status": status, "shards": len(loads),
            "n_offers": sum(r["n_offers"] for r in loads), "n_control": sum(r["n_control"] for r in loads)}


def decide_and_load(source: str, as_of: str, scored: list[dict], crm_url: str | None = None) -> dict:
    """``open_batch`` and every shard's ``load_shard`` in this process (the CLI's and tests' path)."""
    jobs = open_batch(source, as_of, scored, crm_url=crm_url)
    return _combine([load_shard(source, as_of, job, crm_url=crm_url) for job in jobs])


def publish(load_result: dict | list[dict], crm_url: str | None = None) -> dict:
    """The atomic flip (old batch superseded, this one published), after the output suite.

    Takes the combined load result or the list of shard results (the mapped DAG task's output).
    """
    from ml import crm
    from ml.config import POLICY

    if not isinstance(load_result, dict):
        load_result = _combine(list(load_result))
    url = crm_url or config.crm_url()
    if load_result.get("status") == "published":
        return {**load_result, "published": False, "note": "already published by an earlier run"}
    res = crm.publish_batch(url, load_result["batch_id"], retention=POLICY.retention_batches)
    return {**load_result, "published": True, "status": getattr(res, "status", "published"),
            "n_offers": getattr(res, "n_offers", load_result.get("n_offers")),
            "n_control": getattr(res, "n_control", load_result.get("n_control"))}


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
