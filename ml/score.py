"""Scoring as of T (DESIGN §5): champion propensities → policy → reason codes → CRM rows.

The steps are separate functions so the Airflow DAG can map scoring over offer types and
customer shards and run the decision once; ``score`` chains them for the CLI.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.config import POLICY, PolicyConfig
from ml.contract import OFFER_TYPES, Shop
from ml.progress import log, step

KEY_COLUMNS = ["customer_id", "offer_type", "category", "product_id", "segment", "at_risk", "margin"]


def shard_of(customer_ids: pd.Series, n_shards: int) -> np.ndarray:
    """Stable shard number per customer (same on every worker and every run)."""
    if n_shards <= 1:
        return np.zeros(len(customer_ids), dtype=np.int64)
    hashed = pd.util.hash_pandas_object(customer_ids.astype("string"), index=False,
                                        hash_key="offerflow-shard0")
    return (hashed.to_numpy() % np.uint64(n_shards)).astype(np.int64)


def score_offer_type(shop: Shop, as_of: dt.date, offer_type: str, model, model_version: str,
                     shard: int = 0, n_shards: int = 1, context=None) -> pd.DataFrame:
    """Candidates and features as of T for one offer type, with the champion's calibrated propensity.

    Returns the key columns, ``propensity``, ``model_version`` and the model's feature columns
    (kept so reason codes can be computed later for the chosen rows only).
    """
    from ml.dataset import build_examples
    from ml.features import FeatureContext

    if context is None:
        context = FeatureContext.build(shop, as_of)
        context.index.close()  # the joined shop (DuckDB) is not needed once the context is built
    # The shard's customers are cut before any feature is gathered: memory follows the shard.
    mine = shard_of(context.index.customer_ids, n_shards) == shard if n_shards > 1 else None
    examples = build_examples(None, as_of, offer_type, with_labels=False, context=context, customers=mine)
    features = list(model.feature_names)
    out = examples[KEY_COLUMNS + [c for c in features if c not in KEY_COLUMNS]].reset_index(drop=True)
    out["propensity"] = model.predict(None, examples[features]) if len(examples) else np.array([], float)
    out["model_version"] = f"offerflow-{offer_type}/{model_version}"
    return out


@dataclass
class Decision:
    offers: pd.DataFrame
    suppressed: pd.DataFrame
    n_candidates: int
    model_versions: dict[str, str] = field(default_factory=dict)


def decide(scored: dict[str, pd.DataFrame], models: dict, shop: Shop, as_of: dt.date,
           cfg: PolicyConfig = POLICY) -> Decision:
    """Policy + arbitration over all types, then reason codes for the chosen rows only."""
    from ml.policy import apply_policy
    from ml.reasons import reason_codes

    # The policy needs only the key columns: only those are concatenated. Features stay in each
    # type's frame, addressed by candidate_idx minus the type's offset in the concatenation.
    kept = [t for t, df in scored.items() if len(df)]
    offset = dict(zip(kept, np.cumsum([0] + [len(scored[t]) for t in kept[:-1]]).tolist(), strict=True))
    parts = [scored[t][KEY_COLUMNS + ["propensity", "model_version"]].assign(offer_type=t) for t in kept]
    empty = pd.DataFrame(columns=[*KEY_COLUMNS, "propensity", "model_version"])
    candidates = pd.concat(parts, ignore_index=True) if parts else empty
    policy_in = candidates[KEY_COLUMNS + ["propensity"]]
    result = apply_policy(policy_in, shop, as_of, cfg)
    offers = result.offers.copy()
    offers["reason_codes"] = "[]"
    offers["model_version"] = candidates["model_version"].reindex(offers["candidate_idx"]).to_numpy() \
        if len(offers) else pd.Series(dtype="string")
    codes_all = offers["reason_codes"].to_numpy(dtype=object)
    for offer_type, model in models.items():
        mask = (offers["offer_type"] == offer_type).to_numpy(dtype=bool, na_value=False)
        if not mask.any():
            continue
        rows = scored[offer_type].iloc[offers["candidate_idx"].to_numpy()[mask] - offset[offer_type]]
        contrib = model.contributions(rows[list(model.feature_names)])
        values = rows[list(model.feature_names)].assign(category=rows["category"].to_numpy())
        codes = reason_codes(contrib.reset_index(drop=True), values.reset_index(drop=True))
        codes_all[mask] = codes.to_numpy(dtype=object)
    offers["reason_codes"] = pd.array(codes_all, dtype=offers["reason_codes"].dtype)
    start = pd.Timestamp(as_of)
    offers["valid_from"] = start
    offers["valid_until"] = start + pd.Timedelta(days=cfg.offer_valid_days)
    versions = {t: df["model_version"].iloc[0] for t, df in scored.items() if len(df)}
    return Decision(offers.drop(columns=["candidate_idx"]), result.suppressed, len(candidates), versions)


def policy_fingerprint(cfg: PolicyConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str))


def dry_run_summary(decision: Decision) -> str:
    o = decision.offers
    lines = [f"{len(o):,} offers for {o['customer_id'].nunique() if len(o) else 0:,} customers "
             f"from {decision.n_candidates:,} scored candidates "
             f"({int(o['is_control'].sum()) if len(o) else 0:,} in the control group)"]
    if len(o):
        lines.append("offers per type and channel:")
        table = o.pivot_table(index="offer_type", columns="channel", values="customer_id", aggfunc="count",
                              fill_value=0)
        lines.extend("  " + line for line in table.to_string().splitlines())
        ev = o.groupby("offer_type")["expected_value"].mean()
        lines.append("mean expected value: " + ", ".join(f"{k} {v:.2f}" for k, v in ev.items()))
    if len(decision.suppressed):
        lines.append("suppressed by rule:")
        for r in decision.suppressed.itertuples(index=False):
            lines.append(f"  {r.rule:<22} {int(r.n_candidates_removed):>9,}  ({r.share:.1%})")
    return "\n".join(lines)


@dataclass
class ScoreResult:
    batch_id: str | None
    status: str
    n_offers: int
    n_control: int
    summary: str
    path: Path | None = None

    def __str__(self) -> str:
        head = f"batch {self.batch_id}: {self.status}" if self.batch_id else self.status
        return f"{head}\n{self.summary}" + (f"\nwritten to {self.path}" if self.path else "")


def batch_id(shop: Shop, as_of: dt.date, model_versions: dict[str, str], cfg: PolicyConfig) -> str:
    from ml.crm import batch_id_for

    return batch_id_for(as_of, shop.fingerprint(), model_versions, policy_fingerprint(cfg))


def score(source: str, as_of: dt.date, crm_url: str | None = None, dry_run: bool = False,
          out: Path | None = None, offer_types: list[str] | None = None,
          cfg: PolicyConfig = POLICY) -> ScoreResult:
    """Validate → score every type with its champion → decide → publish (or write a Parquet when dry)."""
    from ml import config
    from ml.features import FeatureContext
    from ml.quality import require_valid
    from ml.registry import load_champion

    with step("validate inputs"):
        shop = require_valid(source, as_of=as_of)
    with step("features as of T"):
        context = FeatureContext.build(shop, as_of)
        context.index.close()  # 4 GB less at 1M customers
    scored, models = {}, {}
    for offer_type in offer_types or list(OFFER_TYPES):
        model, version = load_champion(offer_type)
        with step(f"score {offer_type} with champion v{version}") as info:
            scored[offer_type] = score_offer_type(shop, as_of, offer_type, model, version, context=context)
            info["detail"] = f"{len(scored[offer_type]):,} candidates"
        models[offer_type] = model
    with step("policy, arbitration, reason codes") as info:
        decision = decide(scored, models, shop, as_of, cfg)
        info["detail"] = f"{len(decision.offers):,} offers"
    summary = dry_run_summary(decision)
    n_control = int(decision.offers["is_control"].sum()) if len(decision.offers) else 0
    if dry_run:
        path = Path(out or config.var_dir() / f"offers_{as_of:%Y%m%d}.parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        decision.offers.to_parquet(path, index=False)
        return ScoreResult(None, "dry run: nothing published", len(decision.offers), n_control, summary, path)
    from ml import crm

    url = crm_url or config.crm_url()
    bid = batch_id(shop, as_of, decision.model_versions, cfg)
    with step(f"publish batch {bid}") as info:
        res = crm.publish(url, decision.offers, bid, as_of, decision.model_versions, run_ids={},
                          retention=cfg.retention_batches)
        info["detail"] = res.status if hasattr(res, "status") else str(res)
    log.info("CRM %s: %s", url.split("@")[-1], res)
    return ScoreResult(bid, getattr(res, "status", str(res)), len(decision.offers), n_control, summary)
