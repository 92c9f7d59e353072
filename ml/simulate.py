"""A seeded synthetic shop with known ground truth, so model tests can compare with an oracle.

The shop is a daily process, vectorised over customers (the Python loop runs over days only):

- Customers have latent category affinities with family structure, a price sensitivity, an
  activity rate and a churn process ``active → declining → fading → churned``: activity decays
  and the customer trades down to cheaper tiers before leaving. Some customers trade up over time.
- On a visit, each category the customer already owns is bought with a habit probability; a
  never-bought category is adopted with a hazard that grows with the latent affinity and with the
  number of sibling categories (same family) owned ``OWNERSHIP_LAG_DAYS`` ago. The lag makes the
  future hazard a function of the past, so the oracle below is exact, not a Monte-Carlo estimate.
  Visits that buy nothing leave no trace (browsing).
- Offers go out on weekly campaign days (until the ground-truth cutoff) to customers with a granted
  consent on the channel used. An offer of type ``k`` adds an independent response: within the
  following ``OFFER_EFFECT_DAYS`` days the customer buys the offered product with probability
  ``TRUE_UPLIFT[k]`` (while not churned), so P(buy category) = p0 + u·(1 − p0).

- Offers from outside (``external_offers``, e.g. a batch offerflow published) are sent on their
  ``valid_from`` day to the non-control customers and answered the same way, from a separate random
  stream and without creating a habit, so the shop before that day (and, with zero uplift, every
  order) is identical to a run without them; ``external_truth`` is their exact conversion oracle.
- ``BehaviourShift`` changes prices and tastes from a date on (drift tests).

The ground truth is P(customer buys anything in the category in [cutoff, cutoff + H)) under this
model given the latent state at the cutoff, integrated over the churn chain, the visits and the
responses by an exact forward recursion (no realised future is used). ``p_up``/``p_down`` are the
same for a line of a higher/lower tier than the customer's usual tier there (DESIGN §3 rule).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ml.contract import CHANNELS_ORDER, CONTACT_CHANNELS, OFFER_TYPES
from ml.progress import log, peak_rss_mb, step

FAMILIES: dict[str, tuple[str, ...]] = {
    "Hot drinks": ("Coffee", "Tea", "Cocoa", "Mugs"),
    "Baking": ("Flour", "Baking mixes", "Bakeware", "Cake decorations"),
    "Pets": ("Dog food", "Cat food", "Pet toys", "Pet care"),
    "Baby": ("Diapers", "Baby food", "Baby care", "Baby toys"),
    "Personal care": ("Shampoo", "Skin care", "Oral care", "Fragrance"),
    "Home": ("Cleaning", "Laundry", "Kitchen paper", "Storage"),
}
CATEGORIES: tuple[str, ...] = tuple(c for cats in FAMILIES.values() for c in cats)
FAMILY_OF_CATEGORY: dict[str, str] = {c: f for f, cats in FAMILIES.items() for c in cats}
TIERS: tuple[str, ...] = ("budget", "standard", "premium")
REGIONS: tuple[str, ...] = ("North", "South", "East", "West", "Central", "Islands")

# Causal effect of one offer: probability that it triggers a purchase of the offered product
# within OFFER_EFFECT_DAYS (independent of the baseline purchase process).
TRUE_UPLIFT: dict[str, float] = {"cross_sell": 0.10, "upsell": 0.06, "downsell": 0.08}
OFFER_EFFECT_DAYS = 28
OWNERSHIP_LAG_DAYS = 28  # sibling ownership acts on adoption after this lag (>= horizon: exact oracle)
CAMPAIGN_EVERY_DAYS = 7
OFFER_SHARE = 0.025  # share of consenting customers offered something per campaign

# Churn chain: active, declining, fading, churned. Activity multiplier and tier shift per state.
N_STATES = 4
CHURNED = 3
ACTIVITY_MULT = np.array([1.0, 0.55, 0.25, 0.0], dtype=np.float32)
TIER_SHIFT = np.array([0.0, -1.0, -2.0, -2.0], dtype=np.float32)
DECLINE_EXIT = np.array([0.0, 1 / 35, 1 / 35, 0.0], dtype=np.float32)  # daily hazard to the next state
TIER_CUTS = np.array([-0.8, 0.9], dtype=np.float32)  # ordered logit: tier = #cuts below theta + noise
SIBLING_BOOST = 4.0  # adoption hazard × (1 + SIBLING_BOOST · owned siblings)
# Latent affinity = family part (shared by siblings, revealed by what a customer owns) + a small per-category
# part that no history reveals for a never-bought category: the oracle knows it, a model cannot.
# Calibrated so that trying a new category is driven mostly by what history can show (related categories
# owned, visit rate) and only moderately by hidden taste; with a large hidden part (per-category SD 0.7,
# adoption slope 1.2) no point-in-time feature could come within 0.05 ROC AUC of the oracle.
FAMILY_AFFINITY_SD = 1.5
CATEGORY_AFFINITY_SD = 0.1
# Per-visit adoption probability of a never-bought category = sigmoid(ADOPT_BASE + ADOPT_SLOPE · affinity).
ADOPT_BASE = -5.5
ADOPT_SLOPE = 0.5
REPEAT_SLOPE = 0.7  # per-visit repeat of an owned category = sigmoid(-1.5 + REPEAT_SLOPE · affinity)
_NEVER = np.int16(32767)
_LONG_AGO = np.int16(-30000)
_WEEKDAY = np.array([0.9, 0.9, 0.95, 1.0, 1.1, 1.25, 0.9], dtype=np.float32)  # Monday first
_GT_CHUNK = 20_000


@dataclass
class Simulation:
    """Everything one run produced; ``latent`` is per-customer hidden state for tests."""

    tables: dict[str, pd.DataFrame]
    ground_truth: pd.DataFrame
    latent: pd.DataFrame  # per customer: price sensitivity, activity, trade-up, churn hazard and days
    product_tier: pd.Series  # generating tier per product_id (the pipeline derives it from prices)
    cutoff: dt.date
    seconds: float
    # Per (customer, offer type) of ``external_offers``: P(convert in the window) without / with exposure.
    external_truth: pd.DataFrame | None = None


@dataclass(frozen=True)
class BehaviourShift:
    """A change of behaviour from ``start`` on, for drift tests: what a model trained before it has not seen.

    ``price_factor``: category or family -> factor on list price and unit cost (margins kept).
    ``affinity_delta``: category or family -> change of the latent affinity (repeat and adoption
    probabilities move on the logit scale by the same slopes the population uses).
    """

    start: dt.date
    price_factor: dict[str, float] = field(default_factory=dict)
    affinity_delta: dict[str, float] = field(default_factory=dict)


def default_shift(start: dt.date) -> BehaviourShift:
    """A plausible shock: 40% dearer drinks and household goods, pet and baby demand trading places."""
    return BehaviourShift(start, price_factor={"Hot drinks": 1.4, "Home": 1.4, "Personal care": 1.25},
                          affinity_delta={"Pets": 2.0, "Baby": -2.0, "Baking": 1.0})


def _resolve_categories(spec: dict[str, float]) -> dict[int, float]:
    """Category index -> value for a mapping keyed by category or family names (category wins)."""
    out: dict[int, float] = {}
    for name, value in spec.items():
        if name in FAMILIES:
            out.update({CATEGORIES.index(c): value for c in FAMILIES[name] if CATEGORIES.index(c) not in out})
        elif name in CATEGORIES:
            out[CATEGORIES.index(name)] = value
        else:
            raise ValueError(f"unknown category or family {name!r}")
    return out


def _daily_hazard(uplift: dict[str, float]) -> np.ndarray:
    """Per offer type, the daily response hazard whose OFFER_EFFECT_DAYS-day total is the uplift."""
    return np.array([1 - (1 - uplift[k]) ** (1 / OFFER_EFFECT_DAYS) for k in OFFER_TYPES], dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """Zero-padded string ids built in Arrow (millions of ids, no Python loop)."""
    digits = pc.utf8_lpad(pa.array(numbers, type=pa.int64()).cast(pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _str_series(arr: pa.Array) -> pd.Series:
    return pd.Series(pd.arrays.ArrowStringArray(arr))  # zero-copy: no Python strings


def _categorical(codes: np.ndarray, labels: tuple[str, ...] | list[str]) -> pd.Categorical:
    return pd.Categorical.from_codes(codes.astype(np.int32),
                                     categories=pd.Index(list(labels), dtype="str"))


def _season(start: dt.date, days: int) -> np.ndarray:
    """Daily demand factor: a Christmas peak, a mild winter/summer wave and a weekday pattern."""
    dates = pd.date_range(start, periods=days, freq="D")
    doy = dates.day_of_year.to_numpy().astype(np.float32)
    dist = np.minimum(np.abs(doy - 350), 365 - np.abs(doy - 350))
    year = 1.0 + 0.35 * np.exp(-((dist / 14.0) ** 2)) + 0.08 * np.cos(2 * np.pi * (doy - 30) / 365)
    return (year * _WEEKDAY[dates.day_of_week.to_numpy()]).astype(np.float32)


_FAMILY_SIZE = len(next(iter(FAMILIES.values())))
assert all(len(c) == _FAMILY_SIZE for c in FAMILIES.values())  # siblings by reshape, no BLAS


def _siblings(owned: np.ndarray) -> np.ndarray:
    """Number of other categories of the same family owned, per (row, category)."""
    fam = owned.reshape(len(owned), len(FAMILIES), _FAMILY_SIZE).sum(axis=2, dtype=np.int8)
    return np.repeat(fam, _FAMILY_SIZE, axis=1) - owned


def _category_prob(repeat: np.ndarray, adopt: np.ndarray, first_day: np.ndarray, day: int,
                   lag: int) -> np.ndarray:
    """Per-visit purchase probability per category: habit if owned, else a sibling-boosted adoption.

    Shared by the simulation and the oracle so both use the same model.
    """
    boost = 1.0 + np.float32(SIBLING_BOOST) * _siblings(first_day <= day - lag)
    return np.where(first_day < day, repeat, np.minimum(adopt * boost, np.float32(0.95)))


# ---------------------------------------------------------------------------- catalogue

def _catalogue(rng: np.random.Generator, days: int) -> dict[str, np.ndarray]:
    """Products per (category, tier) with non-overlapping price bands and equal counts per tier."""
    n_cat = len(CATEGORIES)
    per_tier = rng.integers(3, 6, n_cat)  # the same count in each tier: terciles recover tiers
    base = np.exp(rng.uniform(np.log(3.0), np.log(60.0), n_cat))
    bands = np.array([[0.55, 0.8], [0.9, 1.25], [1.45, 2.3]])
    cat, tier, price = [], [], []
    for c in range(n_cat):
        for k in range(3):
            lo, hi = bands[k] * base[c]
            p = np.sort(np.round(rng.uniform(lo, hi, per_tier[c]), 2))
            cat += [c] * per_tier[c]
            tier += [k] * per_tier[c]
            price.append(np.maximum(p, 0.5))
    cat, tier, price = np.array(cat, np.int16), np.array(tier, np.int8), np.concatenate(price)
    n = len(cat)
    weight = rng.pareto(1.5, n) + 0.2  # skewed popularity: best sellers exist
    new = np.zeros(n, bool)
    new[rng.choice(n, max(4, n // 50), replace=False)] = True  # just launched: never sold
    weight[new] = 0.0
    stop = np.full(n, np.iinfo(np.int32).max, np.int32)
    disc = ~new & (rng.random(n) < 0.06)
    stop[disc] = (rng.uniform(0.3, 0.8, disc.sum()) * days).astype(np.int32)  # inactive, with history
    margin = rng.uniform(0.15, 0.55, n)
    unit_cost = np.round(price * (1 - margin), 2)
    unit_cost[rng.random(n) < 0.03] = np.nan  # cost unknown
    at_cost = rng.choice(n, 3, replace=False)
    unit_cost[at_cost] = price[at_cost]  # sold at cost
    return {"category": cat, "tier": tier, "price": price, "unit_cost": unit_cost, "weight": weight,
            "stop": stop, "active": stop > days, "n": np.array(n)}


class _Picker:
    """Vectorised choice of a product within (category, tier) by popularity, on a given day."""

    def __init__(self, cat: dict[str, np.ndarray]):
        groups = cat["category"].astype(np.int32) * 3 + cat["tier"]
        order = np.argsort(groups, kind="stable")
        self.n_groups = len(CATEGORIES) * 3
        counts = np.bincount(groups, minlength=self.n_groups)
        width = counts.max()
        self.table = np.zeros((self.n_groups, width), np.int32)
        self.valid = np.zeros((self.n_groups, width), bool)
        pos = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.table[groups[order], pos] = order
        self.valid[groups[order], pos] = True
        self.weight, self.stop = cat["weight"], cat["stop"]
        self._day, self._cum = -1, None

    def _cumulative(self, day: int) -> np.ndarray:
        if day != self._day:
            w = np.where(self.valid & (self.stop[self.table] > day), self.weight[self.table], 0.0)
            self._cum = np.cumsum(w, axis=1) / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
            self._day = day
        return self._cum

    def pick(self, group: np.ndarray, u: np.ndarray, day: int) -> np.ndarray:
        cum = self._cumulative(day)[group]
        idx = np.minimum((u[:, None] > cum).sum(axis=1), self.table.shape[1] - 1)
        return self.table[group, idx]

    def best(self, group: np.ndarray, day: int) -> np.ndarray:
        """Best-selling product still on sale: what a CRM would offer."""
        w = np.where(self.valid & (self.stop[self.table] > day), self.weight[self.table], -1.0)
        return self.table[group, np.argmax(w[group], axis=1)]


# ---------------------------------------------------------------------------- population

def _population(rng: np.random.Generator, n: int, days: int) -> dict[str, np.ndarray]:
    n_fam, n_cat = len(FAMILIES), len(CATEGORIES)
    fam_idx = np.array([list(FAMILIES).index(FAMILY_OF_CATEGORY[c]) for c in CATEGORIES])
    cat_pop = rng.normal(0.0, 0.5, n_cat).astype(np.float32)
    aff = (rng.normal(0.0, FAMILY_AFFINITY_SD, (n, n_fam)).astype(np.float32)[:, fam_idx]
           + rng.normal(0.0, CATEGORY_AFFINITY_SD, (n, n_cat)).astype(np.float32) + cat_pop)
    repeat = _sigmoid(-1.5 + REPEAT_SLOPE * aff).astype(np.float32)
    adopt = _sigmoid(np.float32(ADOPT_BASE) + np.float32(ADOPT_SLOPE) * aff).astype(np.float32)
    # Starting habits: 1-3 categories, chosen by affinity (Gumbel top-k).
    k = 1 + rng.binomial(2, 0.5, n)
    rank = np.argsort(-(aff + rng.gumbel(size=(n, n_cat)).astype(np.float32)), axis=1).argsort(axis=1)
    first_day = np.where(rank < k[:, None], _LONG_AGO, _NEVER).astype(np.int16)
    del aff, rank

    pre = rng.random(n) < 0.6  # signed up before the period (tenure up to 5 years)
    signup = np.where(pre, -rng.integers(1, 5 * 365, n), rng.integers(0, days, n)).astype(np.int32)
    lam = np.minimum(np.exp(rng.normal(np.log(0.06), 0.7, n)), 0.35).astype(np.float32)
    lam[rng.random(n) < 0.005] = 0.0  # registered, never buys
    sens = rng.beta(2.0, 3.0, n).astype(np.float32)
    theta = (0.9 - 2.2 * sens + rng.normal(0.0, 0.4, n)).astype(np.float32)
    up = np.where(rng.random(n) < 0.2, rng.uniform(0.8, 2.0, n), 0.0).astype(np.float32)  # per year
    eta = np.exp(rng.normal(np.log(0.25 / 365), 0.8, n)).astype(np.float32)  # active -> declining
    state = np.where(pre, rng.choice(N_STATES, n, p=[0.8, 0.04, 0.04, 0.12]), 0).astype(np.int8)
    never = np.full(n, np.iinfo(np.int32).max, np.int32)
    return {"decline_day": never.copy(), "churn_day": never, "first_day": first_day, "repeat": repeat,
            "adopt": adopt, "signup": signup, "lam": lam,
            "sens": sens, "theta": theta, "up": up, "eta": eta, "state": state,
            "channel": rng.choice(len(CHANNELS_ORDER), n, p=[0.45, 0.3, 0.2, 0.05]).astype(np.int8),
            "cat_tier": rng.normal(0.0, 0.3, n_cat).astype(np.float32)}


def _tier_theta(pop: dict[str, np.ndarray], rows: np.ndarray | slice, day: int,
                state: np.ndarray) -> np.ndarray:
    """Willingness to pay per (customer, category): habit + trade-up drift + churn trade-down."""
    base = pop["theta"][rows] + pop["up"][rows] * (day / 365.0) + TIER_SHIFT[state]
    return base[:, None] + pop["cat_tier"][None, :]


def _consents(rng: np.random.Generator, signup: np.ndarray, days: int) -> dict[str, np.ndarray]:
    """Rows per (customer, channel): grants, refusals, later revocations; many customers have none."""
    n = len(signup)
    has_any = rng.random(n) < 0.6
    cust, chan, granted, day = [], [], [], []
    grant_day = np.full((n, 3), np.iinfo(np.int32).max, np.int32)
    revoke_day = np.full((n, 3), np.iinfo(np.int32).max, np.int32)
    for j, p_row in enumerate((0.9, 0.45, 0.6)):
        row = has_any & (rng.random(n) < p_row)
        ok = rng.random(n) < 0.93
        d = np.minimum(signup + rng.integers(0, 30, n), days - 1)
        revoked = row & ok & (rng.random(n) < 0.15)
        d_rev = d + rng.integers(10, 300, n)
        revoked &= d_rev < days
        idx = np.flatnonzero(row)
        cust.append(idx)
        chan.append(np.full(len(idx), j))
        granted.append(ok[idx])
        day.append(d[idx])
        ridx = np.flatnonzero(revoked)
        cust.append(ridx)
        chan.append(np.full(len(ridx), j))
        granted.append(np.zeros(len(ridx), bool))
        day.append(d_rev[ridx])
        grant_day[row & ok, j] = d[row & ok]
        revoke_day[revoked, j] = d_rev[revoked]
    out = {"customer": np.concatenate(cust), "channel": np.concatenate(chan).astype(np.int8),
           "granted": np.concatenate(granted), "day": np.concatenate(day).astype(np.int32)}
    out["sec"] = rng.integers(0, 86400, len(out["customer"])).astype(np.int32)
    out["grant_day"], out["revoke_day"] = grant_day, revoke_day
    return out


# ---------------------------------------------------------------------------- the process

class _Shop:
    def __init__(self, customers: int, days: int, seed: int, start: dt.date, horizon_days: int,
                 external_offers: pd.DataFrame | None = None, external_uplift: dict[str, float] | None = None,
                 shift: BehaviourShift | None = None):
        if customers < 1 or days < 2 * horizon_days or horizon_days < 1:
            raise ValueError(f"need customers >= 1 and days >= 2 * horizon_days; got {customers}, {days}, "
                             f"{horizon_days}")
        self.n, self.days, self.start, self.h = customers, days, start, horizon_days
        self.cutoff_day = days - horizon_days
        self.lag = max(OWNERSHIP_LAG_DAYS, horizon_days)
        self.rng = np.random.default_rng(seed)
        self.season = _season(start, days)
        self.cat = _catalogue(self.rng, days)
        self.picker = _Picker(self.cat)
        self.pop = _population(self.rng, customers, days)
        self.cons = _consents(self.rng, self.pop["signup"], days)
        self.signup_order = np.argsort(self.pop["signup"], kind="stable")
        self.signup_sorted = self.pop["signup"][self.signup_order]
        self.hazard = np.zeros(customers, np.float32)
        self.rate = np.zeros(customers, np.float32)
        self.seen = np.zeros((customers, len(CATEGORIES)), bool)  # bought in the data (not latent habit)
        self.orders: list[tuple[np.ndarray, ...]] = []  # (customer, day, second, channel)
        self.lines: list[tuple[np.ndarray, ...]] = []  # (order index, product, quantity, cents)
        self.offers: list[dict[str, np.ndarray]] = []
        self.n_orders = 0
        self.resp_hazard = _daily_hazard(TRUE_UPLIFT)
        self.ground_truth: pd.DataFrame | None = None
        # Offers from outside (a CRM batch): their own RNG, so the shop's own draws stay the same.
        self.ext = None if external_offers is None else self._external(external_offers)
        uplift = TRUE_UPLIFT if external_uplift is None else {**TRUE_UPLIFT, **external_uplift}
        if not all(0.0 <= uplift[k] < 1.0 for k in OFFER_TYPES):
            raise ValueError(f"uplift must be in [0, 1) per offer type, got {uplift}")
        self.ext_hazard = _daily_hazard(uplift)
        self.ext_rng = np.random.default_rng([seed, 0x0FFE])
        self.ext_sent: list[dict[str, np.ndarray]] = []
        self.ext_truth: list[pd.DataFrame] = []
        self.shift = shift
        self.shift_day = None if shift is None else (pd.Timestamp(shift.start).date() - start).days

    # --- one day
    def run(self) -> None:
        for day in range(self.days):
            if day == self.shift_day:
                self._apply_shift()
            if day == self.cutoff_day:
                with step("simulate: ground truth at the cutoff") as info:
                    self.ground_truth = self._oracle()
                    info["detail"] = f"{len(self.ground_truth):,} rows"
            if self.ext is not None and (self.ext["day"] == day).any():
                self._send_external(day)
            self._day(day)

    def _signups(self, day: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.signup_sorted, [day, day + 1] if day > 0 else [-(1 << 30), 1])
        return self.signup_order[lo:hi]

    def _refresh(self, idx: np.ndarray) -> None:
        """Daily move hazard and visit rate of customers whose state changed (kept, not recomputed)."""
        pop, st = self.pop, self.pop["state"][idx]
        self.hazard[idx] = np.where(st == 0, pop["eta"][idx], DECLINE_EXIT[st])
        self.rate[idx] = pop["lam"][idx] * ACTIVITY_MULT[st]

    def _day(self, day: int) -> None:
        rng, pop = self.rng, self.pop
        if day < self.cutoff_day and day % CAMPAIGN_EVERY_DAYS == 0:
            self._campaign(day)  # knows the orders up to yesterday
        self._refresh(self._signups(day))  # before signup: hazard and rate stay 0
        state = pop["state"]
        moved = np.flatnonzero(rng.random(self.n, dtype=np.float32) < self.hazard)
        state[moved] += 1
        self._refresh(moved)
        pop["decline_day"][moved[state[moved] == 1]] = day
        pop["churn_day"][moved[state[moved] == CHURNED]] = day
        who = np.flatnonzero(rng.random(self.n, dtype=np.float32) < self.rate * self.season[day])
        p = _category_prob(pop["repeat"][who], pop["adopt"][who], pop["first_day"][who], day, self.lag)
        buy = rng.random(p.shape, dtype=np.float32) < p
        has = buy.any(axis=1)
        who, buy = who[has], buy[has]
        rows, cats = np.nonzero(buy)
        theta = _tier_theta(pop, who, day, state[who])[rows, cats]
        self._emit(day, who, rows, cats, theta, free_samples=True)
        self._respond(day, state)
        if self.ext_sent:
            self._respond_external(day, state)

    def _emit(self, day: int, who: np.ndarray, rows: np.ndarray, cats: np.ndarray, theta: np.ndarray,
              free_samples: bool, product: np.ndarray | None = None,
              rng: np.random.Generator | None = None, adopt: bool = True) -> None:
        """Orders for customers ``who`` with one line per (row, category); adoption recorded if ``adopt``."""
        rng, pop, n_new = rng or self.rng, self.pop, len(who)
        if n_new == 0:
            return
        chan = np.where(rng.random(n_new) < 0.8, pop["channel"][who],
                        rng.integers(0, len(CHANNELS_ORDER), n_new)).astype(np.int8)
        sec = (rng.beta(2.5, 2.0, n_new) * 86399).astype(np.int32)
        self.orders.append((who.astype(np.int32), np.full(n_new, day, np.int16), sec, chan))
        if product is None:
            u = rng.random(len(rows))
            eps = np.log(u) - np.log1p(-u)  # logistic noise: ordered logit over the tiers
            tier = ((theta + eps)[:, None] > TIER_CUTS[None, :]).sum(axis=1)
            product = self.picker.pick(cats * 3 + tier, rng.random(len(rows)), day)
            disc = rng.random(len(rows)) < 0.03 + 0.35 * pop["sens"][who[rows]]
            factor = np.where(disc, 1.0 - rng.uniform(0.1, 0.3, len(rows)), 1.0)
        else:
            tier, factor = self.cat["tier"][product], np.ones(len(rows))
        cents = np.round(self.cat["price"][product] * 100 * factor).astype(np.int32)
        qty = np.minimum(rng.geometric(0.7, len(rows)), 4).astype(np.int8)
        order_idx = (self.n_orders + rows).astype(np.int32)
        self.lines.append((order_idx, product.astype(np.int16), qty, cents))
        if free_samples:  # a sample of another product of the same category and tier, for free
            s = np.flatnonzero(rng.random(len(rows)) < 0.03)
            other = self.picker.pick(cats[s] * 3 + tier[s], rng.random(len(s)), day)
            s, other = s[other != product[s]], other[other != product[s]]
            self.lines.append((order_idx[s], other.astype(np.int16), np.ones(len(s), np.int8),
                               np.zeros(len(s), np.int32)))
        self.n_orders += n_new
        if not adopt:
            return
        fd = pop["first_day"]
        cust = who[rows]
        fd[cust, cats] = np.minimum(fd[cust, cats], day)
        self.seen[cust, cats] = True

    def _active_offers(self, day: int) -> dict[str, np.ndarray] | None:
        live = [o for o in self.offers if day - OFFER_EFFECT_DAYS <= o["day"][0] < day]
        if not live:
            return None
        return {k: np.concatenate([o[k] for o in live]) for k in live[0]}

    def _respond(self, day: int, state: np.ndarray) -> None:
        off = self._active_offers(day)
        if off is None:
            return
        hit = (self.rng.random(len(off["customer"]), dtype=np.float32) < self.resp_hazard[off["type"]]) \
            & (state[off["customer"]] != CHURNED)
        who = off["customer"][hit]
        self._emit(day, who, np.arange(len(who)), off["category"][hit].astype(np.int64), np.zeros(len(who)),
                   free_samples=False, product=off["product"][hit])

    def _campaign(self, day: int) -> None:
        """Offers to a random share of consenting customers, of a type their (known) history fits."""
        rng, pop, cons = self.rng, self.pop, self.cons
        allowed = (cons["grant_day"] < day) & (cons["revoke_day"] > day)  # granted by the previous day
        target = np.flatnonzero(allowed.any(axis=1) & (pop["signup"] <= day)
                                & (rng.random(self.n, dtype=np.float32) < OFFER_SHARE))
        if len(target) == 0:
            return
        bought = self.seen[target]  # what the CRM can see: bought in the data
        want = rng.choice(3, len(target), p=[0.5, 0.25, 0.25])
        want = np.where(bought.any(axis=1), want, 0)
        want = np.where(bought.all(axis=1), np.maximum(want, 1), want)
        n_sib = _siblings(bought)
        gumbel = rng.gumbel(size=bought.shape)
        cross_score = np.where(~bought, np.log1p(3 * n_sib) + gumbel, -np.inf)
        own_score = np.where(bought, gumbel, -np.inf)
        category = np.where(want == 0, cross_score.argmax(axis=1), own_score.argmax(axis=1))
        usual = ((pop["theta"][target] + pop["cat_tier"][category])[:, None] > TIER_CUTS[None, :]).sum(axis=1)
        tier = np.clip(usual + np.array([0, 1, -1])[want], 0, 2)
        product = self.picker.best(category * 3 + tier, day)
        ch_score = np.where(allowed[target], rng.random((len(target), 3)), -1.0)
        self.offers.append({"customer": target.astype(np.int32), "category": category.astype(np.int8),
                            "product": product.astype(np.int16), "tier": tier.astype(np.int8),
                            "type": want.astype(np.int8), "channel": ch_score.argmax(axis=1).astype(np.int8),
                            "day": np.full(len(target), day, np.int16),
                            "sec": rng.integers(8 * 3600, 18 * 3600, len(target)).astype(np.int32)})

    # --- offers from outside (a CRM batch) and a behaviour shift
    def _external(self, offers: pd.DataFrame) -> dict[str, np.ndarray]:
        """Offer rows -> index arrays; control rows are kept (for the truth) but never sent."""
        need = {"customer_id", "product_id", "offer_type", "channel", "valid_from"}
        if missing := need - set(offers.columns):
            raise ValueError(f"external_offers lacks columns {sorted(missing)}")
        cust_ids = pd.Index(_str_series(_ids("C", np.arange(self.n), self._id_width())), dtype="str")
        prod_ids = pd.Index([f"P{i:05d}" for i in range(int(self.cat["n"]))], dtype="str")
        cust = cust_ids.get_indexer(offers["customer_id"].astype(str))
        prod = prod_ids.get_indexer(offers["product_id"].astype(str))
        kind = pd.Index(list(OFFER_TYPES)).get_indexer(offers["offer_type"].astype(str))
        chan = pd.Index(list(CONTACT_CHANNELS)).get_indexer(offers["channel"].astype(str))
        if (cust < 0).any() or (prod < 0).any() or (kind < 0).any() or (chan < 0).any():
            raise ValueError("external_offers name customers, products, offer types or channels the shop "
                             "does not have")
        ts = pd.to_datetime(offers["valid_from"], utc=True).dt.tz_convert(None).dt.normalize()
        day = ((ts - pd.Timestamp(self.start)).dt.days).to_numpy(np.int64)
        if len(day) and (day.min() < 0 or day.max() + self.h > self.days):
            raise ValueError(f"external offers must start within day 0..{self.days - self.h} of the shop "
                             "(their outcome window has to fit)")
        control = (offers["is_control"].astype(bool).to_numpy() if "is_control" in offers.columns
                   else np.zeros(len(offers), bool))
        return {"customer": cust.astype(np.int32), "product": prod.astype(np.int16),
                "category": self.cat["category"][prod].astype(np.int8), "tier": self.cat["tier"][prod],
                "type": kind.astype(np.int8), "channel": chan.astype(np.int8), "day": day.astype(np.int16),
                "control": control}

    def _send_external(self, day: int) -> None:
        """Truth for the offers starting today (before anything happens today), then send the treated ones."""
        e = self.ext
        assert e is not None
        sel = np.flatnonzero(e["day"] == day)
        rows = {k: v[sel] for k, v in e.items()}
        rows["hazard"] = self.ext_hazard[rows["type"]]
        self.ext_truth.append(self._conversion_truth(day, rows))
        sent = ~rows["control"]
        out = {k: rows[k][sent] for k in ("customer", "category", "tier", "type", "product", "channel", "day",
                                          "hazard")}
        out["sec"] = self.ext_rng.integers(8 * 3600, 18 * 3600, int(sent.sum())).astype(np.int32)
        self.ext_sent.append(out)

    def _respond_external(self, day: int, state: np.ndarray) -> None:
        """Responses add orders but no habit (``adopt=False``): the shop's own process, its random draws
        and so every other table stay exactly those of the run without the offers. Within the outcome
        window that changes nothing (a converted customer has converted; sibling ownership acts only
        after ``OWNERSHIP_LAG_DAYS`` >= H); what is left out is a carry-over effect after it."""
        live = [o for o in self.ext_sent if len(o["day"]) and day - OFFER_EFFECT_DAYS <= o["day"][0] < day]
        if not live:
            return
        off = {k: np.concatenate([o[k] for o in live]) for k in ("customer", "category", "product", "hazard")}
        hit = (self.ext_rng.random(len(off["customer"]), dtype=np.float32) < off["hazard"]) \
            & (state[off["customer"]] != CHURNED)
        who = off["customer"][hit]
        self._emit(day, who, np.arange(len(who)), off["category"][hit].astype(np.int64), np.zeros(len(who)),
                   free_samples=False, product=off["product"][hit], rng=self.ext_rng, adopt=False)

    def _apply_shift(self) -> None:
        shift, pop, cat = self.shift, self.pop, self.cat
        assert shift is not None
        for c, f in _resolve_categories(shift.price_factor).items():
            m = cat["category"] == c
            cat["price"][m] = np.round(cat["price"][m] * f, 2)
            cat["unit_cost"][m] = np.round(cat["unit_cost"][m] * f, 2)
        for c, d in _resolve_categories(shift.affinity_delta).items():
            for key, slope in (("repeat", REPEAT_SLOPE), ("adopt", ADOPT_SLOPE)):
                x = pop[key][:, c].astype(np.float64)
                pop[key][:, c] = _sigmoid(np.log(x) - np.log1p(-x) + slope * d).astype(np.float32)

    def _conversion_truth(self, day: int, x: dict[str, np.ndarray]) -> pd.DataFrame:
        """Exact P(customer buys in any category offered to them of one type, in [day, day + H)), without
        (``p_control``) and with (``p_treated``) exposure to all of the customer's offers in ``x``.

        The unit and the event are the monitor's: a customer converts in an offer-type group when they buy
        in any of the group's offered categories within the window. A visit buys each category
        independently, so per visit P(none of the set) = Π(1 − p_c); the churn chain is integrated like in
        ``_oracle_chunk``. Offers already sent (the shop's campaigns, earlier external ones) act on both.
        Exact when no campaign starts inside the window (the shop's own stop at the cutoff).
        """
        pop, H, n_cat, E = self.pop, self.h, len(CATEGORIES), OFFER_EFFECT_DAYS
        groups = pd.DataFrame({"customer": x["customer"], "type": x["type"]}).drop_duplicates()
        groups = groups.sort_values(["customer", "type"]).reset_index(drop=True)
        G = len(groups)
        gc = groups["customer"].to_numpy(np.int64)
        key = pd.Index(gc * 3 + groups["type"].to_numpy(np.int64))
        gi = key.get_indexer(x["customer"].astype(np.int64) * 3 + x["type"])
        mask = np.zeros((G, n_cat), bool)
        mask[gi, x["category"].astype(np.int64)] = True

        def pairs(cust: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(group, offer) for every offer of a group's customer in one of the group's categories."""
            m = pd.DataFrame({"customer": cust.astype(np.int64), "o": np.arange(len(cust))}).merge(
                pd.DataFrame({"customer": gc, "g": np.arange(G)}), on="customer")
            g, o = m["g"].to_numpy(), m["o"].to_numpy()
            keep = mask[g, cat.astype(np.int64)[o]]
            return g[keep], o[keep]

        bg = self._offers_frame()
        bg_g, bg_o = pairs(bg["customer"], bg["category"])
        bg_day, bg_keep = bg["day"][bg_o].astype(np.int64), 1.0 - bg["hazard"][bg_o].astype(np.float64)
        x_g, x_o = pairs(x["customer"], x["category"])
        x_day, x_keep = x["day"][x_o].astype(np.int64), 1.0 - x["hazard"][x_o].astype(np.float64)

        W = np.zeros((2, N_STATES, G))  # [without, with] × state: P(state s on day t, no conversion yet)
        W[:, pop["state"][gc], np.arange(G)] = 1.0
        signup = pop["signup"][gc]
        repeat, adopt, fd, lam = pop["repeat"][gc], pop["adopt"][gc], pop["first_day"][gc], pop["lam"][gc]
        z1, z2 = float(DECLINE_EXIT[1]), float(DECLINE_EXIT[2])
        for t in range(day, day + H):
            joined = signup <= t  # before signing up a customer neither moves nor buys
            eta = np.where(joined, pop["eta"][gc], 0.0)
            for X in W:
                X[3] += X[2] * z2 * joined
                X[2] *= 1 - z2 * joined
                X[2] += X[1] * z1 * joined
                X[1] *= 1 - z1 * joined
                X[1] += X[0] * eta
                X[0] *= 1 - eta
            p = _category_prob(repeat, adopt, fd, t, self.lag).astype(np.float64)
            q = 1.0 - np.prod(np.where(mask, 1.0 - p, 1.0), axis=1)
            bg_live = (bg_day < t) & (bg_day >= t - E)
            x_live = (x_day < t) & (x_day >= t - E)
            for s in range(CHURNED):
                v = lam.astype(np.float64) * float(self.season[t] * ACTIVITY_MULT[s]) * joined
                W[:, s] *= 1.0 - v * q
                for k in range(2):
                    np.multiply.at(W[k, s], bg_g[bg_live], bg_keep[bg_live])
                np.multiply.at(W[1, s], x_g[x_live], x_keep[x_live])
        p0, p1 = (np.clip(1.0 - W[k].sum(axis=0), 0.0, 1.0) for k in range(2))
        control = pd.Series(x["control"]).groupby(gi).any().reindex(range(G), fill_value=False).to_numpy()
        n_offers = np.bincount(gi, minlength=G)
        ids = _ids("C", gc, self._id_width())
        return pd.DataFrame({
            "customer_id": _str_series(ids),
            "offer_type": _categorical(groups["type"].to_numpy(), OFFER_TYPES),
            "valid_from": pd.Timestamp(self.start + dt.timedelta(days=day)),
            "is_control": control, "n_offers": n_offers.astype(np.int16),
            "p_control": p0, "p_treated": p1,
        })

    # --- ground truth
    def _usual_tier(self, upto_day: int) -> np.ndarray:
        """Most common tier per (customer, category) in the lines before the cutoff; ties → lower; -1 none."""
        if not self.lines:
            return np.full((self.n, len(CATEGORIES)), -1, np.int8)
        order_cust = np.concatenate([o[0] for o in self.orders])
        order_day = np.concatenate([o[1] for o in self.orders])
        idx = np.concatenate([ln[0] for ln in self.lines])
        prod = np.concatenate([ln[1] for ln in self.lines])
        keep = order_day[idx] < upto_day
        cust, prod = order_cust[idx[keep]], prod[keep]
        group = cust.astype(np.int64) * len(CATEGORIES) + self.cat["category"][prod]
        keys, counts = np.unique(group * 3 + self.cat["tier"][prod], return_counts=True)
        group, tier = keys // 3, keys % 3
        first = np.lexsort((tier, -counts, group))  # per group: most lines first, ties → lower tier
        first = first[np.r_[True, group[first][1:] != group[first][:-1]]]
        usual = np.full(self.n * len(CATEGORIES), -1, np.int8)
        usual[group[first]] = tier[first]
        usual = usual.reshape(self.n, len(CATEGORIES))
        return usual

    def _oracle(self) -> pd.DataFrame:
        """Exact P(buy), P(higher tier), P(lower tier) in [cutoff, cutoff + H) per (customer, category)."""
        T, H, pop = self.cutoff_day, self.h, self.pop
        exists = np.flatnonzero(pop["signup"] < T)
        usual = self._usual_tier(T)
        off = self._offers_frame()
        n_cat = len(CATEGORIES)
        out = {k: np.empty((len(exists), n_cat), np.float32) for k in ("buy", "up", "down")}
        for lo in range(0, len(exists), _GT_CHUNK):
            rows = exists[lo:lo + _GT_CHUNK]
            res = self._oracle_chunk(rows, usual[rows], off)
            for k in out:
                out[k][lo:lo + len(rows)] = res[k]
        u = usual[exists]
        n = len(exists)
        cust_ids = _str_series(_ids("C", exists, self._id_width()))
        gt = pd.DataFrame({
            "customer_id": pd.Categorical.from_codes(np.repeat(np.arange(n, dtype=np.int32), n_cat),
                                                     categories=pd.Index(cust_ids, dtype="str")),
            "category": _categorical(np.tile(np.arange(n_cat), n), CATEGORIES),
            "cutoff": np.full(n * n_cat, np.datetime64(self.start + dt.timedelta(days=T), "us")),
            "horizon_days": np.full(n * n_cat, H, np.int16),
            "p_buy": out["buy"].ravel(),
            "p_up": out["up"].ravel(),
            "p_down": out["down"].ravel(),
            "bought_before": (u >= 0).ravel(),  # a line in the category before the cutoff
            "usual_tier": pd.Categorical.from_codes(u.ravel().astype(np.int32),
                                                    categories=pd.Index(list(TIERS), dtype="str")),
        }, copy=False)
        return gt

    def _offers_frame(self) -> dict[str, np.ndarray]:
        """Every offer sent so far with its daily response hazard (the shop's own, then external ones)."""
        keys = ("customer", "category", "tier", "type", "day")
        if not self.offers:
            out = {k: np.empty(0, np.int32) for k in keys}
        else:
            out = {k: np.concatenate([o[k] for o in self.offers]) for k in keys}
        out["hazard"] = self.resp_hazard[out["type"]]
        if self.ext_sent:
            out = {k: np.concatenate([out[k], *[o[k] for o in self.ext_sent]]) for k in (*keys, "hazard")}
        return out

    def _oracle_chunk(self, rows: np.ndarray, usual: np.ndarray, off: dict[str, np.ndarray]) -> dict:
        """Forward recursion over the churn chain: W[s] = P(state s on day t, no event yet).

        Buying is dense over (customer, category); higher/lower tier only where a usual tier exists.
        Offer responses are sparse multiplicative corrections of the no-event probability.
        """
        pop, T, H, n_cat = self.pop, self.cutoff_day, self.h, len(CATEGORIES)
        m = len(rows)
        state0 = pop["state"][rows]
        W = np.zeros((N_STATES, m, n_cat), np.float32)
        W[state0, np.arange(m)] = 1.0
        eta = pop["eta"][rows][:, None]
        repeat, adopt, fd = pop["repeat"][rows], pop["adopt"][rows], pop["first_day"][rows]
        lam, up = pop["lam"][rows], pop["up"][rows]
        # Pairs with a usual tier: P(tier > u) = 1 / (1 + e_up · e^{-drift(t) - shift(s)}), alike down.
        r, c = np.nonzero(usual >= 0)
        u = usual[r, c]
        base = pop["theta"][rows][r] + pop["cat_tier"][c]
        with np.errstate(over="ignore"):
            e_up = np.where(u < 2, np.exp(TIER_CUTS[np.minimum(u, 1)] - base), np.inf)
            e_down = np.where(u > 0, np.exp(base - TIER_CUTS[np.maximum(u - 1, 0)]), np.inf)
        e_up, e_down = e_up.astype(np.float32), e_down.astype(np.float32)
        V = np.zeros((N_STATES, 2, len(r)), np.float32)
        V[state0[r], :, np.arange(len(r))] = 1.0
        eta_rc = pop["eta"][rows][r]
        pair = np.full((m, n_cat), -1, np.int64)
        pair[r, c] = np.arange(len(r))
        # Offers of this chunk whose effect reaches into the window.
        pos = np.searchsorted(rows, off["customer"])
        mine = ((pos < m) & (rows[np.minimum(pos, m - 1)] == off["customer"])
                & (off["day"] >= T - OFFER_EFFECT_DAYS))
        o_row, o_cat, o_day = pos[mine], off["category"][mine].astype(np.int64), off["day"][mine]
        o_keep = 1.0 - off["hazard"][mine]
        o_pair = pair[o_row, o_cat]
        o_usual = usual[o_row, o_cat]
        o_tier = off["tier"][mine]
        o_kind = np.stack([(o_pair >= 0) & (o_tier > o_usual), (o_pair >= 0) & (o_tier < o_usual)])
        z1, z2 = DECLINE_EXIT[1], DECLINE_EXIT[2]
        for day in range(T, T + H):
            for X, h in ((W, eta), (V, eta_rc)):
                X[3] += X[2] * z2
                X[2] *= 1 - z2
                X[2] += X[1] * z1
                X[1] *= 1 - z1
                X[1] += X[0] * h
                X[0] *= 1 - h
            p = _category_prob(repeat, adopt, fd, day, self.lag)
            p_rc = p[r, c]
            drift = np.exp(-up[r] * np.float32(day / 365.0))
            live = (o_day < day) & (o_day >= day - OFFER_EFFECT_DAYS)
            for s in range(CHURNED):
                v = lam * (self.season[day] * ACTIVITY_MULT[s])
                W[s] *= 1 - v[:, None] * p
                vp = v[r] * p_rc
                shift = np.float32(np.exp(-TIER_SHIFT[s]))
                V[s, 0] *= 1 - vp / (1 + e_up * (drift * shift))
                V[s, 1] *= 1 - vp / (1 + e_down / (drift * shift))
                np.multiply.at(W[s], (o_row[live], o_cat[live]), o_keep[live])
                for k in range(2):
                    sel = live & o_kind[k]
                    np.multiply.at(V[s, k], o_pair[sel], o_keep[sel])
        buy = np.clip(1.0 - W.sum(axis=0), 0.0, 1.0)
        up_down = np.full((2, m, n_cat), np.nan, np.float32)
        up_down[:, r, c] = np.clip(1.0 - V.sum(axis=0), 0.0, 1.0)
        return {"buy": buy, "up": up_down[0], "down": up_down[1]}

    # --- tables
    def _id_width(self) -> int:
        return max(7, len(str(self.n)))

    def tables(self) -> dict[str, pd.DataFrame]:
        pop, cat, cons, rng = self.pop, self.cat, self.cons, self.rng
        start = np.datetime64(self.start, "us")
        day_us = np.int64(86_400_000_000)
        cust_ids = _ids("C", np.arange(self.n), self._id_width())
        n_prod = int(cat["n"])
        prod_ids = [f"P{i:05d}" for i in range(n_prod)]

        region = rng.integers(0, len(REGIONS), self.n)
        region = np.where(rng.random(self.n) < 0.03, -1, region)
        birth = pd.array(rng.integers(1940, 2007, self.n), dtype="Int64")
        birth[rng.random(self.n) < 0.05] = pd.NA
        email = pc.binary_join_element_wise(pc.utf8_lower(cust_ids), "@example.com", "")
        email = pc.if_else(pa.array(rng.random(self.n) < 0.08), pa.scalar(None, pa.string()), email)
        customers = pd.DataFrame({
            "customer_id": _str_series(cust_ids),
            "signup_date": start + pop["signup"].astype(np.int64) * day_us,
            "region": _categorical(region, REGIONS),
            "birth_year": birth,
            "email": _str_series(email),
        })
        products = pd.DataFrame({
            "product_id": pd.array(prod_ids, dtype="string"),
            "category": _categorical(cat["category"], CATEGORIES),
            "price": cat["price"], "unit_cost": cat["unit_cost"], "active": cat["active"],
        })

        o_cust, o_day, o_sec, o_chan = (np.concatenate([o[k] for o in self.orders]) if self.orders
                                        else np.empty(0, np.int32) for k in range(4))
        order_ids = _ids("O", np.arange(len(o_cust)), max(9, len(str(len(o_cust)))))
        orders = pd.DataFrame({
            "order_id": _str_series(order_ids),
            "customer_id": _str_series(pc.take(cust_ids, pa.array(o_cust))),
            "order_ts": start + o_day.astype(np.int64) * day_us + o_sec.astype(np.int64) * 1_000_000,
            "channel": _categorical(o_chan, CHANNELS_ORDER),
        }, copy=False)
        l_order, l_prod, l_qty, l_cents = (np.concatenate([ln[k] for ln in self.lines]) if self.lines
                                           else np.empty(0, np.int32) for k in range(4))
        self.orders, self.lines = [], []  # concatenated above: free the per-day pieces
        order_lines = pd.DataFrame({
            "order_id": _str_series(pc.take(order_ids, pa.array(l_order))),
            "product_id": _categorical(l_prod, prod_ids),
            "quantity": l_qty.astype(np.int16),
            "unit_price": l_cents / 100.0,
        }, copy=False)
        c_order = np.lexsort((cons["channel"], cons["day"], cons["customer"]))
        consents = pd.DataFrame({
            "customer_id": _str_series(pc.take(cust_ids, pa.array(cons["customer"][c_order]))),
            "channel": _categorical(cons["channel"][c_order], CONTACT_CHANNELS),
            "granted": cons["granted"][c_order],
            "updated_at": start + cons["day"][c_order].astype(np.int64) * day_us
            + cons["sec"][c_order].astype(np.int64) * 1_000_000,
        })
        if self.offers:
            off = {k: np.concatenate([o[k] for o in self.offers]) for k in self.offers[0]}
        else:
            off = {k: np.empty(0, np.int32) for k in ("customer", "product", "type", "channel", "day", "sec")}
        if self.ext_sent:  # after the shop's own campaigns: their offer ids stay the same
            off = {k: np.concatenate([off[k], *[o[k] for o in self.ext_sent]])
                   for k in ("customer", "product", "type", "channel", "day", "sec")}
        offer_history = pd.DataFrame({
            "offer_id": _str_series(_ids("F", np.arange(len(off["customer"])), 9)),
            "customer_id": _str_series(pc.take(cust_ids, pa.array(off["customer"]))),
            "offer_type": _categorical(off["type"], OFFER_TYPES),
            "product_id": _categorical(off["product"], prod_ids),
            "channel": _categorical(off["channel"], CONTACT_CHANNELS),
            "sent_at": start + off["day"].astype(np.int64) * day_us + off["sec"].astype(np.int64) * 1_000_000,
        })
        return {"customers": customers, "products": products, "orders": orders, "order_lines": order_lines,
                "consents": consents, "offer_history": offer_history}

    def latent(self) -> pd.DataFrame:
        pop = self.pop
        return pd.DataFrame({"customer_id": _str_series(_ids("C", np.arange(self.n), self._id_width())),
                             "price_sensitivity": pop["sens"], "activity": pop["lam"], "trade_up": pop["up"],
                             "churn_hazard": pop["eta"], "final_state": pop["state"],
                             "signup_day": pop["signup"], "decline_day": pop["decline_day"],
                             "churn_day": pop["churn_day"]})

    def product_tier(self) -> pd.Series:
        ids = pd.Index([f"P{i:05d}" for i in range(int(self.cat["n"]))], dtype="string", name="product_id")
        return pd.Series(pd.Categorical.from_codes(self.cat["tier"].astype(np.int32), categories=list(TIERS)),
                         index=ids, name="tier")


def run_simulation(customers: int, days: int = 365, seed: int = 7, start: dt.date = dt.date(2025, 1, 1),
                   horizon_days: int = 28, *, external_offers: pd.DataFrame | None = None,
                   external_uplift: dict[str, float] | None = None,
                   shift: BehaviourShift | None = None) -> Simulation:
    """The shop plus its hidden per-customer state (tests check behaviour against the latent truth).

    ``external_offers`` (e.g. a CRM batch: customer_id, product_id, offer_type, channel, valid_from and
    optionally is_control) are sent on their ``valid_from`` day to the non-control customers, recorded
    in ``offer_history`` and answered like the shop's own offers, with ``external_uplift`` per type
    (default ``TRUE_UPLIFT``; 0 for no effect). They draw from a separate random stream, so everything
    before their first day is identical to a run without them (and with zero uplift, everything but
    ``offer_history``). ``external_truth`` then holds, per (customer, offer type), the exact conversion
    probability in the outcome window without and with exposure. ``shift`` changes prices and tastes
    from its ``start`` on (the ground truth does not anticipate a shift that starts after the cutoff).
    """
    if isinstance(start, dt.datetime):
        start = start.date()
    t0 = time.perf_counter()
    shop = _Shop(customers, days, seed, start, horizon_days, external_offers, external_uplift, shift)
    with step(f"simulate: {customers:,} customers × {days} days"):
        shop.run()
    with step("simulate: build tables"):
        tables = shop.tables()
    assert shop.ground_truth is not None
    truth = pd.concat(shop.ext_truth, ignore_index=True) if shop.ext_truth else None
    return Simulation(tables, shop.ground_truth, shop.latent(), shop.product_tier(),
                      start + dt.timedelta(days=shop.cutoff_day), time.perf_counter() - t0, truth)


def simulate_shop(customers: int, days: int = 365, seed: int = 7, start: dt.date = dt.date(2025, 1, 1),
                  horizon_days: int = 28) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """-> (contract tables: customers, products, orders, order_lines, consents, offer_history; ground truth).

    The ground truth holds the exact purchase probabilities per (customer, category) for the window
    [start + days − horizon_days, start + days), the oracle a trained model is compared with.
    """
    sim = run_simulation(customers, days, seed, start, horizon_days)
    return sim.tables, sim.ground_truth


def simulate_to(out: str | Path, customers: int, days: int = 365, seed: int = 7,
                start: dt.date = dt.date(2025, 1, 1), horizon_days: int = 28, *,
                external_offers: pd.DataFrame | None = None, external_uplift: dict[str, float] | None = None,
                shift: BehaviourShift | None = None) -> str:
    """Write ``<out>/<table>.parquet`` and ``<out>/ground_truth.parquet`` (``external_truth.parquet`` with
    external offers); return a readable summary. Options as in ``run_simulation``."""
    t0 = time.perf_counter()
    sim = run_simulation(customers, days, seed, start, horizon_days, external_offers=external_offers,
                         external_uplift=external_uplift, shift=shift)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {} if sim.external_truth is None else {"external_truth": sim.external_truth}
    with step("simulate: write parquet"):
        for name, df in {**sim.tables, "ground_truth": sim.ground_truth, **extra}.items():
            df.to_parquet(out / f"{name}.parquet", index=False)
    seconds = time.perf_counter() - t0
    t = sim.tables
    counts = ", ".join(f"{name} {len(df):,}" for name, df in t.items())
    first, last = t["orders"]["order_ts"].min(), t["orders"]["order_ts"].max()
    uplift = ", ".join(f"{k} {v:.2f}" for k, v in TRUE_UPLIFT.items())
    summary = (f"Simulated shop (seed {seed}) written to {out}: {counts} rows; orders from {first} to {last} "
               f"(shop covers {start} to {start + dt.timedelta(days=days - 1)}). Ground truth: "
               f"{len(sim.ground_truth):,} (customer, category) rows at cutoff {sim.cutoff}, horizon "
               f"{horizon_days} days, mean p_buy {float(sim.ground_truth['p_buy'].mean()):.4f}. True offer "
               f"uplift (P(response within {OFFER_EFFECT_DAYS} days)): {uplift}. Took {seconds:.1f} s, "
               f"peak RSS {peak_rss_mb():.0f} MB.")
    log.info(summary)
    return summary
