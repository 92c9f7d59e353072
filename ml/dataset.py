"""Examples for training and scoring: candidates × point-in-time features (+ labels) per cutoff.

``build_examples`` is the one place that turns a shop and a cutoff into model rows; training
stacks it over rolling cutoffs (``cutoffs_for``) and scoring calls it at T = as-of without labels.
The per-cutoff aggregates live in a ``FeatureContext`` that callers may build once and pass to
several calls (three offer types at one cutoff).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ml.candidates import candidates_for
from ml.config import MODEL, ModelConfig
from ml.contract import OFFER_TYPES, Shop, as_date
from ml.features import (
    CANDIDATE_FEATURES,
    CUSTOMER_FEATURES,
    HISTORY_FEATURES,
    SEGMENT_FEATURES,
    FeatureContext,
    ShopIndex,
    pair_features,
)
from ml.labels import assign_labels, window_outcomes
from ml.progress import step

CATEGORICAL_FEATURES: tuple[str, ...] = ("category", "value_band", "activity_band", "age_band")
KEY_COLUMNS = ["customer_id", "category", "product_id", "cutoff", "offer_type", "segment", "at_risk",
               "margin", "popularity"]


def feature_columns(offer_type: str, cfg: ModelConfig = MODEL) -> list[str]:
    """The model's feature columns, in order. Cross-sell categories were never bought, so the
    customer × category history columns (always missing there) are left out of its model."""
    if offer_type not in OFFER_TYPES:
        raise ValueError(f"unknown offer type {offer_type!r}; choose from {list(OFFER_TYPES)}")
    cols = [*CUSTOMER_FEATURES, *SEGMENT_FEATURES]
    if cfg.use_age_band:
        cols.append("age_band")
    cols.append("category")
    if offer_type != "cross_sell":
        cols += HISTORY_FEATURES
    return cols + list(CANDIDATE_FEATURES)


def cutoffs_for(as_of: dt.date, cfg: ModelConfig = MODEL) -> list[dt.date]:
    """Ascending. last = as_of - H (out-of-time TEST), the one before = as_of - 2H (VALIDATION: early
    stopping + calibration, its labels end exactly at the test cutoff), then training cutoffs every
    cfg.cutoff_step_days earlier such that c + H <= validation cutoff; total cfg.n_cutoffs. No label
    window reaches past as_of."""
    if cfg.n_cutoffs < 3:
        raise ValueError(f"n_cutoffs={cfg.n_cutoffs}: need at least one training, one validation and "
                         "one test cutoff")
    as_of = as_date(as_of)
    h = dt.timedelta(days=cfg.horizon_days)
    step_ = dt.timedelta(days=cfg.cutoff_step_days)
    test, valid = as_of - h, as_of - 2 * h
    # The latest training cutoff on the step grid whose window ends by the validation cutoff.
    first = valid - step_ * -(-cfg.horizon_days // cfg.cutoff_step_days)
    train = [first - step_ * i for i in range(cfg.n_cutoffs - 2)]
    return sorted(train) + [valid, test]


def _text(values) -> pd.api.extensions.ExtensionArray:
    """Text as a ``string`` array (what ``astype("string")`` gives), ready for ``take``."""
    return pd.array(values, dtype="string")


def _gather(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows] with NaN where rows == -1 (a category never bought)."""
    out = np.asarray(values, dtype="float64")[np.maximum(rows, 0)] if len(values) else \
        np.full(len(rows), np.nan)
    return np.where(rows >= 0, out, np.nan)


def build_examples(shop: Shop | None, cutoff: dt.date, offer_type: str, *, with_labels: bool = True,
                   cfg: ModelConfig = MODEL, context: FeatureContext | None = None,
                   sample_share: float = 1.0, customers: np.ndarray | None = None) -> pd.DataFrame:
    """One row per candidate (customer, category) as of `cutoff`. Columns: customer_id, category,
    product_id (the offered product), cutoff (datetime.date), offer_type, segment (str), at_risk (bool),
    margin (float, per unit of the offered product), popularity (float: the popularity baseline's score
    for this row), label (int 0/1; only when with_labels), then feature_columns(offer_type).

    `shop` is the FULL shop: features read only rows strictly before `cutoff`; labels read only
    [cutoff, cutoff + H). Pass `context` (``FeatureContext.build(shop, cutoff)``) to share the
    aggregates between offer types; `shop` may then be None. `sample_share` < 1 keeps the customers
    whose ``customer_fraction`` (config salt) is below it: the same ones at every cutoff, nested in
    the customer sample of the index. `customers` (bool per customer code of the context's index, e.g.
    one scoring shard) keeps only those customers' candidates before any feature is gathered, so a
    shard costs memory in proportion to its size; its rows equal those of the full call.

    Popularity baseline (non-personal): cross_sell → share of the shop's 90-day active customers who
    bought the category in the 90 days before T; upsell/downsell → share of the category's 90-day
    buyers who bought at the offered tier.
    """
    if offer_type not in OFFER_TYPES:
        raise ValueError(f"unknown offer type {offer_type!r}; choose from {list(OFFER_TYPES)}")
    cutoff = as_date(cutoff)
    if context is None:
        if shop is None:
            raise ValueError("build_examples needs a shop or a context")
        context = FeatureContext.build(shop, cutoff, cfg)
    elif context.cutoff != cutoff:
        raise ValueError(f"context was built for {context.cutoff}, not for the cutoff {cutoff}")
    ctx, index = context, context.index
    cand = candidates_for(ctx, offer_type, cfg)
    order = np.lexsort((cand.cat, cand.cust))
    if sample_share < 1.0:
        order = order[index.customer_fraction()[cand.cust[order]] < sample_share]
    if customers is not None:
        keep = np.asarray(customers, dtype=bool)
        if len(keep) != index.n_customers:
            raise ValueError(f"customers has {len(keep)} entries, the index {index.n_customers} customers")
        order = order[keep[cand.cust[order]]]
    cust, cat, pcode, tier, rows = (a[order] for a in (cand.cust, cand.cat, cand.pcode, cand.offer_tier,
                                                        cand.cc_row))
    c = ctx.cust
    cc = ctx.cc
    products = index.products

    # Text columns are gathered as string arrays (an Arrow take), not as Python objects parsed back.
    categories = _text(index.categories)
    out: dict[str, object] = {
        "customer_id": _text(index.customer_ids).take(cust),
        "category": categories.take(cat),
        "product_id": _text(products["product_id"]).take(pcode),
        "cutoff": np.full(len(cust), cutoff, dtype=object),
        "offer_type": _text([offer_type]).take(np.zeros(len(cust), dtype=np.int64)),
        "segment": _text(c["segment"]).take(cust),
        "at_risk": c["at_risk"].to_numpy(bool)[cust],
        "margin": products["margin"].to_numpy("float64")[pcode],
    }
    if offer_type == "cross_sell":
        out["popularity"] = ctx.cat_stats["buyers_share_90d"].to_numpy("float64")[cat]
    else:
        out["popularity"] = ctx.tier_share[cat, tier]
    out["popularity"] = np.nan_to_num(out["popularity"], nan=0.0)  # nobody bought it lately: 0
    usual = _gather(cc["usual_tier"].to_numpy(), rows)
    if with_labels:
        outcomes = window_outcomes(index, cutoff, cfg.horizon_days)
        out["label"] = assign_labels(outcomes, index.n_categories, offer_type, cust, cat,
                                     np.where(rows >= 0, usual, -1).astype(np.int64))

    feats: dict[str, np.ndarray] = {}
    for name in CUSTOMER_FEATURES:
        feats[name] = c[name].to_numpy("float64")[cust]
    feats["overall_tier"] = np.where(feats["overall_tier"] < 0, np.nan, feats["overall_tier"])
    for name in SEGMENT_FEATURES + (("age_band",) if cfg.use_age_band else ()):
        feats[name] = _text(c[name]).take(cust)
    feats["category"] = categories.take(cat)
    n_lines = _gather(cc["n_lines"].to_numpy(), rows)
    days_since = _gather(cc["days_since_last"].to_numpy(), rows)
    gap = _gather(cc["gap_median"].to_numpy("float64", na_value=np.nan), rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        feats.update({
            "usual_tier": usual,
            "cat_orders_90d": _gather(cc["orders_90d"].to_numpy(), rows),
            "cat_orders_365d": _gather(cc["orders_365d"].to_numpy(), rows),
            "cat_spend_365d": _gather(cc["spend_365d"].to_numpy(), rows),
            "cat_share_spend": _gather(cc["cat_share_spend"].to_numpy(), rows),
            "cat_days_since_last": days_since,
            "cat_gap_median": gap,
            "cat_cycle_ratio": np.where(gap > 0, days_since / np.where(gap > 0, gap, 1), np.nan),
            "cat_share_above_usual": _gather(cc["above"].to_numpy(), rows) / n_lines,
            "cat_share_below_usual": _gather(cc["below"].to_numpy(), rows) / n_lines,
        })
    offers = ctx.cat_offers
    key = offers["cust"].to_numpy(np.int64) * index.n_categories + offers["cat"].to_numpy(np.int64)
    cand_key = cust * index.n_categories + cat
    for name, missing in (("cat_offers_90d", 0.0), ("cat_offers_28d", 0.0), ("cat_days_since_offer", np.nan)):
        values = pd.Series(offers[name].to_numpy("float64"), index=key)
        feats[name] = values.reindex(cand_key).fillna(missing).to_numpy() if len(values) else \
            np.full(len(cust), missing)
    feats["cat_buyers_share_90d"] = ctx.cat_stats["buyers_share_90d"].to_numpy("float64")[cat]
    feats.update(pair_features(ctx, cust, cat))
    feats["offer_tier"] = tier.astype("float64")
    base = feats["overall_tier"] if offer_type == "cross_sell" else usual
    feats["offer_tier_step"] = feats["offer_tier"] - base
    median_price = ctx.cat_stats["median_price"].to_numpy("float64")[cat]
    with np.errstate(divide="ignore", invalid="ignore"):
        feats["offer_price_rel"] = np.where(median_price > 0, products["price"].to_numpy()[pcode]
                                            / np.where(median_price > 0, median_price, 1), np.nan)

    frame = pd.DataFrame(out)
    for name in ("customer_id", "category", "product_id", "offer_type", "segment"):
        frame[name] = frame[name].astype("string")
    for name in feature_columns(offer_type, cfg):
        if name in CATEGORICAL_FEATURES:
            frame[name] = pd.array(feats[name], dtype="string")
        else:
            frame[name] = np.asarray(feats[name], dtype=np.float32)
    return frame


def customer_sample(n_customers: int, cfg: ModelConfig = MODEL) -> float:
    """The share of customers the training set is built on: all up to cfg.max_train_customers."""
    return min(1.0, cfg.max_train_customers / n_customers) if n_customers else 1.0


def build_training_sets(shop: Shop, as_of: dt.date, offer_types: Iterable[str] = OFFER_TYPES,
                        cfg: ModelConfig = MODEL, index: ShopIndex | None = None) -> dict[str, pd.DataFrame]:
    """build_examples for every cutoff and several offer types, sharing the join and the aggregates.

    Two nested, logged hash-samples of customers (``customer_fraction``: the same customers on every
    run and machine, whole customers only) keep 1M customers within one machine's time and memory:
    1. beyond cfg.max_train_customers, the index (join, aggregates, labels) holds a sample only, built
       before any feature is computed (a given ``index`` is used as it is);
    2. newest cutoff first: the test cutoff's row count tells how many rows the training cutoffs would
       give; beyond cfg.max_train_rows, training cutoffs keep a smaller sample of the same customers
       (validation and test stay complete).
    Each frame's ``attrs["sampling"]`` says what was kept (``ml.train`` logs it to MLflow).
    """
    types = list(offer_types)
    if index is None:
        with step("join the shop") as info:
            index = ShopIndex(shop, cfg, customer_share=customer_sample(len(shop.customers), cfg))
            info["detail"] = (f"{index.n_customers:,} of {index.population:,} customers "
                              f"(hash-sample share {index.customer_share:.4f}, salt {cfg.sample_salt!r})")
    sampling = {"population_customers": index.population, "sample_customers": index.n_customers,
                "customer_share": index.customer_share, "salt": cfg.sample_salt,
                "max_train_customers": cfg.max_train_customers, "max_train_rows": cfg.max_train_rows}
    base_share = index.customer_share
    cutoffs = cutoffs_for(as_of, cfg)
    parts: dict[str, dict[dt.date, pd.DataFrame]] = {t: {} for t in types}
    share = dict.fromkeys(types, 1.0)  # of the index's customers, at training cutoffs
    for cutoff in reversed(cutoffs):
        with step(f"examples as of {cutoff}") as info:
            ctx = FeatureContext.build(index, cutoff, cfg)
            training = cutoff < cutoffs[-2]
            for t in types:
                parts[t][cutoff] = build_examples(None, cutoff, t, cfg=cfg, context=ctx,
                                                  sample_share=base_share * share[t] if training else 1.0)
                if cutoff == cutoffs[-1]:
                    expected = len(parts[t][cutoff]) * (len(cutoffs) - 2)
                    share[t] = min(1.0, cfg.max_train_rows / max(expected, 1))
            info["detail"] = ", ".join(f"{t}: {len(parts[t][cutoff]):,} rows" for t in types)
            del ctx
    frames = {}
    for t in types:  # one type at a time: the parts are freed as soon as their type is concatenated
        frames[t] = pd.concat([parts[t].pop(c) for c in cutoffs], ignore_index=True)
        frames[t].attrs["sampling"] = {**sampling, "train_cutoff_share": share[t],
                                       "train_customer_share": base_share * share[t]}
    return frames


def build_training_set(shop: Shop, as_of: dt.date, offer_type: str, cfg: ModelConfig = MODEL,
                       index: ShopIndex | None = None) -> pd.DataFrame:
    """build_examples for every cutoff of cutoffs_for(as_of), concatenated."""
    return build_training_sets(shop, as_of, [offer_type], cfg, index)[offer_type]
