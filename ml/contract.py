"""The input data contract (DESIGN §2) as code: table specs, loading and coercion.

Types are *logical*: producers send equivalent encodings (nullable ints as float with NaN,
dates as midnight timestamps, tz-aware or naive UTC timestamps, object or string dtype), and
``coerce_table`` accepts all of them and returns one canonical physical layout. What cannot be
coerced safely raises ``ContractError`` naming the table, the column and the check, which the
quality gate turns into a readable failure.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Logical types and the canonical pandas dtype each one is coerced to.
CANONICAL_DTYPES: dict[str, str] = {
    "str": "string",  # pandas StringDtype: missing values are <NA>
    "date": "datetime64[us]",  # midnight, naive (UTC by contract)
    "timestamp": "datetime64[us]",  # naive UTC
    "int": "Int64",
    "float": "float64",
    "bool": "boolean",
}

CHANNELS_ORDER = ("web", "app", "store", "phone")
CONTACT_CHANNELS = ("email", "sms", "push")
OFFER_TYPES = ("cross_sell", "upsell", "downsell")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of CANONICAL_DTYPES
    nullable: bool = False
    personal: bool = False  # personal data: never a feature, never logged, never in the CRM


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    optional: bool = False
    time_column: str | None = None  # rows at or after --as-of are ignored
    description: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "customers",
            (
                Column("customer_id", "str"),
                Column("signup_date", "date"),
                Column("region", "str", nullable=True),
                Column("birth_year", "int", nullable=True, personal=True),
                Column("email", "str", nullable=True, personal=True),
            ),
            key=("customer_id",),
            time_column="signup_date",
            description="one row per customer",
        ),
        Table(
            "products",
            (
                Column("product_id", "str"),
                Column("category", "str"),
                Column("price", "float"),
                Column("unit_cost", "float", nullable=True),
                Column("active", "bool"),
            ),
            key=("product_id",),
            description="the catalogue, list prices",
        ),
        Table(
            "orders",
            (
                Column("order_id", "str"),
                Column("customer_id", "str"),
                Column("order_ts", "timestamp"),
                Column("channel", "str"),
            ),
            key=("order_id",),
            time_column="order_ts",
            description="one row per basket",
        ),
        Table(
            "order_lines",
            (
                Column("order_id", "str"),
                Column("product_id", "str"),
                Column("quantity", "int"),
                Column("unit_price", "float"),
            ),
            description="products in each order, at the price paid",
        ),
        Table(
            "consents",
            (
                Column("customer_id", "str"),
                Column("channel", "str"),
                Column("granted", "bool"),
                Column("updated_at", "timestamp"),
            ),
            time_column="updated_at",
            description="latest row per (customer, channel) wins; no row = no consent",
        ),
        Table(
            "offer_history",
            (
                Column("offer_id", "str"),
                Column("customer_id", "str"),
                Column("offer_type", "str"),
                Column("product_id", "str"),
                Column("channel", "str"),
                Column("sent_at", "timestamp"),
            ),
            key=("offer_id",),
            optional=True,
            time_column="sent_at",
            description="offers the CRM actually sent",
        ),
    )
}

PERSONAL_COLUMNS: frozenset[str] = frozenset(
    c.name for t in TABLES.values() for c in t.columns if c.personal
)


class ContractError(ValueError):
    """Input that does not fit the contract. Carries what a summary needs."""

    def __init__(self, table: str, check: str, message: str, column: str | None = None,
                 examples: Iterable[object] = (), count: int | None = None):
        self.table, self.check, self.column = table, check, column
        self.examples, self.count = list(examples)[:5], count
        where = f"{table}.{column}" if column else table
        super().__init__(f"{where}: {check}: {message}")


@dataclass
class Shop:
    """The contract tables of one data source, typed. ``offer_history`` may be empty."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    @property
    def customers(self) -> pd.DataFrame:
        return self.tables["customers"]

    @property
    def products(self) -> pd.DataFrame:
        return self.tables["products"]

    @property
    def orders(self) -> pd.DataFrame:
        return self.tables["orders"]

    @property
    def order_lines(self) -> pd.DataFrame:
        return self.tables["order_lines"]

    @property
    def consents(self) -> pd.DataFrame:
        return self.tables["consents"]

    @property
    def offer_history(self) -> pd.DataFrame:
        return self.tables.get("offer_history", empty_table("offer_history"))

    def fingerprint(self) -> str:
        """A content hash of all tables: the same data gives the same id (batch ids, MLflow params)."""
        h = hashlib.sha256()
        for name in sorted(self.tables):
            df = self.tables[name]
            h.update(name.encode())
            h.update(",".join(map(str, df.columns)).encode())
            h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
        return h.hexdigest()[:16]


def empty_table(name: str) -> pd.DataFrame:
    spec = TABLES[name]
    return pd.DataFrame({c.name: pd.Series(dtype=CANONICAL_DTYPES[c.type]) for c in spec.columns})


def as_date(value: object) -> dt.date:
    """A cutoff / as-of date from a date, a datetime, a Timestamp or an ISO string (YYYY-MM-DD...)."""
    if isinstance(value, dt.datetime):  # before date: a datetime is a date subclass
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}") from None


# ---------------------------------------------------------------------------- coercion

def _examples(values: pd.Series, mask: np.ndarray | pd.Series) -> list[object]:
    return values[np.asarray(mask, dtype=bool)].head(5).tolist()


def _to_timestamp(s: pd.Series, table: str, col: str) -> pd.Series:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return s.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[us]")
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.astype("datetime64[us]")
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        # Python date/datetime objects or ISO strings: parse, then normalise to naive UTC.
        try:
            out = pd.to_datetime(s, utc=True, errors="raise", format="mixed")
        except (ValueError, TypeError) as exc:
            bad = pd.to_datetime(s, utc=True, errors="coerce", format="mixed").isna() & s.notna()
            raise ContractError(table, "wrong type", f"expected a timestamp, got {s.dtype} ({exc})",
                                col, _examples(s, bad), int(bad.sum())) from None
        return out.dt.tz_localize(None).astype("datetime64[us]")
    raise ContractError(table, "wrong type", f"expected a timestamp, got {s.dtype}", col,
                        s.head(5).tolist())


def _to_int(s: pd.Series, table: str, col: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype):
        raise ContractError(table, "wrong type", "expected an integer, got bool", col, s.head(5).tolist())
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("Int64")
    if pd.api.types.is_float_dtype(s.dtype):
        frac = s.notna() & (s != np.floor(s))
        if frac.any():
            raise ContractError(table, "wrong type", "expected integers, found fractional values", col,
                                _examples(s, frac), int(frac.sum()))
        return s.astype("Int64")
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna()
    if bad.any() or (num.notna() & (num != np.floor(num))).any():
        raise ContractError(table, "wrong type", f"expected integers, got {s.dtype}", col,
                            _examples(s, bad), int(bad.sum()))
    return num.astype("Int64")


def _to_float(s: pd.Series, table: str, col: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype):
        raise ContractError(table, "wrong type", "expected a number, got bool", col, s.head(5).tolist())
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.astype("float64")
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna()
    if bad.any():
        raise ContractError(table, "wrong type", f"expected numbers, got {s.dtype}", col,
                            _examples(s, bad), int(bad.sum()))
    return num.astype("float64")


_BOOL_TEXT = {"true": True, "false": False, "t": True, "f": False, "1": True, "0": False}


def _to_bool(s: pd.Series, table: str, col: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("boolean")
    if pd.api.types.is_numeric_dtype(s.dtype):
        bad = s.notna() & ~s.isin([0, 1])
        if bad.any():
            raise ContractError(table, "wrong type", "expected booleans (0/1), got other numbers", col,
                                _examples(s, bad), int(bad.sum()))
        return s.astype("boolean")
    mapped = s.map(lambda v: v if isinstance(v, bool) or v is None or v is pd.NA
                   else _BOOL_TEXT.get(str(v).strip().lower()))
    bad = mapped.isna() & s.notna()
    if bad.any():
        raise ContractError(table, "wrong type", f"expected booleans, got {s.dtype}", col,
                            _examples(s, bad), int(bad.sum()))
    return mapped.astype("boolean")


def _to_str(s: pd.Series, table: str, col: str) -> pd.Series:
    not_text = pd.api.types.is_float_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype) \
        or pd.api.types.is_datetime64_any_dtype(s.dtype)
    # Ids are strings; a float id (1.0) or a date is a producer error, not an encoding.
    if not_text and not s.isna().all():
        raise ContractError(table, "wrong type", f"expected text, got {s.dtype}", col, s.head(5).tolist())
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("string")
    return s.astype("string")


_COERCERS = {"timestamp": _to_timestamp, "date": _to_timestamp, "int": _to_int, "float": _to_float,
             "bool": _to_bool, "str": _to_str}


def check_columns(name: str, df: pd.DataFrame) -> None:
    """Every contract column present. Extra columns are allowed and dropped by ``coerce_table``."""
    missing = [c for c in TABLES[name].column_names if c not in df.columns]
    if missing:
        raise ContractError(name, "missing column", f"missing column(s) {missing}; "
                            f"expected {TABLES[name].column_names}", missing[0], count=len(missing))


def coerce_table(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the contract's columns, in the canonical dtypes."""
    check_columns(name, df)
    spec = TABLES[name]
    out = {}
    for c in spec.columns:
        s = df[c.name]
        out[c.name] = _COERCERS[c.type](s, name, c.name)
        if c.type == "date":
            out[c.name] = out[c.name].dt.normalize()
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def cut_at(shop: Shop, as_of: pd.Timestamp | None) -> Shop:
    """Drop rows at or after ``as_of`` (DESIGN §2: ignored, never an error); lines follow their orders."""
    if as_of is None:
        return shop
    t = pd.Timestamp(as_of)
    t = t.tz_convert("UTC").tz_localize(None) if t.tzinfo else t
    tables = dict(shop.tables)
    for name, df in shop.tables.items():
        col = TABLES[name].time_column
        if col is not None:
            tables[name] = df[df[col] < t].reset_index(drop=True)
    if "orders" in tables and "order_lines" in tables:
        kept = tables["order_lines"]["order_id"].isin(tables["orders"]["order_id"])
        tables["order_lines"] = tables["order_lines"][kept].reset_index(drop=True)
    return Shop(tables)


# ---------------------------------------------------------------------------- sources

def is_sql_url(source: str | Path) -> bool:
    return "://" in str(source)


def read_raw(source: str | Path, tables: Iterable[str] | None = None) -> dict[str, pd.DataFrame]:
    """Read the contract tables as they are stored, without coercion (the quality gate wants raw)."""
    names = list(tables) if tables is not None else list(TABLES)
    if is_sql_url(source):
        return _read_sql(str(source), names)
    folder = Path(source)
    if not folder.is_dir():
        raise ContractError("<source>", "missing source", f"{folder} is not a folder of Parquet files "
                            "nor a SQLAlchemy URL")
    out: dict[str, pd.DataFrame] = {}
    for name in names:
        path = folder / f"{name}.parquet"
        if not path.exists():
            if TABLES[name].optional:
                continue
            raise ContractError(name, "missing table", f"{path} not found")
        out[name] = pd.read_parquet(path)
    return out


def _read_sql(url: str, names: list[str]) -> dict[str, pd.DataFrame]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        existing = set(sa.inspect(engine).get_table_names())
        out = {}
        with engine.connect() as conn:
            for name in names:
                if name not in existing:
                    if TABLES[name].optional:
                        continue
                    raise ContractError(name, "missing table", f"table {name!r} not found in the database")
                cols = ", ".join(f'"{c}"' for c in TABLES[name].column_names if c)
                # Identifiers come from the contract, not from the user: nothing to inject.
                out[name] = pd.read_sql_query(sa.text(f'SELECT {cols} FROM "{name}"'), conn)  # noqa: S608
        return out
    finally:
        engine.dispose()


def load_source(source: str | Path, as_of: str | pd.Timestamp | None = None,
                tables: Iterable[str] | None = None) -> Shop:
    """Load and coerce a data source (Parquet folder or SQLAlchemy URL); cut at ``as_of`` if given."""
    raw = read_raw(source, tables)
    shop = Shop({name: coerce_table(name, df) for name, df in raw.items()})
    if "offer_history" not in shop.tables and (tables is None or "offer_history" in tables):
        shop.tables["offer_history"] = empty_table("offer_history")
    return cut_at(shop, pd.Timestamp(as_of) if as_of is not None else None)


def write_parquet(tables: Mapping[str, pd.DataFrame], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def write_sql(tables: Mapping[str, pd.DataFrame], url: str, if_exists: str = "replace") -> None:
    """Write contract tables into a database (tests and the PostgreSQL example source)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for name, df in tables.items():
                df.to_sql(name, conn, if_exists=if_exists, index=False, chunksize=50_000)
    finally:
        engine.dispose()


def text_array(values: pd.Series | pd.Index | Iterable[str]) -> pa.Array:
    """Text as one Arrow type, so lookups compare like with like whatever the pandas storage."""
    arr = pa.array(pd.array(values, dtype="string[pyarrow]"))
    return pc.cast(arr, pa.large_string())


def text_positions(values: pd.Series | pd.Index | Iterable[str],
                   keys: pd.Series | pd.Index | Iterable[str]) -> np.ndarray:
    """Position of each value among ``keys`` (-1 when absent or missing; a repeated key: its first row).

    Arrow's hash lookup: several times faster than ``Index.get_indexer`` on text, which matters
    for tens of millions of order lines and for every scoring matrix.
    """
    pos = pc.index_in(text_array(values), value_set=text_array(keys), skip_nulls=True)
    return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
