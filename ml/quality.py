"""The data-quality gate (DESIGN §7): GE suites per table plus the cross-table checks GE cannot do.

What runs, in order, on a raw data source:

1. the contract (``ml.contract.coerce_table``): missing tables, missing columns and values that
   cannot be read as the column's logical type. These become failures, never crashes, and a broken
   column is set aside so the rest of the table is still checked;
2. the cut at ``as_of``: rows at or after it are ignored, never an error;
3. one Great Expectations suite per table from ``expectations/<table>.json`` (schema, types,
   nulls, uniqueness, ranges, allowed values, unit_cost <= price), on the coerced frames;
4. in code, vectorised: referential integrity (``isin``) and timestamps after the wall clock.

Every failure carries a stable check name (the ``meta.check`` of the expectation, or the name of
the code check) so DAGs, the CLI and tests can rely on it. Values of personal-data columns never
appear in a report: their examples read ``<personal data>``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml import config  # noqa: F401  (quiets GE/MLflow through the environment before they load)
from ml.contract import (
    PERSONAL_COLUMNS,
    TABLES,
    ContractError,
    Shop,
    coerce_table,
    cut_at,
    empty_table,
    read_raw,
)
from ml.progress import step

PERSONAL = "<personal data>"
MAX_EXAMPLES = 5

# (child table, column, parent table, parent column, check name)
REFERENCES: tuple[tuple[str, str, str, str, str], ...] = (
    ("orders", "customer_id", "customers", "customer_id", "orphan: unknown customer"),
    ("order_lines", "order_id", "orders", "order_id", "orphan: unknown order"),
    ("order_lines", "product_id", "products", "product_id", "orphan: unknown product"),
    ("consents", "customer_id", "customers", "customer_id", "orphan: unknown customer"),
    ("offer_history", "customer_id", "customers", "customer_id", "orphan: unknown customer"),
    ("offer_history", "product_id", "products", "product_id", "orphan: unknown product"),
)

# Check names for expectations whose suite entry has no ``meta.check`` (suites written elsewhere).
_CHECK_BY_TYPE = {
    "expect_column_to_exist": "missing column",
    "expect_table_columns_to_match_set": "missing column",
    "expect_table_columns_to_match_ordered_list": "schema mismatch",
    "expect_column_values_to_be_of_type": "wrong type",
    "expect_column_values_to_be_in_type_list": "wrong type",
    "expect_column_values_to_not_be_null": "null value",
    "expect_column_values_to_be_unique": "duplicate value",
    "expect_compound_columns_to_be_unique": "duplicate key",
    "expect_select_column_values_to_be_unique_within_record": "duplicate key",
    "expect_column_values_to_be_between": "out of range",
    "expect_column_values_to_be_in_set": "unknown value",
    "expect_column_values_to_match_regex": "bad format",
    "expect_column_pair_values_a_to_be_greater_than_b": "pair out of order",
}


def expectations_dir() -> Path:
    """Suites live next to the code in the repo; ``OFFERFLOW_EXPECTATIONS`` points elsewhere."""
    env = os.environ.get("OFFERFLOW_EXPECTATIONS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "expectations"


# ---------------------------------------------------------------------------- report

@dataclass
class Failure:
    """One failed check; ``examples`` are JSON-able and never personal data."""

    table: str
    check: str
    column: str | None = None
    count: int | None = None
    examples: list = field(default_factory=list)
    detail: str = ""

    def line(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        text = f"{where}: {self.check}"
        if self.count is not None:
            text += f": {self.count} row{'' if self.count == 1 else 's'}"
            if self.examples:
                text += f", e.g. {self.examples}"
            if self.detail:
                text += f" ({self.detail})"
        elif self.detail:
            text += f": {self.detail}"
        return text


@dataclass
class QualityReport:
    success: bool
    failures: list[Failure]
    tables: dict[str, int]  # rows per table checked (after the as_of cut)
    as_of: str | None = None
    now: str | None = None

    def summary(self) -> str:
        """What a data engineer reads in the task log or the terminal: one line per failing check."""
        rows = ", ".join(f"{name} {n:,}" for name, n in self.tables.items())
        cut = f" (as of {self.as_of})" if self.as_of else ""
        if self.success:
            return f"data quality PASSED{cut}: {rows} rows"
        head = (f"data quality FAILED{cut}: {len(self.failures)} failed check(s); "
                f"rows checked: {rows or 'none'}")
        return "\n".join([head, *(f"  - {f.line()}" for f in self.failures)])

    def to_dict(self) -> dict:
        """JSON-able (XCom, MLflow). Examples were scrubbed of personal data when the failure was made."""
        return {"success": self.success, "tables": dict(self.tables), "as_of": self.as_of, "now": self.now,
                "failures": [asdict(f) for f in self.failures]}


class DataQualityError(Exception):
    """Raised by ``require_valid``: nothing downstream may run on this data."""

    def __init__(self, report: QualityReport):
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self):  # keep the report when pickled (multiprocessing, Airflow)
        return (self.__class__, (self.report,))


# ---------------------------------------------------------------------------- helpers

def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, pd.Timestamp | dt.datetime | dt.date | np.datetime64):
        ts = pd.Timestamp(value)
        return None if pd.isna(ts) else ts.isoformat()
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _examples(values: list, columns: set[str] | str | None) -> list:
    """Distinct JSON-able examples, or the personal-data marker when a column is personal."""
    cols = {columns} if isinstance(columns, str) else set(columns or ())
    if cols & PERSONAL_COLUMNS:
        return [PERSONAL] if values else []
    out: list = []
    for v in values:
        v = _jsonable(v)
        if v not in out:
            out.append(v)
        if len(out) == MAX_EXAMPLES:
            break
    return out


def _utc_naive(value: Any) -> pd.Timestamp | None:
    """Timestamps in the contract are naive UTC; accept tz-aware, naive, dates and ISO strings."""
    if value is None:
        return None
    ts = pd.Timestamp(value)
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


def _iso(ts: pd.Timestamp) -> str:
    return ts.date().isoformat() if ts == ts.normalize() else ts.isoformat()


def _contract_failure(exc: ContractError) -> Failure:
    prefix = f"{exc.table}.{exc.column}" if exc.column else exc.table
    detail = str(exc).removeprefix(f"{prefix}: {exc.check}: ")
    personal = exc.column in PERSONAL_COLUMNS
    if personal:
        for v in exc.examples:
            detail = detail.replace(str(v), PERSONAL)
    return Failure(exc.table, exc.check, exc.column, exc.count,
                   _examples(exc.examples, exc.column), detail)


# ---------------------------------------------------------------------------- GE suites

def load_suite(name: str) -> dict:
    """The suite as JSON data: suites are edited as files and read at execute time, never cached."""
    path = expectations_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no expectation suite {path}")
    return json.loads(path.read_text())


def _raised(result: Any) -> str | None:
    """GE reports exceptions either flat or keyed by metric id; return the first message, if any."""
    info = result.exception_info or {}
    candidates = [info] + [v for v in info.values() if isinstance(v, dict)]
    for c in candidates:
        if c.get("raised_exception"):
            return str(c.get("exception_message") or "exception")[:200]
    return None


def _suite_failures(name: str, df: pd.DataFrame) -> list[tuple[Failure, set[str]]]:
    """Run one suite once; each failure comes with the columns it involves (to drop broken ones)."""
    import great_expectations as gx
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine

    # GE fingerprints every batch under 1 GB with hash_pandas_object, for metadata we do not use:
    # 60 % of a suite's time on 1.4M orders. A threshold of 0 switches the fingerprint off.
    pandas_execution_engine.HASH_THRESHOLD = 0
    # GE's range check is vectorised only for numpy dtypes and maps a Python function over every
    # row of a nullable Int64 column (15 s for 3.4M lines): give it numpy ints where there is no NA.
    exact = {c: t.numpy_dtype for c, t in df.dtypes.items()
             if isinstance(t, pd.api.extensions.ExtensionDtype) and pd.api.types.is_integer_dtype(t)
             and not df[c].hasnans}
    if exact:
        df = df.astype(exact)
    spec = load_suite(name)
    context = gx.get_context(mode="ephemeral")  # 6 ms; a fresh one keeps no state between runs
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = context.suites.add(ExpectationSuite(**{**spec, "name": name}))
    order = {e.id: i for i, e in enumerate(suite.expectations)}
    batch = (context.data_sources.add_pandas(name=f"{name}_source").add_dataframe_asset(name=name)
             .add_batch_definition_whole_dataframe("whole"))
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_gate", data=batch, suite=suite))
    res = vd.run(batch_parameters={"dataframe": df},
                 result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})

    out: list[tuple[int, Failure, set[str]]] = []
    for r in res.results:
        if r.success:
            continue
        cfg, rr = r.expectation_config, dict(r.result or {})
        kw, meta = cfg.kwargs, dict(cfg.meta or {})
        involved = {c for c in (kw.get("column"), kw.get("column_A"), kw.get("column_B")) if c}
        involved |= set(kw.get("column_list") or ()) | set(kw.get("column_set") or ())
        column = meta.get("column") or kw.get("column") or kw.get("column_B") or (
            "+".join(kw["column_list"]) if kw.get("column_list") else None)
        check = meta.get("check") or _CHECK_BY_TYPE.get(cfg.type, cfg.type)
        error = _raised(r)
        mismatched = (rr.get("details") or {}).get("mismatched") or {}
        if error is None and mismatched.get("missing"):
            rank = order.get(cfg.id, len(order))
            expected = f"expected columns {list(kw['column_set'])}"
            out += [(rank, Failure(name, check, c, None, [], expected), {c}) for c in mismatched["missing"]]
            continue
        if error is not None:
            missing = sorted(involved - set(df.columns))
            f = (Failure(name, "missing column", missing[0], None, [], f"needed by {cfg.type}") if missing
                 else Failure(name, "expectation error", column, None, [], f"{cfg.type}: {error}"))
        elif "unexpected_count" in rr:
            if cfg.type == "expect_column_values_to_not_be_null":
                examples = [f"row {i}" for i in rr.get("partial_unexpected_index_list") or []][:MAX_EXAMPLES]
            elif meta.get("personal") or check == "personal data":  # e.g. an email found in an id
                examples = [PERSONAL]
            else:
                examples = _examples(rr.get("partial_unexpected_list") or [], involved)
            f = Failure(name, check, column, int(rr["unexpected_count"]), examples, "")
        elif cfg.type == "expect_table_row_count_to_be_between":
            n = int(rr.get("observed_value") or 0)
            if "check" not in meta and n > 0:
                check = "row count out of range"
            f = Failure(name, check, None, n, [], "" if n == 0 else
                        f"expected between {kw.get('min_value')} and {kw.get('max_value')}")
        else:
            observed = rr.get("observed_value")
            f = Failure(name, check, column, None, [],
                        "" if observed is None else f"observed {_jsonable(observed)!r}")
        out.append((order.get(cfg.id, len(order)), f, involved))
    return [(f, cols) for _, f, cols in sorted(out, key=lambda t: t[0])]


def run_suite(name: str, df: pd.DataFrame) -> list[Failure]:
    """Run ``expectations/<name>.json`` on ``df`` once; the failures, in suite order (empty = passed)."""
    return [f for f, _ in _suite_failures(name, df)]


# ---------------------------------------------------------------------------- the gate

def _coerce(name: str, df: pd.DataFrame) -> tuple[pd.DataFrame | None, list[Failure], set[str]]:
    """Coerce one table; a column that breaks the contract is reported, replaced by nulls and
    excluded from later checks, so one bad column does not hide the others' problems."""
    spec = TABLES[name]
    failures: list[Failure] = []
    broken: set[str] = set()
    missing = [c for c in spec.column_names if c not in df.columns]
    for c in missing:
        failures.append(Failure(name, "missing column", c, None, [], f"expected columns {spec.column_names}"))
    broken.update(missing)
    placeholder = pd.Series(None, index=df.index, dtype=object)
    if missing:
        df = df.assign(**dict.fromkeys(missing, placeholder))
    for _ in range(len(spec.columns) + 1):
        try:
            return coerce_table(name, df), failures, broken
        except ContractError as exc:
            failures.append(_contract_failure(exc))
            if exc.column is None or exc.column in broken or exc.column not in df.columns:
                return None, failures, broken
            broken.add(exc.column)
            df = df.assign(**{exc.column: placeholder})
    return None, failures, broken


def _cut(coerced: dict[str, pd.DataFrame], broken: dict[str, set[str]],
         as_of: pd.Timestamp | None) -> dict[str, pd.DataFrame]:
    """``cut_at`` on the tables whose time (and join) columns could be read; the others stay whole."""
    if as_of is None:
        return dict(coerced)
    cuttable = {n: df for n, df in coerced.items() if TABLES[n].time_column not in broken[n]}
    if "order_lines" in cuttable and ("orders" not in cuttable or "order_id" in broken["orders"]
                                      or "order_id" in broken["order_lines"]):
        del cuttable["order_lines"]
    return {**coerced, **cut_at(Shop(cuttable), as_of).tables}


def _future(tables: dict[str, pd.DataFrame], broken: dict[str, set[str]], now: pd.Timestamp) -> list[Failure]:
    out = []
    for name, df in tables.items():
        col = TABLES[name].time_column
        if col is None or col in broken[name]:
            continue
        mask = (df[col] > now).to_numpy()
        n = int(mask.sum())
        if n:
            out.append(Failure(name, "in the future", col, n,
                               _examples(df[col].to_numpy()[mask][:MAX_EXAMPLES].tolist(), col),
                               f"after the wall clock {now.isoformat(timespec='seconds')} UTC"))
    return out


def _isin(values: pd.Series, reference: pd.Series) -> np.ndarray:
    """``values.isin(reference)`` through Arrow's hash kernel: pandas' isin on Arrow-backed strings
    (the contract's ``string`` dtype) takes 16 s CPU for 3.4M lines, this about 0.8 s."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = pa.array(reference.dropna(), from_pandas=True)
    hit = pc.is_in(pa.array(values, from_pandas=True), value_set=keys)
    return hit.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _referential(whole: dict[str, pd.DataFrame], cut: dict[str, pd.DataFrame],
                 broken: dict[str, set[str]]) -> list[Failure]:
    """Children (after the cut) whose key is not among the parents (before the cut: the cut never
    makes an orphan). Order lines are checked whole against orders: a line of no order has no time."""
    out = []
    for child, col, parent, pcol, check in REFERENCES:
        if child not in cut or parent not in whole or col in broken[child] or pcol in broken[parent]:
            continue
        values = (whole if (child, col) == ("order_lines", "order_id") else cut)[child][col]
        mask = values.notna().to_numpy() & ~_isin(values, whole[parent][pcol])
        n = int(mask.sum())
        if n:
            out.append(Failure(child, check, col, n,
                               _examples(pd.unique(values.to_numpy()[mask])[:MAX_EXAMPLES].tolist(), col),
                               f"not in {parent}.{pcol}"))
    return out


def _check(raw: dict[str, pd.DataFrame], now: Any = None, as_of: Any = None,
           consume: bool = False) -> tuple[QualityReport, Shop]:
    """The gate. ``consume`` pops each raw table once coerced (the caller's dict), to halve peak memory."""
    now_ts = _utc_naive(now) if now is not None else pd.Timestamp.now(tz="UTC").tz_localize(None)
    as_of_ts = _utc_naive(as_of)
    failures: list[Failure] = []
    coerced: dict[str, pd.DataFrame] = {}
    broken: dict[str, set[str]] = {}
    for name, spec in TABLES.items():
        if name not in raw:
            if not spec.optional:
                failures.append(Failure(name, "missing table", None, None, [],
                                        "required table not found in the source"))
            continue
        df, fails, broken[name] = _coerce(name, raw.pop(name) if consume else raw[name])
        failures += fails
        if df is not None:
            coerced[name] = df
    cut = _cut(coerced, broken, as_of_ts)
    for name, df in cut.items():
        failures += [f for f, cols in _suite_failures(name, df) if not cols & broken[name]]
    failures += _referential(coerced, cut, broken)
    failures += _future(cut, broken, now_ts)

    order = {n: i for i, n in enumerate(TABLES)}
    failures.sort(key=lambda f: order.get(f.table, -1))  # stable: keeps the per-table check order
    report = QualityReport(success=not failures, failures=failures,
                           tables={n: len(df) for n, df in cut.items()},
                           as_of=None if as_of_ts is None else _iso(as_of_ts),
                           now=now_ts.isoformat(timespec="seconds"))
    return report, Shop(cut)


def validate_tables(raw: dict[str, pd.DataFrame], now: pd.Timestamp | None = None,
                    as_of: pd.Timestamp | None = None) -> QualityReport:
    """Check raw contract tables (as stored: any equivalent encoding); never raises on bad data."""
    return _check(raw, now=now, as_of=as_of)[0]


def _read(source: str | Path) -> tuple[dict[str, pd.DataFrame], list[Failure]]:
    """Read what is there; missing tables are left for the gate to report, all of them at once."""
    try:
        return read_raw(source), []
    except ContractError as exc:
        if exc.check != "missing table":
            return {}, [_contract_failure(exc)]
    raw: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        try:
            raw.update(read_raw(source, [name]))
        except ContractError as exc:
            if exc.check != "missing table":
                raise
    return raw, []


def validate_and_load(source: str | Path, as_of: Any = None, now: Any = None) -> tuple[QualityReport, Shop]:
    """The report and the coerced Shop cut at ``as_of``, from one read (for steps that log the report).

    The Shop is only fit for use when ``report.success``; ``require_valid`` enforces that.
    """
    with step(f"data-quality gate on {source}") as info:
        raw, pre = _read(source)
        if pre:  # no source at all: nothing else to say
            report = QualityReport(False, pre, {}, now=None if now is None else _iso(_utc_naive(now)))
            shop = Shop({})
        else:
            report, shop = _check(raw, now=now, as_of=as_of, consume=True)
        info["detail"] = "passed" if report.success else f"{len(report.failures)} failed check(s)"
    if report.success and "offer_history" not in shop:
        shop.tables["offer_history"] = empty_table("offer_history")
    return report, shop




def validate_source(source: str | Path, as_of: Any = None, now: Any = None) -> QualityReport:
    """Read a source (Parquet folder or SQLAlchemy URL) and check it; the CLI prints the summary."""
    return validate_and_load(source, as_of, now)[0]


def require_valid(source: str | Path, as_of: Any = None, now: Any = None) -> Shop:
    """Validate, then return the coerced Shop cut at as_of; raise DataQualityError when it fails.

    Training and scoring call this instead of ``load_source`` so bad input stops them, and the data
    is read and coerced only once.
    """
    report, shop = validate_and_load(source, as_of, now)
    if not report.success:
        raise DataQualityError(report)
    return shop
