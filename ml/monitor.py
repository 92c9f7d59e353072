"""Monitoring (DESIGN §8 ``offers_monitor``): feature/score drift against the training reference, and
the realised outcome of past CRM batches, treated vs control (uplift), logged to MLflow.

Drift
    Every champion carries a training ``reference`` (``ml.model.drift_reference``): per numeric feature
    the decile bin edges and the training shares in those bins (plus the missing share), per categorical
    feature the shares of its top categories (+ other, + missing), and the same for the calibrated score.
    PSI = Σ (a − e) · ln(a / e) over those bins, with the missing share as one more bin (a feature that
    suddenly goes missing drifts), shares floored at ``PSI_EPS``. KS for numeric features is the largest
    gap between the training and current CDFs at the stored edges — exact at those points, so a lower
    bound of the true KS with ~10 points of resolution (``ks_points`` says how many). If the reference
    carries a finer grid (``quantiles`` + ``cdf``: the CDF of the training values at ~100 quantiles, see
    ``ks_statistic``) it is used instead. KS is judged only with ``min_rows`` non-missing values.
    ``MonitorConfig.exempt_features`` stay in the table but raise neither the overall status nor
    retraining (they drift by construction, see there).

Outcomes
    For each ``published``/``superseded`` batch whose window [T, T + H) has closed by the evaluation
    date, per offer type and channel (and ``all`` channels): the unit is the *customer* (the control
    group is drawn per customer, so the randomisation unit and the analysis unit agree). A customer
    converts when they bought in any category they were offered (in that group) within the window.
    Treated = not control; when ``offer_history`` shows that the CRM sent the batch's offers (same
    customer and product, ``sent_at`` in the window) only the customers actually sent count as treated
    (``exposure`` = ``sent``), otherwise all assigned ones (``exposure`` = ``assigned``, intent to
    treat). The 95% CI of the absolute uplift is Newcombe's hybrid score interval (the two Wilson
    intervals combined: a normal approximation that keeps its coverage at small counts and at 0
    conversions, where the plain Wald interval collapses to a point); the relative uplift uses the
    log risk ratio (Katz). Incremental margin per 1,000 treated customers = 1000 × uplift × mean margin
    of the offered products (one unit, ``ml.tiers.product_margins``).

Only aggregates leave this module: no customer id, email or any row-level value reaches MLflow or the
outcomes table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy.stats import norm

from ml.config import MODEL
from ml.contract import OFFER_TYPES, Shop
from ml.progress import log, step

MONITOR_EXPERIMENT = "offerflow/monitoring"
OUTCOMES = "crm_offer_outcomes"
PSI_EPS = 1e-4  # share floor: an empty bin on one side gives a large but finite PSI
SCORE = "score"  # the feature name of the calibrated score's row in the drift table
MAX_REASONS = 20  # in to_dict (an XCom); the drift table has them all
STATUS_ORDER = {"n/a": -1, "ok": 0, "warn": 1, "alert": 2}

DRIFT_COLUMNS = ["offer_type", "feature", "kind", "psi", "ks", "ks_points", "missing_ref", "missing_cur",
                 "n_ref", "n_cur", "top_bin", "status"]
OUTCOME_COLUMNS = [
    "batch_id", "batch_as_of", "window_end", "offer_type", "channel", "exposure",
    "n_assigned", "share_sent", "n_treated", "conv_treated", "rate_treated",
    "n_control", "conv_control", "rate_control",
    "uplift_abs", "uplift_ci_low", "uplift_ci_high", "uplift_rel", "uplift_rel_ci_low", "uplift_rel_ci_high",
    "margin_per_conversion", "incr_margin_per_1000", "incr_margin_ci_low", "incr_margin_ci_high",
    "horizon_days", "evaluated_as_of",
]


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the monitor (all configurable; the defaults are the usual rules of thumb)."""

    psi_warn: float = 0.10
    psi_alert: float = 0.25
    ks_warn: float = 0.10
    ks_alert: float = 0.20
    min_rows: int = 100  # fewer current rows than this: drift is not judged ("n/a")
    min_alert_features: int = 3  # retrain when at least this many features of one type are in alert
    # In the drift table with their own status, but counted neither in the overall status nor by the
    # retrain rule, because they drift without any change in behaviour: days_since_first_order is a
    # clock for every customer whose history starts with the data (it rises by one a day; tenure_days,
    # from the signup date, is the behavioural one); cat_buyers_share_90d is a per-category aggregate,
    # one value per category, so a hair's move across a decile edge shifts a whole category's rows
    # (PSI > 1 on an unchanged simulated shop).
    exempt_features: tuple[str, ...] = ("days_since_first_order", "cat_buyers_share_90d")
    retrain_on_score_alert: bool = True  # ... or when the score distribution itself is in alert
    horizon_days: int = MODEL.horizon_days
    confidence: float = 0.95
    min_sent_share: float = 0.5  # offer_history must show this share of a batch's treated offers as sent
    min_group_customers: int = 30  # treated and control each: smaller groups do not count for decay
    min_uplift_abs: float = 0.0  # retrain when the latest batch's uplift CI lies entirely below this
    uplift_decay: float = 0.5  # ... or below this share of the pooled uplift of the earlier batches
    default_margin_rate: float = MODEL.default_margin_rate
    plots: bool = True


# ---------------------------------------------------------------------------------------------- drift
def psi(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPS) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.clip(np.asarray(expected, dtype="float64"), eps, None)
    a = np.clip(np.asarray(actual, dtype="float64"), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _contributions(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPS) -> np.ndarray:
    e = np.clip(np.asarray(expected, dtype="float64"), eps, None)
    a = np.clip(np.asarray(actual, dtype="float64"), eps, None)
    return (a - e) * np.log(a / e)


def _numeric(values: Any) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").astype("float64").to_numpy(na_value=np.nan)


def ks_statistic(ref: dict, values: np.ndarray) -> tuple[float, int]:
    """(KS, number of points) between the training CDF stored in ``ref`` and the current values.

    Uses ``ref["quantiles"]``/``ref["cdf"]`` when present (a fine grid), else the bin ``edges`` with the
    CDF they imply (cumulative ``proportions``; bins are right-closed, so it is exact at each edge).
    Both compare the CDFs of the non-missing values; missing shares are PSI's business.
    """
    v = values[~np.isnan(values)]
    if "quantiles" in ref and "cdf" in ref:
        points = np.asarray(ref["quantiles"], dtype="float64")
        f_ref = np.asarray(ref["cdf"], dtype="float64")
    else:
        points = np.asarray(ref.get("edges", []), dtype="float64")
        f_ref = np.cumsum(np.asarray(ref.get("proportions", []), dtype="float64"))[:len(points)]
    if not len(points) or not len(v):
        return float("nan"), len(points)
    f_cur = np.searchsorted(np.sort(v), points, side="right") / len(v)
    return float(np.max(np.abs(f_cur - f_ref))), len(points)


def _bin_labels(edges: list[float]) -> list[str]:
    def fmt(x: float) -> str:
        return f"{x:.4g}"
    if not edges:
        return ["all"]
    inner = [f"({fmt(a)}, {fmt(b)}]" for a, b in itertools.pairwise(edges)]
    return [f"<= {fmt(edges[0])}", *inner, f"> {fmt(edges[-1])}"]


def _numeric_row(ref: dict, values: np.ndarray) -> dict:
    from ml.model import bin_proportions

    edges = list(ref.get("edges", []))
    miss_ref = float(ref.get("missing", 0.0))
    n = len(values)
    miss_cur = float(np.isnan(values).mean()) if n else float("nan")
    exp = np.append(np.asarray(ref["proportions"], dtype="float64") * (1 - miss_ref), miss_ref)
    row = {"kind": "numeric", "missing_ref": miss_ref, "missing_cur": miss_cur, "n_cur": n}
    if not n:
        return {**row, "psi": float("nan"), "ks": float("nan"), "ks_points": len(edges), "top_bin": ""}
    act = np.append(bin_proportions(values, edges) * (1 - miss_cur), miss_cur)
    contrib = _contributions(exp, act)
    labels = [*_bin_labels(edges), "missing"]
    ks, points = ks_statistic(ref, values)
    return {**row, "psi": float(contrib.sum()), "ks": ks, "ks_points": points,
            "top_bin": labels[int(np.argmax(contrib))]}


def _categorical_row(ref: dict, values: pd.Series) -> dict:
    s = pd.Series(values).astype("string")
    n = len(s)
    cats = [str(c) for c in ref.get("categories", [])]
    exp = np.array([*ref.get("proportions", []), ref.get("other", 0.0), ref.get("missing", 0.0)], "float64")
    row = {"kind": "categorical", "missing_ref": float(ref.get("missing", 0.0)), "ks": float("nan"),
           "ks_points": 0, "n_cur": n}
    if not n:
        return {**row, "missing_cur": float("nan"), "psi": float("nan"), "top_bin": ""}
    counts = s.value_counts(dropna=True)
    known = counts.reindex(cats).fillna(0).to_numpy("float64")
    missing = float(s.isna().sum())
    other = float(n - missing - known.sum())
    act = np.array([*known, other, missing]) / n
    contrib = _contributions(exp, act)
    labels = [*cats, "(other)", "(missing)"]
    return {**row, "missing_cur": missing / n, "psi": float(contrib.sum()),
            "top_bin": labels[int(np.argmax(contrib))]}


def _status(psi_value: float, ks_value: float, n_cur: int, cfg: MonitorConfig,
            n_values: float | None = None) -> str:
    """ok/warn/alert from PSI and KS; KS counts only with ``min_rows`` non-missing current values (a
    feature that is 99% missing has a KS of a few dozen values: noise, while PSI sees the missing share)."""
    if n_cur < cfg.min_rows or math.isnan(psi_value):
        return "n/a"
    ks_value = 0.0 if math.isnan(ks_value) or (n_values is not None and n_values < cfg.min_rows) \
        else ks_value
    if psi_value >= cfg.psi_alert or ks_value >= cfg.ks_alert:
        return "alert"
    if psi_value >= cfg.psi_warn or ks_value >= cfg.ks_warn:
        return "warn"
    return "ok"


def feature_drift(model, current: pd.DataFrame, cfg: MonitorConfig | None = None,
                  scores: np.ndarray | None = None) -> pd.DataFrame:
    """One row per feature of ``model.reference`` (and one for the score): PSI, KS, missing shares, status.

    ``current`` holds the model's feature columns as of T (``ml.dataset.build_examples`` rows); the score
    is ``model.predict_proba(current)`` unless ``scores`` are given. Rows: offer_type, feature, kind
    (numeric/categorical/score), psi, ks (numeric only), ks_points, missing_ref, missing_cur, n_ref,
    n_cur, top_bin (the bin or category that contributes most to PSI), status (ok/warn/alert; ``n/a``
    when fewer than ``cfg.min_rows`` current rows).
    """
    cfg = cfg or MonitorConfig()
    ref = getattr(model, "reference", None) or {}
    if not ref.get("features"):
        raise ValueError(f"{getattr(model, 'offer_type', '') or 'model'} has no drift reference; "
                         "it was trained before references were stored: retrain it")
    rows = []
    for name, fref in ref["features"].items():
        if name not in current.columns:
            rows.append({"feature": name, "kind": fref.get("kind", ""), "psi": float("nan"),
                         "ks": float("nan"), "ks_points": 0, "missing_ref": float(fref.get("missing", 0.0)),
                         "missing_cur": float("nan"), "n_cur": 0, "top_bin": "(column absent)"})
            continue
        if fref.get("kind") == "categorical":
            rows.append({"feature": name, **_categorical_row(fref, current[name])})
        else:
            rows.append({"feature": name, **_numeric_row(fref, _numeric(current[name]))})
    if ref.get("score"):
        if scores is None:
            scores = model.predict_proba(current) if len(current) else np.array([], dtype="float64")
        rows.append({"feature": SCORE, **_numeric_row(ref["score"], np.asarray(scores, dtype="float64")),
                     "kind": "score"})
    table = pd.DataFrame(rows)
    table["offer_type"] = getattr(model, "offer_type", "") or ""
    table["n_ref"] = int(ref.get("n_rows", 0))
    n_values = table["n_cur"] * (1 - table["missing_cur"].fillna(0.0))
    cols = zip(table["psi"], table["ks"], table["n_cur"], n_values, strict=True)
    table["status"] = [_status(p, k, n, cfg, v) for p, k, n, v in cols]
    return table[DRIFT_COLUMNS]


def _reason(row) -> str:
    who = f"{row.offer_type}/{row.feature}" if getattr(row, "offer_type", "") else str(row.feature)
    text = f"{who} PSI {row.psi:.2f}"
    if isinstance(row.ks, float) and not math.isnan(row.ks):
        text += f" KS {row.ks:.2f}"
    if getattr(row, "top_bin", ""):
        text += f" (most in {row.top_bin})"
    return text


def drift_status(table: pd.DataFrame, exempt: tuple[str, ...] | list[str] = ()) -> tuple[str, list[str]]:
    """Overall ok/warn/alert (the worst row not in ``exempt``) and readable reasons, worst first.

    A reason reads like ``upsell/cat_orders_90d PSI 0.31 KS 0.22 (most in > 4) [alert]``.
    """
    if table is not None and len(exempt):
        table = table[~table["feature"].isin(list(exempt))]
    if table is None or not len(table):
        return "ok", []
    t = table.assign(_rank=table["status"].map(STATUS_ORDER).fillna(-1))
    worst = int(t["_rank"].max())
    if worst <= 0:
        return "ok", []
    bad = t[t["_rank"] >= 1].sort_values(["_rank", "psi"], ascending=[False, False], kind="stable")
    status = "alert" if worst == 2 else "warn"
    return status, [f"{_reason(r)} [{r.status}]" for r in bad.itertuples(index=False)]


# ------------------------------------------------------------------------------------------- outcomes
def _wilson(x: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


def uplift_ci(conv_t, n_t, conv_c, n_c, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Absolute uplift p_t − p_c with Newcombe's hybrid score CI, relative uplift with the Katz log-RR CI.

    Vectorised over groups; NaN where a group is empty (or, for the relative CI, without conversions).
    """
    xt, nt, xc, nc = (np.atleast_1d(np.asarray(a, dtype="float64")) for a in (conv_t, n_t, conv_c, n_c))
    z = float(norm.ppf(0.5 + confidence / 2))
    pt, lt, ut = _wilson(xt, nt, z)
    pc, lc, uc = _wilson(xc, nc, z)
    d = pt - pc
    with np.errstate(divide="ignore", invalid="ignore"):
        low = d - np.sqrt((pt - lt) ** 2 + (uc - pc) ** 2)
        high = d + np.sqrt((ut - pt) ** 2 + (pc - lc) ** 2)
        rel = pt / pc - 1
        se = np.sqrt(1 / xt - 1 / nt + 1 / xc - 1 / nc)
        ok = (xt > 0) & (xc > 0)
        rel_low = np.where(ok, np.exp(np.log(pt / pc) - z * se) - 1, np.nan)
        rel_high = np.where(ok, np.exp(np.log(pt / pc) + z * se) - 1, np.nan)
    rel = np.where(pc > 0, rel, np.nan)
    return {"rate_treated": pt, "rate_control": pc, "uplift_abs": d, "uplift_ci_low": low,
            "uplift_ci_high": high, "uplift_rel": rel, "uplift_rel_ci_low": rel_low,
            "uplift_rel_ci_high": rel_high}


def _crm_tables(url: str, schema: str | None):
    from ml import crm

    return crm._schema(schema)


def _read_closed_batches(url: str, as_of: dt.date, horizon_days: int, schema: str | None,
                         exclude: set[str] | frozenset[str] = frozenset()
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(batches, offers) of the published/superseded batches whose window closed by ``as_of``."""
    from ml import crm

    s = _crm_tables(url, schema)
    with crm._engine(url, schema) as engine, engine.connect() as conn:
        insp = sa.inspect(conn)
        if not (insp.has_table(crm.BATCHES, schema=schema) and insp.has_table(crm.OFFERS, schema=schema)):
            return pd.DataFrame(columns=["batch_id", "as_of"]), pd.DataFrame()
        b = s.batches
        rows = conn.execute(sa.select(b.c.batch_id, b.c.as_of)
                            .where(b.c.status.in_(("published", "superseded")))).all()
        batches = pd.DataFrame(rows, columns=["batch_id", "as_of"])
        if len(batches):
            batches["as_of"] = pd.to_datetime(batches["as_of"]).dt.date
            end = batches["as_of"] + pd.to_timedelta(horizon_days, unit="D")
            batches = batches[(end.map(lambda d: pd.Timestamp(d).date()) <= as_of)
                              & ~batches["batch_id"].isin(list(exclude))]
        batches = batches.sort_values(["as_of", "batch_id"], kind="stable").reset_index(drop=True)
        if not len(batches):
            return batches, pd.DataFrame()
        o = s.offers
        cols = [o.c.batch_id, o.c.customer_id, o.c.offer_type, o.c.category, o.c.product_id, o.c.channel,
                o.c.is_control]
        frames = []
        ids = batches["batch_id"].tolist()
        for i in range(0, len(ids), 500):
            q = sa.select(*cols).where(o.c.batch_id.in_(ids[i:i + 500]))
            frames.append(pd.DataFrame(conn.execute(q).all(), columns=[c.name for c in cols]))
    offers = pd.concat(frames, ignore_index=True)
    offers["is_control"] = offers["is_control"].astype(str).str.lower().isin(["1", "true", "t"])
    for c in ("batch_id", "customer_id", "offer_type", "category", "product_id", "channel"):
        offers[c] = offers[c].astype("string")
    return batches, offers


def _purchases(shop: Shop) -> pd.DataFrame:
    """customer_id, category, ts of every order line (category via the catalogue)."""
    lines = shop.order_lines[["order_id", "product_id"]].merge(
        shop.orders[["order_id", "customer_id", "order_ts"]], on="order_id", how="inner")
    cat = shop.products[["product_id", "category"]].astype({"product_id": "string", "category": "string"})
    lines = lines.astype({"product_id": "string"}).merge(cat, on="product_id", how="inner")
    return pd.DataFrame({"customer_id": lines["customer_id"].astype("string"),
                         "category": lines["category"].astype("string"),
                         "ts": pd.to_datetime(lines["order_ts"], utc=True).dt.tz_convert(None)})


def _window(df: pd.DataFrame, col: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    return df[(df[col] >= start) & (df[col] < end)]


def _batch_outcomes(offers: pd.DataFrame, purchases: pd.DataFrame, sent: pd.DataFrame | None,
                    margins: pd.Series, start: pd.Timestamp, end: pd.Timestamp,
                    min_sent_share: float) -> pd.DataFrame:
    """Per (offer_type, channel incl. 'all', is_control, customer): converted, sent, mean offered margin."""
    bought = _window(purchases, "ts", start, end)[["customer_id", "category"]].drop_duplicates()
    o = offers.merge(bought.assign(_bought=True), on=["customer_id", "category"], how="left")
    o["_bought"] = o["_bought"].fillna(False).astype(bool)
    if sent is not None and len(sent):
        s = _window(sent, "sent_at", start, end)[["customer_id", "product_id"]].drop_duplicates()
        o = o.merge(s.assign(_sent=True), on=["customer_id", "product_id"], how="left")
        o["_sent"] = o["_sent"].fillna(False).astype(bool)
    else:
        o["_sent"] = False
    o["_margin"] = margins.reindex(o["product_id"].astype(str)).to_numpy()
    # offer_history may hold other campaigns (the simulator's, a CRM's own): it describes this batch only
    # when most of the batch's treated offers appear in it; otherwise measure intent to treat.
    treated_sent = o.loc[~o["is_control"], "_sent"]
    exposure = "sent" if len(treated_sent) and treated_sent.mean() >= min_sent_share else "assigned"
    both = pd.concat([o, o.assign(channel="all")], ignore_index=True)
    per_customer = both.groupby(["offer_type", "channel", "is_control", "customer_id"], observed=True,
                                sort=False).agg(converted=("_bought", "any"), sent=("_sent", "any"),
                                                margin=("_margin", "mean")).reset_index()
    per_customer["exposure"] = exposure
    return per_customer


def outcomes(crm_url: str, shop: Shop, as_of: dt.date, horizon_days: int = MODEL.horizon_days,
             cfg: MonitorConfig | None = None, schema: str | None = None,
             exclude: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """Treated vs control conversion per closed batch, offer type and channel (plus channel ``all``).

    ``shop`` must hold the orders up to ``as_of`` (rows at or after ``as_of`` are ignored). Returns
    ``OUTCOME_COLUMNS``; empty when no batch window [batch.as_of, + H) has closed by ``as_of``.
    Batches in ``exclude`` are skipped (``monitor`` passes those measured before: a closed window's
    outcome is final).
    """
    cfg = cfg or MonitorConfig()
    as_of = pd.Timestamp(as_of).date()
    batches, offers = _read_closed_batches(crm_url, as_of, horizon_days, schema, exclude)
    if not len(batches) or not len(offers):
        return pd.DataFrame({c: pd.Series(dtype="object") for c in OUTCOME_COLUMNS})
    from ml.tiers import product_margins

    limit = pd.Timestamp(as_of)
    purchases = _purchases(shop)
    purchases = purchases[purchases["ts"] < limit]
    margins = product_margins(shop.products, cfg.default_margin_rate)
    margins.index = margins.index.astype(str)
    hist = shop.offer_history
    sent = None
    if len(hist):
        sent = pd.DataFrame({"customer_id": hist["customer_id"].astype("string"),
                             "product_id": hist["product_id"].astype("string"),
                             "sent_at": pd.to_datetime(hist["sent_at"], utc=True).dt.tz_convert(None)})
        sent = sent[sent["sent_at"] < limit]
    parts = []
    for b in batches.itertuples(index=False):
        start = pd.Timestamp(b.as_of)
        end = start + pd.Timedelta(days=horizon_days)
        rows = offers[offers["batch_id"] == b.batch_id]
        if not len(rows):
            continue
        pc = _batch_outcomes(rows, purchases, sent, margins, start, end, cfg.min_sent_share)
        pc["batch_id"], pc["batch_as_of"], pc["window_end"] = b.batch_id, b.as_of, end.date()
        parts.append(pc)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in OUTCOME_COLUMNS})
    pc = pd.concat(parts, ignore_index=True)
    treated_mask = ~pc["is_control"] & ((pc["exposure"] == "assigned") | pc["sent"])
    keys = ["batch_id", "batch_as_of", "window_end", "offer_type", "channel", "exposure"]
    g_assigned = pc[~pc["is_control"]].groupby(keys, sort=False).agg(n_assigned=("sent", "size"),
                                                                     share_sent=("sent", "mean"))
    g_t = pc[treated_mask].groupby(keys, sort=False).agg(n_treated=("converted", "size"),
                                                         conv_treated=("converted", "sum"),
                                                         margin_per_conversion=("margin", "mean"))
    g_c = pc[pc["is_control"]].groupby(keys, sort=False).agg(n_control=("converted", "size"),
                                                             conv_control=("converted", "sum"))
    out = pd.concat([g_assigned, g_t, g_c], axis=1).reset_index()
    for c in ("n_assigned", "n_treated", "conv_treated", "n_control", "conv_control"):
        out[c] = out[c].fillna(0).astype("int64")
    stats = uplift_ci(out["conv_treated"], out["n_treated"], out["conv_control"], out["n_control"],
                      cfg.confidence)
    for k, v in stats.items():
        out[k] = v
    m = out["margin_per_conversion"].astype("float64")
    out["incr_margin_per_1000"] = 1000 * out["uplift_abs"] * m
    out["incr_margin_ci_low"] = 1000 * out["uplift_ci_low"] * m
    out["incr_margin_ci_high"] = 1000 * out["uplift_ci_high"] * m
    out["horizon_days"] = int(horizon_days)
    out["evaluated_as_of"] = as_of
    out["_all"] = out["channel"] == "all"
    out = out.sort_values(["batch_as_of", "batch_id", "offer_type", "_all", "channel"], kind="stable")
    return out[OUTCOME_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------------- outcomes table
def _outcomes_table(schema: str | None) -> sa.Table:
    from ml import crm

    crm.check_identifier(OUTCOMES)
    if schema is not None:
        crm.check_identifier(schema)
    md = sa.MetaData(schema=schema)
    text_keys = ("batch_id", "offer_type", "channel")
    ints = ("n_assigned", "n_treated", "conv_treated", "n_control", "conv_control", "horizon_days")
    dates = ("batch_as_of", "window_end", "evaluated_as_of")
    cols = []
    for c in OUTCOME_COLUMNS:
        if c in text_keys:
            cols.append(sa.Column(c, sa.Text, primary_key=True))
        elif c == "exposure":
            cols.append(sa.Column(c, sa.Text, nullable=False))
        elif c in ints:
            cols.append(sa.Column(c, sa.Integer, nullable=False))
        elif c in dates:
            cols.append(sa.Column(c, sa.Date, nullable=False))
        else:
            cols.append(sa.Column(c, sa.Float))
    cols.append(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False))
    return sa.Table(OUTCOMES, md, *cols)


def _py(v: Any) -> Any:
    """Plain Python values for bound parameters (NaN → NULL)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, float | np.floating):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer | np.bool_):
        return v.item()
    if isinstance(v, pd.Timestamp):
        return v.date()
    return v


def _add_missing_columns(conn: sa.Connection, t: sa.Table) -> None:
    """Additive migration: columns added by a newer version arrive nullable (old rows have no value)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(t.name, schema=t.schema)}
    prep = conn.dialect.identifier_preparer
    for col in t.columns:
        if col.name not in have:
            conn.execute(sa.DDL(f"ALTER TABLE {prep.format_table(t)} ADD COLUMN {prep.quote(col.name)} "
                                f"{col.type.compile(dialect=conn.dialect)}"))


def write_outcomes(crm_url: str, table: pd.DataFrame, schema: str | None = None) -> int:
    """Upsert ``outcomes()`` rows into ``crm_offer_outcomes`` (created if absent); returns rows written.

    Keyed by (batch_id, offer_type, channel): rows of the same keys are replaced in one transaction, so
    a rerun (or a later evaluation of the same batch) never duplicates. Outcomes outlive CRM retention.
    """
    from ml import crm

    t = _outcomes_table(schema)
    with crm._engine(crm_url, schema) as engine, crm._write(engine) as conn:
        if schema is not None and engine.dialect.name == "postgresql":
            conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        t.create(conn, checkfirst=True)
        _add_missing_columns(conn, t)
        if table is None or not len(table):
            return 0
        now = dt.datetime.now(dt.UTC)
        records = [{c: _py(v) for c, v in zip(OUTCOME_COLUMNS, r, strict=True)} | {"updated_at": now}
                   for r in table[OUTCOME_COLUMNS].itertuples(index=False, name=None)]
        for r in records:
            conn.execute(t.delete().where(t.c.batch_id == r["batch_id"], t.c.offer_type == r["offer_type"],
                                          t.c.channel == r["channel"]))
        conn.execute(t.insert(), records)
    return len(records)


def read_outcomes(crm_url: str, schema: str | None = None) -> pd.DataFrame:
    """The stored outcomes, oldest batch first (empty when the table does not exist yet)."""
    from ml import crm

    t = _outcomes_table(schema)
    with crm._engine(crm_url, schema) as engine, engine.connect() as conn:
        if not sa.inspect(conn).has_table(OUTCOMES, schema=schema):
            return pd.DataFrame(columns=[*OUTCOME_COLUMNS, "updated_at"])
        q = sa.select(t).order_by(t.c.batch_as_of, t.c.batch_id, t.c.offer_type, t.c.channel)
        df = pd.DataFrame(conn.execute(q).all(), columns=[c.name for c in t.columns])
    for c in df.columns:
        if isinstance(t.c[c].type, sa.Float):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        elif isinstance(t.c[c].type, sa.Integer):
            df[c] = df[c].astype("int64")
        elif isinstance(t.c[c].type, sa.Date):
            df[c] = pd.to_datetime(df[c]).dt.date
    return df


# ------------------------------------------------------------------------------------ retrain rules
def uplift_decay(table: pd.DataFrame, cfg: MonitorConfig | None = None) -> list[str]:
    """Reasons to retrain from outcomes: per offer type (channel ``all``), the latest closed batch with
    enough customers has its uplift CI entirely below ``min_uplift_abs``, or entirely below
    ``uplift_decay`` × the pooled uplift of the earlier batches (when that was positive)."""
    cfg = cfg or MonitorConfig()
    if table is None or not len(table):
        return []
    t = table[(table["channel"] == "all") & (table["n_treated"] >= cfg.min_group_customers)
              & (table["n_control"] >= cfg.min_group_customers)]
    reasons = []
    for offer_type, g in t.groupby("offer_type", sort=True):
        g = g.sort_values(["batch_as_of", "batch_id"], kind="stable")
        last = g.iloc[-1]
        if last["uplift_ci_high"] < cfg.min_uplift_abs:
            reasons.append(f"{offer_type}: uplift {last['uplift_abs']:+.3f} "
                           f"(95% CI {last['uplift_ci_low']:+.3f}..{last['uplift_ci_high']:+.3f}) of batch "
                           f"{last['batch_id']} is below "
                           f"{cfg.min_uplift_abs:+.3f}")
            continue
        earlier = g.iloc[:-1]
        if len(earlier):
            pooled = uplift_ci(earlier["conv_treated"].sum(), earlier["n_treated"].sum(),
                               earlier["conv_control"].sum(), earlier["n_control"].sum(), cfg.confidence)
            base = float(pooled["uplift_abs"][0])
            significant = base > 0 and float(pooled["uplift_ci_low"][0]) > 0
            if significant and last["uplift_ci_high"] < cfg.uplift_decay * base:
                reasons.append(f"{offer_type}: uplift decayed to {last['uplift_abs']:+.3f} (95% CI up to "
                               f"{last['uplift_ci_high']:+.3f}) from {base:+.3f} over earlier batches")
    return reasons


def drift_retrain_reasons(table: pd.DataFrame, cfg: MonitorConfig | None = None) -> list[str]:
    """Reasons to retrain from drift: per offer type, ``min_alert_features`` features in alert (those in
    ``exempt_features`` not counted: they drift by construction), or the score itself in alert."""
    cfg = cfg or MonitorConfig()
    if table is None or not len(table):
        return []
    reasons = []
    for offer_type, g in table.groupby("offer_type", sort=True):
        feats = g[(g["kind"] != "score") & (g["status"] == "alert") & ~g["feature"].isin(cfg.exempt_features)]
        feats = feats.sort_values("psi", ascending=False)
        score = g[(g["kind"] == "score") & (g["status"] == "alert")]
        if len(feats) >= cfg.min_alert_features:
            names = ", ".join(f"{r.feature} PSI {r.psi:.2f}" for r in feats.head(5).itertuples())
            reasons.append(f"{offer_type}: {len(feats)} features in drift alert ({names})")
        if cfg.retrain_on_score_alert and len(score):
            r = score.iloc[0]
            reasons.append(f"{offer_type}: score distribution drifted (PSI {r['psi']:.2f})")
    return reasons


# ----------------------------------------------------------------------------------------- plots
def plot_psi(table: pd.DataFrame, cfg: MonitorConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[table["psi"].notna()].sort_values("psi", kind="stable")
    colours = t["status"].map({"ok": "tab:green", "warn": "tab:orange", "alert": "tab:red"}).fillna("grey")
    labels = (t["offer_type"] + "/" + t["feature"]).tolist() if t["offer_type"].nunique() > 1 \
        else t["feature"].tolist()
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.25 * len(t) + 1.2)))
    ax.barh(labels, t["psi"], color=colours.tolist())
    ax.axvline(cfg.psi_warn, color="tab:orange", ls="--", lw=1, label=f"warn {cfg.psi_warn}")
    ax.axvline(cfg.psi_alert, color="tab:red", ls="--", lw=1, label=f"alert {cfg.psi_alert}")
    types = ", ".join(sorted(t["offer_type"].unique()))
    ax.set(xlabel="PSI vs training reference", title=f"Feature and score drift ({types})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_uplift(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[table["channel"] == "all"].sort_values("batch_as_of", kind="stable")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (offer_type, g) in enumerate(t.groupby("offer_type", sort=True)):
        x = pd.to_datetime(g["batch_as_of"]) + pd.Timedelta(hours=6 * i)  # side by side, same day
        y = g["uplift_abs"].to_numpy("float64")
        err = np.vstack([y - g["uplift_ci_low"].to_numpy("float64"),
                         g["uplift_ci_high"].to_numpy("float64") - y])
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=offer_type)
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="batch as-of date", ylabel="conversion uplift (treated − control)",
           title="Uplift per batch with 95% CI")
    if len(t):
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- monitor
def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dt.date | pd.Timestamp):
        return v.isoformat()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _records(df: pd.DataFrame) -> list[dict]:
    return [_jsonable(r) for r in df.to_dict(orient="records")] if df is not None and len(df) else []


@dataclass
class MonitorResult:
    as_of: dt.date
    drift_status: str
    reasons: list[str]
    retrain: bool
    why: str
    drift: pd.DataFrame
    outcomes: pd.DataFrame
    champions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # offer type -> why it was not monitored
    run_id: str | None = None
    new_batches: list[str] = field(default_factory=list)  # batches measured by this run

    def _latest(self) -> pd.DataFrame:
        o = self.outcomes
        if not len(o):
            return o
        last = o.groupby("offer_type")["batch_as_of"].transform("max")
        return o[o["batch_as_of"] == last].reset_index(drop=True)

    def summary(self) -> str:
        lines = [f"monitor as of {self.as_of}: drift {self.drift_status}; retrain: "
                 f"{'yes' if self.retrain else 'no'} ({self.why})"]
        lines += [f"  {r}" for r in self.reasons[:10]]
        lines += [f"  {t}: not monitored ({w})" for t, w in self.skipped.items()]
        if len(self.outcomes):
            last = self.outcomes[self.outcomes["channel"] == "all"].groupby("offer_type").tail(1)
            for r in last.itertuples(index=False):
                lines.append(f"  {r.offer_type} batch {r.batch_as_of}: treated {r.rate_treated:.1%} "
                             f"(n={r.n_treated}) vs control {r.rate_control:.1%} (n={r.n_control}), uplift "
                             f"{r.uplift_abs:+.3f} [{r.uplift_ci_low:+.3f}, {r.uplift_ci_high:+.3f}]")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        per_type = {}
        if len(self.drift):
            for t, g in self.drift.groupby("offer_type", sort=True):
                score = g[g["kind"] == "score"]
                feats = g[g["kind"] != "score"]
                worst = feats.sort_values("psi", ascending=False).head(1)
                per_type[t] = {
                    "n_alert": int((feats["status"] == "alert").sum()),
                    "n_warn": int((feats["status"] == "warn").sum()),
                    "score_psi": _jsonable(float(score["psi"].iloc[0])) if len(score) else None,
                    "max_psi_feature": str(worst["feature"].iloc[0]) if len(worst) else None,
                    "max_psi": _jsonable(float(worst["psi"].iloc[0])) if len(worst) else None,
                }
        return _jsonable({
            "as_of": self.as_of, "retrain": bool(self.retrain), "why": self.why,
            "drift_status": self.drift_status, "reasons": list(self.reasons[:MAX_REASONS]),
            "n_reasons": len(self.reasons), "drift_by_type": per_type,
            "champions": dict(self.champions), "skipped": dict(self.skipped), "run_id": self.run_id,
            "new_batches": list(self.new_batches),
            "n_batches_measured": int(self.outcomes["batch_id"].nunique()) if len(self.outcomes) else 0,
            # XCom stays small: the latest measured batch per offer type (all channels), not the history
            "latest_outcomes": _records(self._latest()),
        })


def _metric_key(*parts: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", ".".join(parts))


def _log_to_mlflow(res: MonitorResult, cfg: MonitorConfig, fingerprint: str, run_tags: dict | None) -> str:
    import matplotlib.pyplot as plt
    import mlflow

    from ml import registry

    exp_id = registry.ensure_experiment(MONITOR_EXPERIMENT)
    tags = registry.run_context_tags({"as_of": res.as_of.isoformat(), "data_fingerprint": fingerprint,
                                     "drift_status": res.drift_status, "retrain": str(res.retrain).lower(),
                                     **{f"champion_{t}": v for t, v in res.champions.items()},
                                     **(run_tags or {})})
    tags["why"] = res.why[:4000]
    with mlflow.start_run(experiment_id=exp_id, run_name=f"monitor as of {res.as_of}", tags=tags) as run:
        mlflow.log_params({k: v for k, v in dataclasses.asdict(cfg).items()})
        metrics: dict[str, float] = {"retrain": float(res.retrain),
                                     "drift_level": float(max(STATUS_ORDER.get(res.drift_status, 0), 0))}
        for r in res.drift.itertuples(index=False):
            if not math.isnan(r.psi):
                metrics[_metric_key("psi", r.offer_type, r.feature)] = float(r.psi)
            if isinstance(r.ks, float) and not math.isnan(r.ks):
                metrics[_metric_key("ks", r.offer_type, r.feature)] = float(r.ks)
        for t, d in res.to_dict()["drift_by_type"].items():
            metrics[_metric_key("drift", t, "n_alert")] = d["n_alert"]
            metrics[_metric_key("drift", t, "n_warn")] = d["n_warn"]
        if len(res.outcomes):
            latest = res.outcomes[res.outcomes["channel"] == "all"].groupby("offer_type").tail(1)
            for r in latest.itertuples(index=False):
                for k in ("uplift_abs", "uplift_ci_low", "uplift_ci_high", "rate_treated", "rate_control",
                          "incr_margin_per_1000"):
                    v = getattr(r, k)
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        metrics[_metric_key("outcome", r.offer_type, k)] = float(v)
            metrics["outcome.n_batches"] = float(res.outcomes["batch_id"].nunique())
        mlflow.log_metrics(metrics)
        if len(res.drift):
            mlflow.log_text(res.drift.to_csv(index=False), "drift/drift_table.csv")
        if len(res.outcomes):
            mlflow.log_text(res.outcomes.to_csv(index=False), "outcomes/outcomes.csv")
        mlflow.log_dict(res.to_dict(), "monitor_result.json")
        if cfg.plots:
            figs = {}
            for t, g in res.drift.groupby("offer_type", sort=True):
                figs[f"plots/psi_{t}.png"] = plot_psi(g, cfg)
            if len(res.outcomes):
                figs["plots/uplift_over_batches.png"] = plot_uplift(res.outcomes)
            for path, fig in figs.items():
                mlflow.log_figure(fig, path)
                plt.close(fig)
    return run.info.run_id


def monitor(source: str, as_of: dt.date, crm_url: str | None = None, cfg: MonitorConfig | None = None,
            offer_types: list[str] | None = None, run_tags: dict | None = None,
            log_mlflow: bool = True, recompute: bool = False) -> MonitorResult:
    """Validate → features as of T → drift of each champion → outcomes of closed batches → MLflow.

    An offer type without a champion is skipped (noted in ``skipped``); a CRM without batches gives no
    outcomes. ``crm_url`` None → ``config.crm_url()``. Batches already in ``crm_offer_outcomes`` are not
    measured again unless ``recompute`` (e.g. after late orders arrived). Raises ``DataQualityError``
    when the input fails.
    """
    from ml import config
    from ml.dataset import build_examples
    from ml.features import FeatureContext
    from ml.quality import DataQualityError, validate_and_load
    from ml.registry import load_champion

    cfg = cfg or MonitorConfig()
    as_of = pd.Timestamp(as_of).date()
    with step("validate inputs"):
        report, shop = validate_and_load(source, as_of)
        if not report.success:
            raise DataQualityError(report)
    champions: dict[str, tuple[Any, str]] = {}
    skipped: dict[str, str] = {}
    for t in offer_types or list(OFFER_TYPES):
        try:
            champions[t] = load_champion(t)
        except LookupError as exc:
            skipped[t] = str(exc)
    tables = []
    if champions:
        with step("features as of T"):
            context = FeatureContext.build(shop, as_of)
        for t, (model, version) in champions.items():
            with step(f"drift {t} (champion v{version})") as info:
                examples = build_examples(None, as_of, t, with_labels=False, context=context)
                if not getattr(model, "reference", None):
                    skipped[t] = f"champion v{version} has no drift reference"
                    continue
                table = feature_drift(model, examples, cfg)
                tables.append(table)
                status, _ = drift_status(table, cfg.exempt_features)
                info["detail"] = f"{len(examples):,} rows, {status}"
            del examples
    drift = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=DRIFT_COLUMNS)
    status, reasons = drift_status(drift, cfg.exempt_features)

    url = crm_url or config.crm_url()
    with step("outcomes of closed batches") as info:
        done = set() if recompute else set(read_outcomes(url)["batch_id"])
        new = outcomes(url, shop, as_of, cfg.horizon_days, cfg, exclude=done)
        write_outcomes(url, new)
        # The stored history (it outlives CRM retention) is what decay and the plot look at.
        out = read_outcomes(url).drop(columns=["updated_at"])
        out = out[out["batch_as_of"] <= as_of].reset_index(drop=True)  # a backfill sees its past only
        new_batches = sorted(set(new["batch_id"])) if len(new) else []
        info["detail"] = f"{len(new_batches)} new batch(es), {out['batch_id'].nunique()} measured in all"

    why_parts = drift_retrain_reasons(drift, cfg) + uplift_decay(out, cfg)
    retrain = bool(why_parts)
    if retrain:
        why = "; ".join(why_parts)
    elif status == "ok":
        why = "no drift" if tables else "nothing to compare (no champion with a reference)"
    else:
        why = f"drift {status} below the retrain rule ({len(reasons)} feature(s))"
    res = MonitorResult(as_of, status, reasons, retrain, why, drift, out,
                        {t: v for t, (_, v) in champions.items()}, skipped, new_batches=new_batches)
    if log_mlflow:
        with step("log to MLflow"):
            res.run_id = _log_to_mlflow(res, cfg, shop.fingerprint(), run_tags)
    log.info(res.summary())
    return res


def result_json(res: MonitorResult) -> str:
    return json.dumps(res.to_dict(), indent=2, sort_keys=True)
