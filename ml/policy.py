"""Offer policy (DESIGN §5): eligibility, value, arbitration, channel choice and the control group.

Input is a frame of scored candidates, one row per (customer, offer type, category, product),
and the shop tables as of T. Output is at most K offers per customer, each with a consented
channel that still has frequency-cap room, and a count of what every rule removed.

Everything is computed on integer codes with numpy (customers, categories and channels are
factorised once), so 1M customers × ~15 candidates run in seconds, not in a Python loop.
Consent is checked on the latest row per (customer, channel); no row means no consent, and a
revocation recorded at the same instant as a grant wins. Nothing here reads personal data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ml.config import POLICY, PolicyConfig
from ml.contract import CONTACT_CHANNELS, OFFER_TYPES, Shop, text_array, text_positions
from ml.progress import log

# Fallback order when response rates tie (or there is no history): email, push, sms.
CHANNEL_PREFERENCE: tuple[str, ...] = ("email", "push", "sms")
RESPONSE_WINDOW = pd.Timedelta(days=28)
CAP_WINDOW = pd.Timedelta(days=7)

# The rules in the order they are applied; a candidate is counted by the first rule that removes it.
RULES: tuple[str, ...] = (
    "no_consent",
    "product_inactive",
    "category_owned",
    "cooldown",
    "downsell_not_at_risk",
    "cap_customer_7d",
    "cap_channel_7d",
    "invalid_score",
    "arbitration",
)
_RULE = {name: i for i, name in enumerate(RULES)}

REQUIRED_COLUMNS = ("customer_id", "offer_type", "category", "product_id", "propensity", "margin",
                    "segment", "at_risk")
OFFER_COLUMNS = ["customer_id", "rank", "offer_type", "category", "product_id", "channel", "propensity",
                 "expected_value", "segment", "is_control", "candidate_idx"]

assert set(CHANNEL_PREFERENCE) == set(CONTACT_CHANNELS)


@dataclass
class PolicyResult:
    """The chosen offers (control rows included, flagged) and what each rule removed."""

    offers: pd.DataFrame
    suppressed: pd.DataFrame


# ---------------------------------------------------------------------------- helpers

def _as_bool(s: pd.Series) -> np.ndarray:
    """Booleans with missing values read as False (a missing consent or flag never grants anything)."""
    return pd.array(s, dtype="boolean").fillna(False).to_numpy(dtype=bool)


def _as_float(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").astype("float64").to_numpy(dtype=float, na_value=np.nan)


def _ts(s: pd.Series) -> np.ndarray:
    return pd.to_datetime(s).astype("datetime64[us]").to_numpy()


def _as_of(as_of: dt.date | dt.datetime | str | pd.Timestamp) -> np.datetime64:
    t = pd.Timestamp(as_of)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    return np.datetime64(t.to_datetime64(), "us")


def control_draw(customer_ids: Iterable[str], salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per customer from blake2b(salt, id): stable across runs and machines.

    A cryptographic hash (not Python's ``hash`` or pandas' hashing) keeps the control group the
    same across processes and library versions, which the uplift measurement relies on.
    """
    prefix = salt.encode() + b"\x1f"
    blake = hashlib.blake2b
    ids = customer_ids.tolist() if hasattr(customer_ids, "tolist") else list(customer_ids)
    digests = b"".join([blake(prefix + str(c).encode(), digest_size=8).digest() for c in ids])
    top53 = np.frombuffer(digests, dtype=">u8") >> np.uint64(11)
    return top53.astype(np.float64) * 2.0**-53


def in_control(customer_ids: Iterable[str], share: float, salt: str) -> np.ndarray:
    """Whether each customer belongs to the control group (share in [0, 1])."""
    return control_draw(customer_ids, salt) < share


def latest_consents(consents: pd.DataFrame, as_of: dt.date | pd.Timestamp) -> pd.DataFrame:
    """The consent in force at ``as_of`` per (customer_id, channel): the latest row before it.

    Ties at the same ``updated_at`` resolve to *not granted*; a missing ``granted`` reads as False.
    """
    t = _as_of(as_of)
    c = consents[_ts(consents["updated_at"]) < t]
    out = pd.DataFrame({
        "customer_id": c["customer_id"].to_numpy(),
        "channel": c["channel"].to_numpy(),
        "granted": _as_bool(c["granted"]),
        "updated_at": _ts(c["updated_at"]),
    })
    out = out.sort_values(["customer_id", "channel", "updated_at", "granted"], ascending=[True, True, True,
                                                                                         False])
    return out.drop_duplicates(["customer_id", "channel"], keep="last").reset_index(drop=True)


# ---------------------------------------------------------------------------- shop-derived arrays

Text = pd.Series | pd.Index | Iterable[str]


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(arr.chunks) if isinstance(arr, pa.ChunkedArray) else [arr]


def _isin(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return pd.Series(values, copy=False).isin(keys).to_numpy()


@dataclass
class _Codes:
    customers: pd.Index  # sorted unique customer ids of the candidates
    categories: pd.Index  # sorted union of candidate and catalogue categories
    n_cust: int
    n_cat: int


def _consent_matrix(shop: Shop, codes: _Codes, t: np.datetime64) -> np.ndarray:
    """granted[customer, channel] for the latest consent row before T (channels in CHANNEL_PREFERENCE)."""
    c = shop.consents
    ts = _ts(c["updated_at"])
    cust = text_positions(c["customer_id"], codes.customers)
    chan = text_positions(c["channel"], CHANNEL_PREFERENCE)
    keep = (ts < t) & (cust >= 0) & (chan >= 0)
    cust, chan, ts, granted = cust[keep], chan[keep], ts[keep], _as_bool(c["granted"])[keep]
    pair = cust * len(CHANNEL_PREFERENCE) + chan
    # Sort by pair, time, then granted before revoked, so the last row of a pair is the one in force.
    order = np.lexsort((~granted, ts.view(np.int64), pair))
    pair_s = pair[order]
    last = order[np.r_[pair_s[1:] != pair_s[:-1], True]] if len(order) else order
    out = np.zeros((codes.n_cust, len(CHANNEL_PREFERENCE)), dtype=bool)
    out[cust[last], chan[last]] = granted[last]
    return out


@dataclass
class _Catalogue:
    ids: pd.Series  # product_id, unique
    category: np.ndarray  # category code per product (-1: not a known category)
    active: np.ndarray
    rank: np.ndarray  # position of the id in sorted order: a tie-break independent of row order


def _catalogue(shop: Shop, codes: _Codes) -> _Catalogue:
    products = shop.products.drop_duplicates("product_id")
    ids = products["product_id"].reset_index(drop=True)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[pc.sort_indices(text_array(ids)).to_numpy()] = np.arange(len(ids))
    return _Catalogue(ids, text_positions(products["category"], codes.categories),
                      _as_bool(products["active"]), rank)


def _category_of(product_ids: pd.Series, cat: _Catalogue) -> np.ndarray:
    pidx = text_positions(product_ids, cat.ids)
    out = np.full(len(pidx), -1, dtype=np.int64)
    out[pidx >= 0] = cat.category[pidx[pidx >= 0]]
    return out


def _purchases(shop: Shop, codes: _Codes, cat: _Catalogue, t: np.datetime64) -> pd.DataFrame:
    """(customer*n_cat + category, order time) per order line of candidate customers before T."""
    orders = shop.orders  # a repeated order_id breaks the contract; _lookup lets its first row win
    ots = _ts(orders["order_ts"])
    ocust = text_positions(orders["customer_id"], codes.customers)
    keep = (ots < t) & (ocust >= 0)
    lines = shop.order_lines
    pos = text_positions(lines["order_id"], orders["order_id"])
    lcat = _category_of(lines["product_id"], cat)
    ok = (pos >= 0) & (lcat >= 0)
    ok[ok] = keep[pos[ok]]
    pos = pos[ok]
    return pd.DataFrame({"key": ocust[pos] * codes.n_cat + lcat[ok], "ts": ots[pos]})


@dataclass
class _History:
    cust_count: np.ndarray  # offers per customer in the last 7 days
    chan_count: np.ndarray  # offers per (customer, channel) in the last 7 days
    cooldown_keys: np.ndarray  # customer*n_cat + category offered in the last C days
    response_rate: np.ndarray  # (customer, channel) past response rate, 0 without history


def _history(shop: Shop, codes: _Codes, cat: _Catalogue, purchases: pd.DataFrame, t: np.datetime64,
             cfg: PolicyConfig) -> _History:
    h = shop.offer_history
    n_ch = len(CHANNEL_PREFERENCE)
    sent = _ts(h["sent_at"])
    cust = text_positions(h["customer_id"], codes.customers)
    keep = (sent < t) & (cust >= 0)
    sent, cust = sent[keep], cust[keep]
    chan = text_positions(h["channel"], CHANNEL_PREFERENCE)[keep]
    hcat = _category_of(h["product_id"], cat)[keep]
    key = cust * codes.n_cat + hcat

    recent = sent >= t - CAP_WINDOW.to_timedelta64()
    cust_count = np.bincount(cust[recent], minlength=codes.n_cust)
    rc = recent & (chan >= 0)
    chan_count = np.bincount(cust[rc] * n_ch + chan[rc], minlength=codes.n_cust * n_ch)
    chan_count = chan_count.reshape(codes.n_cust, n_ch)

    in_cooldown = (sent >= t - pd.Timedelta(days=cfg.cooldown_days).to_timedelta64()) & (hcat >= 0)
    cooldown_keys = pd.unique(key[in_cooldown])

    # Response: a purchase in the offered category within 28 days after sent_at (and before T).
    measurable = (chan >= 0) & (hcat >= 0)
    offers = pd.DataFrame({"key": key[measurable], "ts": sent[measurable],
                           "pair": cust[measurable] * n_ch + chan[measurable]})
    responded = np.zeros(len(offers), dtype=bool)
    if len(offers) and len(purchases):
        offers = offers.sort_values("ts", kind="stable", ignore_index=True)
        right = purchases.rename(columns={"ts": "bought_at"}).sort_values("bought_at", kind="stable")
        matched = pd.merge_asof(offers, right, left_on="ts", right_on="bought_at", by="key",
                                direction="forward", allow_exact_matches=True,
                                tolerance=RESPONSE_WINDOW - pd.Timedelta(microseconds=1))
        responded = matched["bought_at"].notna().to_numpy()
    size = codes.n_cust * n_ch
    n_sent = np.bincount(offers["pair"].to_numpy(), minlength=size)
    n_resp = np.bincount(offers["pair"].to_numpy()[responded], minlength=size)
    rate = np.divide(n_resp, n_sent, out=np.zeros(size), where=n_sent > 0).reshape(codes.n_cust, n_ch)
    return _History(cust_count, chan_count, cooldown_keys, rate)


# ---------------------------------------------------------------------------- the policy

def _check_input(scored: pd.DataFrame, cfg: PolicyConfig) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in scored.columns]
    if missing:
        raise ValueError(f"scored candidates lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
    if not scored.index.is_unique:
        raise ValueError("scored candidates need a unique index: it is returned as candidate_idx")
    for col in ("customer_id", "offer_type", "category", "product_id"):
        if scored[col].isna().any():
            raise ValueError(f"scored candidates have missing {col}")
    unknown = sorted(set(scored["offer_type"].unique()) - set(OFFER_TYPES))
    if unknown:
        raise ValueError(f"unknown offer type(s) {unknown}; expected {list(OFFER_TYPES)}")
    no_weight = sorted(set(OFFER_TYPES) - set(cfg.value_weights))
    if no_weight:
        raise ValueError(f"PolicyConfig.value_weights lacks {no_weight}")
    if not 0.0 <= cfg.control_share <= 1.0:
        raise ValueError(f"control_share must be in [0, 1], got {cfg.control_share}")


def _empty_offers() -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": pd.Series(dtype="string"), "rank": pd.Series(dtype="int64"),
        "offer_type": pd.Series(dtype="string"), "category": pd.Series(dtype="string"),
        "product_id": pd.Series(dtype="string"), "channel": pd.Series(dtype="string"),
        "propensity": pd.Series(dtype="float64"), "expected_value": pd.Series(dtype="float64"),
        "segment": pd.Series(dtype="string"), "is_control": pd.Series(dtype="bool"),
        "candidate_idx": pd.Series(dtype="int64"),
    })


def _suppressed(removed_by: np.ndarray, n: int) -> pd.DataFrame:
    counts = np.bincount(removed_by[removed_by >= 0], minlength=len(RULES))
    return pd.DataFrame({"rule": list(RULES), "n_candidates_removed": counts.astype(np.int64),
                         "share": counts / n if n else np.zeros(len(RULES))})


def apply_policy(scored: pd.DataFrame, shop: Shop, as_of: dt.date,
                 cfg: PolicyConfig = POLICY) -> PolicyResult:
    """Choose at most K consented, capped, arbitrated offers per customer from scored candidates.

    ``scored``: customer_id, offer_type, category, product_id, propensity, margin, segment, at_risk;
    its index comes back as ``candidate_idx``. ``shop`` holds the contract tables; rows at or
    after ``as_of`` are ignored here too, so an uncut shop cannot leak the future into caps.
    The output does not depend on the order of the input rows.
    """
    _check_input(scored, cfg)
    t = _as_of(as_of)
    n = len(scored)
    if n == 0:
        return PolicyResult(_empty_offers(), _suppressed(np.empty(0, dtype=np.int64), 0))

    cust_code, cust_uniques = pd.factorize(pd.array(scored["customer_id"], dtype="string[pyarrow]"),
                                           sort=True)
    cust_code = cust_code.astype(np.int64)
    # Chunks, not ChunkedArrays: pa.chunked_array would convert a ChunkedArray value by value.
    all_categories = pa.chunked_array([*_chunks(text_array(scored["category"])),
                                       *_chunks(text_array(shop.products["category"]))],
                                      type=pa.large_string())
    categories = pd.Index(pc.unique(all_categories).drop_null().to_pylist(), dtype="string").sort_values()
    codes = _Codes(pd.Index(cust_uniques), categories, len(cust_uniques), len(categories))
    cat_code = text_positions(scored["category"], categories)
    pair_key = cust_code * codes.n_cat + cat_code
    type_code = text_positions(scored["offer_type"], OFFER_TYPES)

    cat = _catalogue(shop, codes)
    pidx = text_positions(scored["product_id"], cat.ids)
    granted = _consent_matrix(shop, codes, t)
    purchases = _purchases(shop, codes, cat, t)
    hist = _history(shop, codes, cat, purchases, t, cfg)

    cust_room = np.clip(cfg.cap_per_customer_7d - hist.cust_count, 0, None)
    chan_room = np.where(granted, np.clip(cfg.cap_per_channel_7d - hist.chan_count, 0, None), 0)

    removed_by = np.full(n, -1, dtype=np.int8)

    def remove(rule: str, mask: np.ndarray) -> None:
        removed_by[(removed_by < 0) & mask] = _RULE[rule]

    # 1. Eligibility, in the order of DESIGN §5.
    remove("no_consent", ~granted.any(axis=1)[cust_code])
    product_ok = pidx >= 0
    known = pidx[product_ok]
    product_ok[product_ok] = cat.active[known] & (cat.category[known] == cat_code[product_ok])
    remove("product_inactive", ~product_ok)
    is_cross = type_code == OFFER_TYPES.index("cross_sell")
    remove("category_owned", is_cross & _isin(pair_key, purchases["key"].to_numpy()))
    remove("cooldown", _isin(pair_key, hist.cooldown_keys))
    is_down = type_code == OFFER_TYPES.index("downsell")
    remove("downsell_not_at_risk", is_down & ~_as_bool(scored["at_risk"]))
    remove("cap_customer_7d", (cust_room == 0)[cust_code])
    remove("cap_channel_7d", (chan_room.sum(axis=1) == 0)[cust_code])

    # 2. Value.
    weights = np.array([float(cfg.value_weights[t_]) for t_ in OFFER_TYPES])
    propensity = _as_float(scored["propensity"])
    ev = propensity * _as_float(scored["margin"]) * weights[type_code]
    remove("invalid_score", ~np.isfinite(ev))

    # 3. Arbitration: best expected value first, ties by offer type, category, product, input index.
    live = np.flatnonzero(removed_by < 0)
    prod_code = np.where(pidx >= 0, cat.rank[pidx], -1)
    idx_code = scored.index.to_numpy() if pd.api.types.is_integer_dtype(scored.index.dtype) \
        else pd.factorize(scored.index, sort=True)[0]
    order = live[np.lexsort((idx_code[live], prod_code[live], cat_code[live], type_code[live], -ev[live],
                             cust_code[live]))]
    first_of_category = ~pd.Series(pair_key[order]).duplicated().to_numpy()
    removed_by[order[~first_of_category]] = _RULE["arbitration"]
    order = order[first_of_category]
    cust_o = cust_code[order]
    starts = np.r_[True, cust_o[1:] != cust_o[:-1]] if len(order) else np.zeros(0, dtype=bool)
    pos = np.arange(len(order))
    rank0 = pos - np.maximum.accumulate(np.where(starts, pos, 0)) if len(order) else pos
    k = cfg.offers_per_customer
    beyond_k = rank0 >= k
    beyond_room = ~beyond_k & (rank0 >= cust_room[cust_o])

    # 4. Channel: best past response rate with room left, ties by email, push, sms; each offer
    #    takes one unit of room, so rank r gets the r-th slot of the customer's channel ladder.
    pref = np.argsort(-hist.response_rate, axis=1, kind="stable")
    ladder = np.cumsum(np.take_along_axis(chan_room, pref, axis=1), axis=1)
    slot = (rank0[:, None] >= ladder[cust_o]).sum(axis=1)
    no_channel = ~beyond_k & ~beyond_room & (slot >= len(CHANNEL_PREFERENCE))
    removed_by[order[beyond_k]] = _RULE["arbitration"]
    removed_by[order[beyond_room]] = _RULE["cap_customer_7d"]
    removed_by[order[no_channel]] = _RULE["cap_channel_7d"]
    chosen = ~(beyond_k | beyond_room | no_channel)
    order, cust_o, rank0, slot = order[chosen], cust_o[chosen], rank0[chosen], slot[chosen]
    channel_code = pref[cust_o, slot] if len(order) else np.zeros(0, dtype=np.int64)

    # 5. Control group: a share of the customers who receive at least one offer.
    offered = pd.unique(cust_o)
    control = np.zeros(codes.n_cust, dtype=bool)
    control[offered] = in_control(codes.customers[offered], cfg.control_share, cfg.control_salt)

    if not len(order):
        return PolicyResult(_empty_offers(), _suppressed(removed_by, n))
    rows = scored.iloc[order]
    text = {c: pd.array(rows[c].to_numpy(), dtype="string")
            for c in ("customer_id", "offer_type", "category", "product_id", "segment")}
    offers = pd.DataFrame({
        **text,
        "rank": (rank0 + 1).astype(np.int64),
        "channel": pd.array(np.asarray(CHANNEL_PREFERENCE, dtype=object)[channel_code], dtype="string"),
        "propensity": propensity[order],
        "expected_value": ev[order],
        "is_control": control[cust_o],
        "candidate_idx": rows.index.to_numpy(),
    })[OFFER_COLUMNS]
    result = PolicyResult(offers, _suppressed(removed_by, n))
    log.debug("policy: %d offers for %d customers from %d candidates", len(offers), len(offered), n)
    return result
