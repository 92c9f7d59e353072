"""Candidate (customer, category) pairs and the product each offer names (DESIGN §3).

Only customers with at least one order line before T get candidates: a customer with no
history has nothing to rank categories by (cold start: popularity-based welcome offers are a
CRM campaign, not a propensity model). Candidates whose category has no active product to
offer are dropped: an offer must name something that can be bought.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.config import MODEL, ModelConfig
from ml.features import FeatureContext
from ml.tiers import N_TIERS


@dataclass
class Candidates:
    """Parallel arrays, one entry per candidate; ``cc_row`` is the row of ``ctx.cc`` or -1."""

    cust: np.ndarray
    cat: np.ndarray
    offer_tier: np.ndarray
    pcode: np.ndarray
    cc_row: np.ndarray

    def __len__(self) -> int:
        return len(self.cust)


def _nearest_product(ctx: FeatureContext, cat: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best product of ``cat`` at tier ``want``, else the nearest tier that has one (ties → lower)."""
    best = ctx.best_product
    pcode = np.full(len(cat), -1, dtype=np.int64)
    tier = np.full(len(cat), -1, dtype=np.int64)
    for dist in range(N_TIERS):
        for t in (want - dist, want + dist) if dist else (want,):
            ok = (pcode < 0) & (t >= 0) & (t < N_TIERS)
            got = np.where(ok, best[cat, np.clip(t, 0, N_TIERS - 1)], -1)
            hit = ok & (got >= 0)
            pcode[hit], tier[hit] = got[hit], t[hit]
    return pcode, tier


def _stepped_product(ctx: FeatureContext, cat: np.ndarray, start: np.ndarray, step: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Best product at tier ``start``, else further in direction ``step`` (never back towards usual)."""
    pcode = np.full(len(cat), -1, dtype=np.int64)
    tier = np.full(len(cat), -1, dtype=np.int64)
    for d in range(N_TIERS):
        t = start + step * d
        ok = (pcode < 0) & (t >= 0) & (t < N_TIERS)
        got = np.where(ok, ctx.best_product[cat, np.clip(t, 0, N_TIERS - 1)], -1)
        hit = ok & (got >= 0)
        pcode[hit], tier[hit] = got[hit], t[hit]
    return pcode, tier


def cross_sell(ctx: FeatureContext, cfg: ModelConfig = MODEL) -> Candidates:
    """Never-bought categories, top ``cfg.cross_sell_candidates`` per customer by mean lift with owned ones.

    Ties in lift go to the more popular category (90-day buyers), then the category name, so the
    ranking is deterministic. The offered product is at the customer's usual (overall) tier.
    """
    n_top = cfg.cross_sell_candidates
    k = ctx.index.n_categories
    has_any = (ctx.best_product >= 0).any(axis=1)
    # Column order by popularity desc, then name: a stable sort on lift keeps it for ties.
    order = np.lexsort((np.arange(k), -ctx.cat_stats["buyers_90d"].to_numpy()))
    lift0 = np.nan_to_num(ctx.lift, nan=0.0)[:, order]
    customers = np.flatnonzero(ctx.has_history)
    cust_out, cat_out = [], []
    for start in range(0, len(customers), 131_072):
        i = customers[start:start + 131_072]
        own = ctx.owned[i]
        n_own = own.sum(axis=1, keepdims=True)
        score = (own.astype(np.float32) @ lift0) / np.maximum(n_own, 1)
        eligible = ~own[:, order] & has_any[order]
        score = np.where(eligible, score, -np.inf)
        rank = np.argsort(-score, axis=1, kind="stable")[:, :n_top]
        keep = np.take_along_axis(eligible, rank, axis=1)
        rows = np.repeat(i, rank.shape[1]).reshape(rank.shape)
        cust_out.append(rows[keep])
        cat_out.append(order[rank[keep]])
    cust = np.concatenate(cust_out) if cust_out else np.zeros(0, np.int64)
    cat = np.concatenate(cat_out) if cat_out else np.zeros(0, np.int64)
    want = ctx.cust["overall_tier"].to_numpy(np.int64)[cust]
    pcode, tier = _nearest_product(ctx, cat, want)
    ok = pcode >= 0
    return Candidates(cust[ok].astype(np.int64), cat[ok].astype(np.int64), tier[ok], pcode[ok],
                      np.full(int(ok.sum()), -1, dtype=np.int64))


def _bought(ctx: FeatureContext, rows: np.ndarray, step: int) -> Candidates:
    cc = ctx.cc
    cust = cc["cust"].to_numpy(np.int64)[rows]
    cat = cc["cat"].to_numpy(np.int64)[rows]
    usual = cc["usual_tier"].to_numpy(np.int64)[rows]
    pcode, tier = _stepped_product(ctx, cat, usual + step, step)
    ok = pcode >= 0
    return Candidates(cust[ok], cat[ok], tier[ok], pcode[ok], rows[ok])


def upsell(ctx: FeatureContext, cfg: ModelConfig = MODEL) -> Candidates:
    """Bought categories where the usual tier is below the category's top tier; offer one tier up."""
    cc = ctx.cc
    top = ctx.index.top_tier[cc["cat"].to_numpy(np.int64)]
    rows = np.flatnonzero(cc["usual_tier"].to_numpy() < top)
    return _bought(ctx, rows, +1)


def downsell(ctx: FeatureContext, cfg: ModelConfig = MODEL) -> Candidates:
    """Bought categories of at-risk customers where the usual tier is not the bottom; offer one tier down."""
    cc = ctx.cc
    at_risk = ctx.cust["at_risk"].to_numpy()[cc["cust"].to_numpy(np.int64)]
    rows = np.flatnonzero(at_risk & (cc["usual_tier"].to_numpy() > 0))
    return _bought(ctx, rows, -1)


GENERATORS = {"cross_sell": cross_sell, "upsell": upsell, "downsell": downsell}


def candidates_for(ctx: FeatureContext, offer_type: str, cfg: ModelConfig = MODEL) -> Candidates:
    if offer_type not in GENERATORS:
        raise ValueError(f"unknown offer type {offer_type!r}; choose from {list(GENERATORS)}")
    return GENERATORS[offer_type](ctx, cfg)
