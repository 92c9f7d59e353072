"""Reason codes (DESIGN §5.6): why the model chose an offer, in words a CRM agent can read.

For each published offer we keep the top-k features by positive contribution to the log-odds
(LightGBM ``pred_contrib``), each with its value, its contribution and a short phrase such as
"bought in Coffee 3 times in 90 days". Phrases come from templates keyed by feature name:
``PHRASES`` for exact names, ``PATTERNS`` for families (``cat_orders_<N>d``, ``share_<tier>``, ...),
and a generic "<feature> = <value>" for anything else. To add a phrase, add one entry:

    PHRASES["cat_returns_90d"] = "returned {n} {category} items in 90 days"

A template is either a ``str.format`` string (fields: ``value``, ``n``, ``pct``, ``days``,
``category``) or a function ``(value, row) -> str | None``; ``row.get(name)`` reads another feature
of the same row, ``row.category`` the offer's category; returning None falls back to the generic
phrase. Personal data never appears: personal columns and sensitive derived ones (age band) are
neither reasons nor readable from ``row``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from itertools import repeat
from json.encoder import encode_basestring as _encode_str
from typing import Any

import numpy as np
import pandas as pd

from ml.contract import PERSONAL_COLUMNS
from ml.tiers import TIER_NAMES

# Never shown to a CRM agent, even when a model uses them (age_band only exists when allowed).
HIDDEN_FEATURES: frozenset[str] = frozenset(PERSONAL_COLUMNS) | {"age_band", "customer_id", "bias"}
_HIDDEN_TOKENS = frozenset({"email", "birth", "age", "address", "dob"})

Template = str | Callable[[Any, "Row"], "str | None"]


def _hidden(name: str) -> bool:
    """Personal or sensitive: a personal column, or a name built on one (email_domain, age_band...)."""
    low = str(name).lower()
    return (low in HIDDEN_FEATURES or any(p in low for p in PERSONAL_COLUMNS)
            or not _HIDDEN_TOKENS.isdisjoint(low.split("_")))


class _Columns:
    """The non-personal columns of ``values``, turned into arrays on first use only."""

    def __init__(self, values: pd.DataFrame):
        self._values, self._arrays = values, {}
        self.names = frozenset(c for c in values.columns if not _hidden(c))

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.names:
            return None
        arr = self._arrays.get(name)
        if arr is None:
            col = self._values[name]
            numeric = pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype)
            arr = col.to_numpy(dtype=np.float64, na_value=np.nan) if numeric else col.to_numpy(dtype=object)
            self._arrays[name] = arr
        return arr


_CATEGORY = "\x00category"  # what Row records when a template reads the offer's category


class Row:
    """Read access to the other (non-personal) feature values of one row, for templates.

    With ``reads`` (a list) every name read is recorded: ``reason_codes`` uses that to reuse one
    rendered phrase for all rows that agree on the value, the category and what the template read.
    """

    __slots__ = ("_category", "_cols", "_i", "_reads")

    def __init__(self, cols: _Columns, i: int, category: str, reads: list[str] | None = None):
        self._cols, self._i, self._category, self._reads = cols, i, category, reads

    @property
    def category(self) -> str:
        """The offer's category (recorded as the read ``_CATEGORY``)."""
        if self._reads is not None:
            self._reads.append(_CATEGORY)
        return self._category

    def get(self, name: str) -> Any:
        if self._reads is not None:
            self._reads.append(name)
        col = self._cols.get(name)
        return None if col is None else _clean(col[self._i])


# ---------------------------------------------------------------------------- formatting

def _clean(v: Any) -> Any:
    """A JSON-ready scalar: None for missing, int for whole numbers, rounded floats, plain str."""
    if type(v) is float or type(v) is np.float64:  # the common case first: numeric feature columns
        if not math.isfinite(v):
            return None
        if v.is_integer() and abs(v) < 2**53:
            return int(v)
        return float(f"{v:.4g}")
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return None
        if f.is_integer() and abs(f) < 2**53:
            return int(f)
        return float(f"{f:.4g}")
    return str(v)


def _n(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or float(v).is_integer() else f"{v:.1f}"


def _plural(v: float) -> str:
    return "" if round(v) == 1 else "s"


def _times(v: float) -> str:
    n = round(v)
    return {0: "no times", 1: "once", 2: "twice"}.get(n, f"{n:,} times")


def _days(v: float) -> str:
    n = round(v)
    return "1 day" if n == 1 else f"{n:,} days"


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _tier(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if v is None:
        return None
    i = round(v)
    return TIER_NAMES[i] if 0 <= i < len(TIER_NAMES) else f"tier {i}"


def _duration(days: float) -> str:
    if days >= 365:
        years = days / 365.25
        return f"{years:.0f} years" if years >= 1.95 else "over a year"
    if days >= 60:
        return f"{days / 30.4:.0f} months"
    return _days(days)


def _numeric(fn: Callable[[float, Row], str | None]) -> Callable[[Any, Row], str | None]:
    """Templates for numbers: a missing or non-numeric value falls back to the generic phrase."""
    def wrapped(v: Any, row: Row) -> str | None:
        return fn(float(v), row) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return wrapped


def _gap_note(gap: Any) -> str:
    return f" (usual gap {_n(gap)})" if isinstance(gap, (int, float)) and gap > 0 else ""


# ---------------------------------------------------------------------------- templates

def _days_since_last_order(v: Any, row: Row) -> str | None:
    if v is None:
        return "no orders yet"
    return f"hasn't bought for {_days(v)}{_gap_note(row.get('order_gap_median'))}"


def _order_cycle_ratio(v: Any, row: Row) -> str | None:
    days, gap = row.get("days_since_last_order"), row.get("order_gap_median")
    if isinstance(days, (int, float)) and isinstance(gap, (int, float)) and gap > 0:
        return f"hasn't bought for {_days(days)} (usual gap {_n(gap)})"
    return None if v is None else f"{v:.1f}× their usual gap since the last order"


def _cat_days_since_last(v: Any, row: Row) -> str | None:
    if v is None:
        return f"has never bought {row.category}"
    return f"last bought {row.category} {_days(v)} ago{_gap_note(row.get('cat_gap_median'))}"


def _cat_cycle_ratio(v: Any, row: Row) -> str | None:
    days, gap = row.get("cat_days_since_last"), row.get("cat_gap_median")
    if isinstance(days, (int, float)) and isinstance(gap, (int, float)) and gap > 0:
        return f"hasn't bought {row.category} for {_days(days)} (usual gap {_n(gap)})"
    return None if v is None else f"{v:.1f}× their usual gap since buying {row.category}"


def _days_since_last_offer(v: Any, row: Row) -> str | None:
    return "has not received an offer yet" if v is None else f"no offer for {_days(v)}"


def _trend(v: float, row: Row) -> str:
    if v > 0.05:
        return "buying more often in the last 4 weeks than the 4 before"
    if v < -0.05:
        return "buying less often in the last 4 weeks than the 4 before"
    return "buying as often in the last 4 weeks as the 4 before"


def _price_vs_median(v: float, row: Row) -> str:
    if v <= 0:
        return "pays well below the category median price"
    if abs(v - 1) < 0.05:
        return "pays about the category median price"
    word = "below" if v < 1 else "above"
    return f"usually pays {abs(1 - v) * 100:.0f}% {word} the category median price"


def _tier_step(v: float, row: Row) -> str:
    n = round(v)
    if n == 0:
        return "offer is in the tier they usually buy"
    word = "above" if n > 0 else "below"
    return f"offer is {'one tier' if abs(n) == 1 else f'{abs(n)} tiers'} {word} what they usually buy"


PHRASES: dict[str, Template] = {
    # recency, frequency, monetary
    "days_since_last_order": _days_since_last_order,
    "order_cycle_ratio": _order_cycle_ratio,
    "order_gap_median": _numeric(lambda v, r: f"orders about every {_days(v)}"),
    "avg_order_value": _numeric(lambda v, r: f"spends {_n(v)} per order on average"),
    "tenure_days": _numeric(lambda v, r: f"customer for {_duration(v)}"),
    "days_since_first_order": _numeric(lambda v, r: f"first order {_days(v)} ago"),
    "n_categories": _numeric(lambda v, r: f"buys in {_n(v)} categor{'y' if round(v) == 1 else 'ies'}"),
    "trend_4w": _numeric(_trend),
    "trend_90d": _numeric(lambda v, r: _trend(v, r).replace("4 weeks", "90 days").replace("the 4 before",
                                                                                          "the 90 before")),
    # tier habits and price sensitivity
    "overall_tier": lambda v, r: None if _tier(v) is None else f"usually buys {_tier(v)} tier",
    "usual_tier": lambda v, r: None if _tier(v) is None else f"usually buys {_tier(v)} tier in {r.category}",
    "share_below_list": _numeric(lambda v, r: f"{_pct(v)} of their purchases were below list price"),
    "price_vs_cat_median": _numeric(_price_vs_median),
    # offer history
    "offer_responses": _numeric(lambda v, r: f"responded to {_n(v)} past offer{_plural(v)}"),
    "offer_response_rate": lambda v, r: "has no past offers yet" if v is None else
    f"responded to {_pct(v)} of past offers",
    "days_since_last_offer": _days_since_last_offer,
    "cat_days_since_offer": lambda v, r: f"no {r.category} offer in the last 90 days" if v is None else
    f"received a {r.category} offer {_days(v)} ago",
    # segment parts
    "value_band": lambda v, r: None if v is None else f"{v} spender over the last year",
    "activity_band": lambda v, r: None if v is None else f"{v} customer",
    # the candidate category
    "category": lambda v, r: None if v is None else f"offers in {v} often convert",
    "cat_days_since_last": _cat_days_since_last,
    "cat_cycle_ratio": _cat_cycle_ratio,
    "cat_gap_median": _numeric(lambda v, r: f"buys {r.category} about every {_days(v)}"),
    "cat_share_spend": _numeric(lambda v, r: f"{_pct(v)} of their spend goes to {r.category}"),
    "collab_sim": "customers like them often buy {category}",
    "related_owned": _numeric(lambda v, r: f"already buys {_n(v)} categor{'y' if round(v) == 1 else 'ies'} "
                              f"often bought with {r.category}"),
    "log_lift_sum": _numeric(lambda v, r: f"what they buy is {'often' if v > 0 else 'rarely'} bought "
                             f"together with {r.category}"),
    "related_spend_share": _numeric(lambda v, r: f"{_pct(v)} of their spend is in categories often bought "
                                    f"with {r.category}"),
    "related_orders_365d": _numeric(lambda v, r: f"bought {_times(v)} in a year in categories often bought "
                                    f"with {r.category}"),
    "related_order_rate": _numeric(lambda v, r: f"{v:.1f} purchases per order in categories often bought "
                                   f"with {r.category}"),
    # the offered product
    "offer_tier": lambda v, r: None if _tier(v) is None else f"offers a {_tier(v)} product",
    "offer_tier_step": _numeric(_tier_step),
    "offer_price_rel": _numeric(lambda v, r: f"priced at {v:.1f}× the median price paid in {r.category}"),
}

_CHANNEL_WORDS = {"web": "on the web", "app": "in the app", "store": "in a store", "phone": "by phone"}

PatternTemplate = Callable[[re.Match, Any, Row], "str | None"]
PATTERNS: list[tuple[re.Pattern, PatternTemplate]] = [
    (re.compile(r"^cat_orders_(\d+)d$"), lambda m, v, r: None if v is None else
     f"bought in {r.category} {_times(v)} in {m[1]} days"),
    (re.compile(r"^orders_(\d+)d$"), lambda m, v, r: None if v is None else
     f"{_n(v)} order{_plural(v)} in the last {m[1]} days"),
    (re.compile(r"^cat_spend_(\d+)d$"), lambda m, v, r: None if v is None else
     f"spent {_n(v)} on {r.category} in the last {m[1]} days"),
    (re.compile(r"^spend_(\d+)d$"), lambda m, v, r: None if v is None else
     f"spent {_n(v)} in the last {m[1]} days"),
    (re.compile(r"^cat_offers_(\d+)d$"), lambda m, v, r: None if v is None else
     f"received {_n(v)} {r.category} offer{_plural(v)} in the last {m[1]} days"),
    (re.compile(r"^offers_(\d+)d$"), lambda m, v, r: None if v is None else
     f"received {_n(v)} offer{_plural(v)} in the last {m[1]} days"),
    (re.compile(r"^cat_buyers_share_(\d+)d$"), lambda m, v, r: None if v is None else
     f"{_pct(v)} of active customers bought {r.category} in the last {m[1]} days"),
    (re.compile(r"^share_(budget|standard|premium)$"), lambda m, v, r: None if v is None else
     f"{_pct(v)} of their purchases are {m[1]} tier"),
    (re.compile(r"^share_(web|app|store|phone)$"), lambda m, v, r: None if v is None else
     f"{_pct(v)} of their orders {_CHANNEL_WORDS[m[1]]}"),
    (re.compile(r"^(cat_)?share_(above|below)_usual$"), lambda m, v, r: None if v is None else
     f"{_pct(v)} of their purchases{' in ' + r.category if m[1] else ''} are {m[2]} their usual tier"),
    (re.compile(r"^lift_(max|mean)$"), lambda m, v, r: None if v is None else
     f"{r.category} is often bought with what they already buy ({'average ' if m[1] == 'mean' else ''}"
     f"lift {v:.1f})"),
]


def _format(template: str, value: Any, row: Row) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return template.format(value=value, n=_n(value), pct=_pct(value), days=_days(value),
                               category=row.category)
    return template.format(value=value, n=value, pct=value, days=value, category=row.category)


def _resolve(feature: str) -> Callable[[Any, Row], str | None] | None:
    """The template for a feature name: exact name first, then the first matching family."""
    template = PHRASES.get(feature)
    if isinstance(template, str):
        return lambda v, r: _format(template, v, r)
    if template is not None:
        return template
    for pattern, fn in PATTERNS:
        m = pattern.match(feature)
        if m:
            return lambda v, r, m=m, fn=fn: fn(m, v, r)
    return None


def _render(feature: str, template: Callable[[Any, Row], str | None] | None, value: Any, row: Row) -> str:
    text: str | None = None
    if template is not None:
        try:
            text = template(value, row)
        except (TypeError, ValueError, KeyError, IndexError):
            text = None  # a template that does not fit this value: say it plainly instead of failing
    if text is None:
        text = f"{feature} unknown" if value is None else f"{feature} = {value}"
    return text


def phrase(feature: str, value: Any, row: Row) -> str:
    """The readable phrase for one feature value (generic "<feature> = <value>" when unknown)."""
    return _render(feature, _resolve(feature), _clean(value), row)


# ---------------------------------------------------------------------------- the codes

def _codes(col: np.ndarray | None, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, cleaned value per code) for ``col[rows]``: equal codes mean equal ``_clean`` values.

    Numbers are cleaned once per distinct value; other values are coded by (type, cleaned value),
    so 1, 1.0 and True (equal as dict keys) stay apart.
    """
    none = np.full(1, None, dtype=object)
    if col is None or not len(rows):
        return np.zeros(len(rows), dtype=np.int64), none
    v = col[rows]
    if v.dtype == np.float64:
        fin = np.isfinite(v)
        uniq, inv = np.unique(v[fin], return_inverse=True)
        cleaned = np.empty(len(uniq) + 1, dtype=object)
        cleaned[:-1] = [_clean(u) for u in uniq.tolist()]
        cleaned[-1] = None  # missing and infinite
        codes = np.full(len(v), len(uniq), dtype=np.int64)
        codes[fin] = inv
        return codes, cleaned
    index: dict[tuple, int] = {}
    values: list = []
    codes = np.empty(len(v), dtype=np.int64)
    for i, x in enumerate(v.tolist()):
        c = _clean(x)
        code = index.get((type(c), c))
        if code is None:
            code = index[(type(c), c)] = len(values)
            values.append(c)
        codes[i] = code
    cleaned = np.empty(len(values), dtype=object)
    cleaned[:] = values
    return codes, cleaned


def _json(v: Any) -> str:
    """``json.dumps(v, ensure_ascii=False)`` for the scalars ``_clean`` returns, without its overhead."""
    if isinstance(v, str):
        return _encode_str(v)
    if v is None:
        return "null"
    if v is True or v is False:
        return "true" if v else "false"
    if type(v) is float:
        return float.__repr__(v)
    if type(v) is int:
        return int.__repr__(v)
    return json.dumps(v, ensure_ascii=False)


def _groups(key: np.ndarray) -> list[np.ndarray]:
    """Positions grouped by equal ``key``, each group in position order."""
    if not len(key):
        return []
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def _phrases(feature: str, template: Callable[[Any, Row], str | None] | None, cols: _Columns,
             rows: np.ndarray, codes: np.ndarray, cleaned: np.ndarray, cat_codes: np.ndarray,
             cat_values: np.ndarray) -> np.ndarray:
    """The phrase for each of ``rows`` (value codes ``codes``), rendering each distinct case once.

    Rows are grouped by value and by what templates were seen to read (the category, other
    features), and each group's first row is rendered with a recording ``Row``. Templates are pure
    functions of the value and what they read, so if a render read only what the grouping already
    agrees on, its text holds for the whole group; otherwise what it newly read joins the grouping
    and the rest of the group is rendered again. Vectorised grouping, one render per distinct case.
    """
    out = np.empty(len(rows), dtype=object)
    base = codes
    names: list[str] = []
    read_codes: dict[str, np.ndarray] = {}
    cat_of_rows = cat_codes[rows]
    todo = np.arange(len(rows))
    while len(todo):
        key = base[todo]
        for name in names:
            c = read_codes[name][todo]
            key = np.unique(key * (int(c.max()) + 1) + c, return_inverse=True)[1].astype(np.int64)
        done = np.zeros(len(rows), dtype=bool)
        new: list[str] = []
        for group in _groups(key):
            members = todo[group]
            first = int(members[0])
            reads: list[str] = []
            row = Row(cols, int(rows[first]), cat_values[cat_of_rows[first]], reads)
            text = _render(feature, template, cleaned[codes[first]], row)
            unknown = [r for r in reads if r not in read_codes]
            if unknown:
                out[first], done[first] = text, True
                new.extend(unknown)
            else:
                out[members], done[members] = text, True
        for name in dict.fromkeys(new):
            read_codes[name] = cat_of_rows if name == _CATEGORY else _codes(cols.get(name), rows)[0]
            names.append(name)
        todo = todo[~done[todo]]
    return out


def reason_codes(contrib: pd.DataFrame, values: pd.DataFrame, k: int = 3) -> pd.Series:
    """JSON text per row: the top-k features by positive contribution, with value and phrase.

    ``contrib``: one column per feature (+ ``bias``, ignored), log-odds, as LightGBM ``pred_contrib``.
    ``values``: the same rows (by position) with the feature values and the offer's ``category``.
    Each item is ``{"feature", "value", "contribution", "phrase"}``, largest contribution first,
    contributions rounded to 4 decimals (those rounding to 0 are no reason); a row without any
    positive contribution gets ``[]``. Ties keep the model's column order.
    """
    if len(contrib) != len(values):
        raise ValueError(f"contrib has {len(contrib)} rows but values has {len(values)}")
    features = [c for c in contrib.columns if not _hidden(str(c))]
    n = len(contrib)
    if n == 0:
        return pd.Series([], index=contrib.index, dtype="string")
    c = contrib[features].to_numpy(dtype=np.float64, na_value=np.nan) if features else np.zeros((n, 0))
    # Positive as reported: a contribution that rounds to 0.0000 explains nothing.
    c = np.where(np.isfinite(c) & (np.round(c, 4) > 0), c, -np.inf)
    kk = min(k, len(features))
    top = np.argsort(-c, axis=1, kind="stable")[:, :kk]
    top_c = np.take_along_axis(c, top, axis=1)

    cols = _Columns(values)
    categories = values["category"].astype("string").fillna("this category").to_numpy(dtype=object) \
        if "category" in values.columns else np.full(n, "this category", dtype=object)

    cat_codes, cat_values = pd.factorize(pd.Series(categories), use_na_sentinel=False)
    cat_values = np.asarray(cat_values, dtype=object)
    # JSON text of each (row, rank) item, built per feature over all rows that feature explains;
    # the same text json.dumps gives for {"feature", "value", "contribution", "phrase"}.
    valid = np.isfinite(top_c)
    items = np.full((n, kk), "", dtype=object)
    for f in np.unique(top[valid]).tolist() if kk else []:
        rows, ranks = np.nonzero(valid & (top == f))
        name = features[f]
        codes, cleaned = _codes(cols.get(name), rows)
        phrases = _phrases(name, _resolve(name), cols, rows, codes, cleaned, cat_codes, cat_values)
        value_json = np.array([_json(v) for v in cleaned.tolist()], dtype=object)[codes]
        encoded: dict[str, str] = {}
        phrase_json = [encoded.get(t) or encoded.setdefault(t, _encode_str(t)) for t in phrases.tolist()]
        contribution_json = map(repr, map(round, top_c[rows, ranks].tolist(), repeat(4)))
        head = '{"feature": ' + _encode_str(name) + ', "value": '
        items[rows, ranks] = [f'{head}{v}, "contribution": {c}, "phrase": {p}}}' for v, c, p
                              in zip(value_json.tolist(), contribution_json, phrase_json, strict=True)]
    text = items[:, 0] if kk else np.full(n, "", dtype=object)
    for j in range(1, kk):
        text = text + np.where(valid[:, j], ", ", "").astype(object) + items[:, j]
    out = ("[" + text + "]") if n else text
    return pd.Series(out, index=contrib.index, dtype="string")
