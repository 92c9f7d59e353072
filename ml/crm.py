"""CRM tables and the atomic publish protocol (DESIGN §6).

Offers are loaded under a deterministic batch id with status ``loading`` (PostgreSQL: COPY,
SQLite: one executemany transaction), possibly in several shards from several workers; then
``publish_batch`` validates what was actually written and, in ONE transaction, marks the previous
batch ``superseded`` and this one ``published``. The CRM reads the view ``crm_current_offers``,
which joins the offers to the single ``published`` batch row, so a reader sees the old batch or
the new one, never a mix or a part, and any failure before the flip leaves the old batch live.

``publish`` (one process, one part) does the same in fewer steps: after ``start_batch`` it loads
the rows and flips in ONE transaction that holds the batch row, and validates the in-memory frame
it is writing in a thread while the rows stream in (the database does the COPY work), so the
rows published are exactly the rows validated without reading them back. Shards loaded with
``load_rows`` are read back and validated by ``publish_batch``.

Status transitions::

    (new) / failed / superseded --start_batch--> loading --publish_batch--> published --> superseded
                                                  loading --(validation or any error)--> failed

A ``superseded`` batch may be started again: its id encodes as-of date, data, champion versions
and policy, so rerunning it (e.g. after rolling a model back) makes those offers current again,
exactly as any newer call would. Only a ``published`` batch is skipped by a rerun.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.schema import CreateView, DropView

from ml.config import POLICY
from ml.progress import log

BATCHES = "crm_offer_batches"
OFFERS = "crm_offers"
VIEW = "crm_current_offers"
STATUSES = ("loading", "published", "superseded", "failed")

OFFER_COLUMNS: list[str] = [
    "customer_id", "rank", "offer_type", "category", "product_id", "channel", "propensity",
    "expected_value", "reason_codes", "segment", "is_control", "valid_from", "valid_until", "model_version",
]
VIEW_COLUMNS: list[str] = ["batch_id"] + [c for c in OFFER_COLUMNS if c != "is_control"]
_TEXT_COLUMNS = ("customer_id", "offer_type", "category", "product_id", "channel", "reason_codes",
                 "segment", "model_version")
_TIME_COLUMNS = ("valid_from", "valid_until")
_NULLABLE = ("reason_codes", "segment")

# Lower-case only: PostgreSQL folds unquoted names, so mixed case would name two different things.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's own SQLite DateTime storage format
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class PublishError(RuntimeError):
    """The batch was not published (it is marked ``failed``); the previous batch is still live."""

    def __init__(self, batch_id: str, message: str, failures: Sequence[Any] = ()):
        self.batch_id, self.message, self.failures = batch_id, message, list(failures)
        super().__init__(f"batch {batch_id} not published: {message}")

    def __reduce__(self):  # picklable with its fields (multiprocessing, Airflow)
        return type(self), (self.batch_id, self.message, self.failures)


@dataclass
class PublishResult:
    batch_id: str
    status: str  # 'published' | 'already published'
    n_offers: int = 0  # all rows, control included
    n_control: int = 0
    superseded: str | None = None  # the batch that was live before
    deleted: list[str] = field(default_factory=list)  # batches removed by retention
    seconds: float = 0.0

    def summary(self) -> str:
        if self.status != "published":
            return f"batch {self.batch_id}: {self.status} ({self.n_offers} offers), nothing to do"
        prev = f", superseded {self.superseded}" if self.superseded else ""
        return (f"batch {self.batch_id}: published {self.n_offers} offers ({self.n_control} control) "
                f"in {self.seconds:.1f} s{prev}; retention removed {len(self.deleted)} batch(es)")


# ---------------------------------------------------------------------------- schema

def check_identifier(name: str) -> str:
    """Reject anything but a plain lower-case SQL identifier (names are never bound parameters)."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a valid SQL identifier: {name!r} (expected {_IDENTIFIER.pattern})")
    return name


@dataclass(frozen=True)
class _Schema:
    metadata: sa.MetaData
    batches: sa.Table
    offers: sa.Table
    view: sa.Table
    create_view: CreateView


@lru_cache(maxsize=16)
def _schema(schema: str | None) -> _Schema:
    if schema is not None:
        check_identifier(schema)
    for name in (BATCHES, OFFERS, VIEW):
        check_identifier(name)
    md = sa.MetaData(schema=schema)
    ts = sa.DateTime(timezone=True)
    batches = sa.Table(
        BATCHES, md,
        sa.Column("batch_id", sa.Text, primary_key=True),
        sa.Column("as_of", sa.Date, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("published_at", ts),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("n_offers", sa.Integer),
        sa.Column("n_control", sa.Integer),
        sa.Column("model_versions", sa.Text),
        sa.Column("run_ids", sa.Text),
        sa.Column("error", sa.Text),
        sa.CheckConstraint(sa.column("status").in_(STATUSES), name=f"{BATCHES}_status_ck"),
    )
    # At most one published batch: a unique partial index on the constant status. Where a dialect
    # has no partial indexes, the single flip transaction in publish_batch is the guarantee.
    sa.Index(f"{BATCHES}_one_published", batches.c.status, unique=True,
             postgresql_where=batches.c.status == "published",
             sqlite_where=batches.c.status == "published").ddl_if(dialect=("postgresql", "sqlite"))
    offers = sa.Table(
        OFFERS, md,
        sa.Column("batch_id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text, primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        *(sa.Column(c, sa.Text, nullable=c in _NULLABLE)
          for c in ("offer_type", "category", "product_id", "channel")),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("expected_value", sa.Float, nullable=False),
        sa.Column("reason_codes", sa.Text),
        sa.Column("segment", sa.Text),
        sa.Column("is_control", sa.Boolean, nullable=False),
        sa.Column("valid_from", ts, nullable=False),
        sa.Column("valid_until", ts, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
    )
    # No foreign key to the batch row: it would cost every COPYed row an index probe; load_rows
    # checks (and locks) the batch row once per call instead.
    select = (sa.select(*(offers.c[c] for c in VIEW_COLUMNS))
              .join(batches, batches.c.batch_id == offers.c.batch_id)
              .where(batches.c.status == "published", sa.not_(offers.c.is_control)))
    create_view = CreateView(select, VIEW, metadata=md, schema=schema)
    return _Schema(md, batches, offers, create_view.table, create_view)


def normalise_url(url: str | sa.URL) -> sa.URL:
    """``postgresql://`` (as Airflow connections spell it) means psycopg 3 here, not psycopg2."""
    u = sa.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def _sqlite_setup(engine: sa.Engine) -> None:
    """WAL (readers never wait for the loader), a busy timeout, and real BEGINs.

    pysqlite's own transaction handling starts transactions lazily and never for SELECT, so a
    read-check-write sequence would not be atomic; we switch it off and emit BEGIN ourselves:
    BEGIN IMMEDIATE for writers (take the write lock up front), plain BEGIN for readers.
    """

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        immediate = conn.get_execution_options().get("offerflow_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def _engine(url: str | sa.URL, schema: str | None = None) -> Iterator[sa.Engine]:
    """A short-lived engine per call: publish is a few statements, pooling would only leak."""
    u = normalise_url(url)
    if schema is not None:
        check_identifier(schema)
        if u.get_backend_name() == "sqlite":
            raise ValueError("schema= is for PostgreSQL; SQLite has one schema per database file")
    engine = sa.create_engine(u, poolclass=sa.pool.NullPool)
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _write(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A write transaction (BEGIN IMMEDIATE on SQLite); commits on success, rolls back on error."""
    with engine.connect() as conn:
        conn = conn.execution_options(offerflow_write=True)
        with conn.begin():
            yield conn


_ENSURED: set[tuple[str, str | None]] = set()


def ensure_schema(url: str, schema: str | None = None) -> None:
    """Create or migrate the CRM tables, index and view; a no-op when they are up to date.

    Safe to call from several workers at once on PostgreSQL (an advisory lock serialises them;
    DDL there is transactional).
    """
    s = _schema(schema)
    with _engine(url, schema) as engine, _write(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(schema))))
            if schema is not None:
                conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        insp = sa.inspect(conn)
        existing = set(insp.get_table_names(schema=schema))
        views = set(insp.get_view_names(schema=schema))
        added = False
        for table in (s.batches, s.offers):
            if table.name not in existing:
                table.create(conn)
                continue
            have = {c["name"] for c in insp.get_columns(table.name, schema=schema)}
            for col in table.columns:
                if col.name not in have:  # additive migration: new nullable columns only
                    ddl = sa.schema.CreateColumn(col).compile(dialect=engine.dialect)
                    conn.execute(sa.DDL(f"ALTER TABLE {_qualified(table, engine)} ADD COLUMN {ddl}"))
                    added = True
        have_indexes = {i["name"] for i in insp.get_indexes(BATCHES, schema=schema)}
        if BATCHES in existing and engine.dialect.name in ("postgresql", "sqlite"):
            for index in s.batches.indexes:
                if index.name not in have_indexes:
                    index.create(conn)
        view_ok = VIEW in views and [c["name"] for c in insp.get_columns(VIEW, schema=schema)] == VIEW_COLUMNS
        if not view_ok or added:
            if VIEW in views:
                conn.execute(DropView(s.view))
            conn.execute(s.create_view)
    _ENSURED.add((str(normalise_url(url)), schema))


def _lock_key(schema: str | None) -> int:
    digest = hashlib.sha256(f"offerflow.crm.{schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _qualified(table: sa.Table, engine: sa.Engine) -> str:
    prep = engine.dialect.identifier_preparer
    return prep.format_table(table)


# ---------------------------------------------------------------------------- batch ids

def batch_id_for(as_of: dt.date, data_fingerprint: str, model_versions: Mapping[str, str],
                 policy: Mapping[str, Any] | Any) -> str:
    """Deterministic: the same inputs give the same id, so a rerun replaces its own rows only."""
    if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
        policy = dataclasses.asdict(policy)
    payload = json.dumps({"as_of": pd.Timestamp(as_of).date().isoformat(), "data": data_fingerprint,
                          "models": {str(k): str(v) for k, v in model_versions.items()},
                          "policy": policy}, sort_keys=True, default=str)
    return f"b{pd.Timestamp(as_of):%Y%m%d}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- protocol

def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _status(conn: sa.Connection, s: _Schema, batch_id: str, lock: str | None = None) -> str | None:
    q = sa.select(s.batches.c.status).where(s.batches.c.batch_id == batch_id)
    if lock == "update":
        q = q.with_for_update()
    elif lock == "share":
        q = q.with_for_update(read=True)
    return conn.execute(q).scalar_one_or_none()


def start_batch(url: str, batch_id: str, as_of: dt.date, model_versions: Mapping[str, str],
                run_ids: Mapping[str, str], schema: str | None = None) -> str:
    """Open ``batch_id`` for loading; returns 'loading', or 'published' when a rerun should skip.

    A new, ``failed``, ``loading`` (crashed earlier) or ``superseded`` batch loses its old rows
    and is (re)marked ``loading``; a ``published`` batch is left alone so a rerun publishes once.
    """
    key = (str(normalise_url(url)), schema)
    if key not in _ENSURED:  # once per process and database: the inspection costs a few round trips
        ensure_schema(url, schema)
    s = _schema(schema)
    values = {"as_of": pd.Timestamp(as_of).date(), "created_at": _now(), "published_at": None,
              "status": "loading", "n_offers": None, "n_control": None, "error": None,
              "model_versions": json.dumps(dict(model_versions), sort_keys=True),
              "run_ids": json.dumps(dict(run_ids), sort_keys=True)}
    with _engine(url, schema) as engine, _write(engine) as conn:
        status = _status(conn, s, batch_id, lock="update")
        if status == "published":
            return "published"
        if status is None:
            conn.execute(s.batches.insert().values(batch_id=batch_id, **values))
        else:
            conn.execute(s.offers.delete().where(s.offers.c.batch_id == batch_id))
            conn.execute(s.batches.update().where(s.batches.c.batch_id == batch_id).values(**values))
    log.info("crm: batch %s is loading (was %s)", batch_id, status or "new")
    return "loading"


def prepare_offers(offers: pd.DataFrame) -> pd.DataFrame:
    """The CRM columns only, in canonical types: any other column (personal data too) is dropped."""
    missing = [c for c in OFFER_COLUMNS if c not in offers.columns]
    if missing:
        raise ValueError(f"offers frame lacks column(s) {missing}; expected {OFFER_COLUMNS}")
    df = offers.loc[:, OFFER_COLUMNS].reset_index(drop=True)
    nulls = {c: int(n) for c, n in df.isna().sum().items() if n and c not in _NULLABLE}
    if nulls:
        raise ValueError(f"offers have missing values in required column(s) {nulls}")
    out: dict[str, pd.Series] = {}
    for c in OFFER_COLUMNS:
        col = df[c]
        if c == "reason_codes" and not pd.api.types.is_string_dtype(col):  # infers object columns
            col = col.map(lambda v: v if v is None or isinstance(v, str) or _isna(v)
                          else json.dumps(v, default=_json_default))
        if c in _TEXT_COLUMNS:
            out[c] = col.astype("string")
        elif c in _TIME_COLUMNS:
            t = pd.to_datetime(col, utc=True)
            out[c] = t.dt.tz_convert(None).astype("datetime64[us]")  # naive UTC, as in ml.contract
        elif c == "rank":
            out[c] = col.astype("int64")
        elif c == "is_control":
            out[c] = col.astype("bool")
        else:
            out[c] = col.astype("float64")
    return pd.DataFrame(out)


def _isna(v: Any) -> bool:
    return not isinstance(v, (list, dict, tuple, np.ndarray)) and bool(pd.isna(v))


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def load_rows(url: str, batch_id: str, offers: pd.DataFrame, schema: str | None = None) -> int:
    """Append one shard of offers to a ``loading`` batch; returns the number of rows written.

    Several workers may load shards of the same batch at once (each shard is one transaction).
    A retried shard replaces the rows of the customers it carries, so an Airflow retry after a
    lost success report does not duplicate anything. Refuses a batch that is not ``loading``.
    """
    df = prepare_offers(offers)
    _refuse_duplicates(df)
    s = _schema(schema)
    with _engine(url, schema) as engine:
        try:
            return _load_once(engine, s, batch_id, df, replace=False)
        except Exception as exc:
            if not _is_unique_violation(exc):
                raise
            # These customers were loaded before (a retried shard): replace their rows.
            return _load_once(engine, s, batch_id, df, replace=True)


def _refuse_duplicates(df: pd.DataFrame) -> None:
    dup = df.duplicated(["customer_id", "rank"], keep=False)
    if dup.any():
        raise ValueError(f"{int(dup.sum())} offers share a (customer_id, rank), e.g. "
                         f"{df.loc[dup, ['customer_id', 'rank']].head(3).to_dict('records')}")


def _is_unique_violation(exc: BaseException) -> bool:
    """SQLAlchemy's IntegrityError, or psycopg's own from inside COPY (SQLSTATE 23505)."""
    return isinstance(exc, sa.exc.IntegrityError) or getattr(exc, "sqlstate", None) == "23505"


def _load_once(engine: sa.Engine, s: _Schema, batch_id: str, df: pd.DataFrame, replace: bool) -> int:
    with _write(engine) as conn:
        status = _status(conn, s, batch_id, lock="share")  # publish_batch waits for us
        if status != "loading":
            raise ValueError(f"batch {batch_id} is {status or 'unknown'}, not loading: "
                             "call start_batch first")
        if replace:
            customers = df["customer_id"].drop_duplicates().tolist()
            for i in range(0, len(customers), 10_000):
                conn.execute(s.offers.delete().where(s.offers.c.batch_id == batch_id,
                                                     s.offers.c.customer_id.in_(customers[i:i + 10_000])))
        _write_rows(conn, s.offers, batch_id, df)
    return len(df)


def _write_rows(conn: sa.Connection, table: sa.Table, batch_id: str, df: pd.DataFrame) -> None:
    if df.empty:
        return
    if conn.dialect.name == "postgresql":
        _copy_pg(conn, table, batch_id, df)
    else:
        _insert_many(conn, table, batch_id, df)


def _copy_pg(conn: sa.Connection, table: sa.Table, batch_id: str, df: pd.DataFrame,
             chunk: int = 8 << 20) -> None:
    """COPY ... FROM STDIN (CSV) inside the SQLAlchemy transaction: about 10× faster than INSERTs.

    pyarrow writes the CSV (twice as fast as ``DataFrame.to_csv``): every string quoted, NULL as
    an empty unquoted field, which is exactly PostgreSQL's CSV default, so '' and NULL stay apart.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from psycopg import sql

    utc = {c: df[c].to_numpy() for c in _TIME_COLUMNS}  # naive UTC values
    data = pa.Table.from_pandas(df.drop(columns=list(utc)), preserve_index=False)
    for c, values in utc.items():
        data = data.add_column(OFFER_COLUMNS.index(c), c, pa.array(values, pa.timestamp("us", tz="UTC")))
    data = data.add_column(0, "batch_id", pa.array([batch_id] * len(df), pa.string()))
    buf = io.BytesIO()
    pacsv.write_csv(data, buf, pacsv.WriteOptions(include_header=False))
    target = sql.Identifier(*(p for p in (table.schema, table.name) if p))
    stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
        target, sql.SQL(", ").join(sql.Identifier(c) for c in data.column_names))
    view = buf.getbuffer()
    pg = conn.connection.driver_connection
    with pg.cursor() as cur, cur.copy(stmt) as cp:
        for i in range(0, len(view), chunk):
            cp.write(view[i:i + chunk])


def _format_ts(col: pd.Series, fmt: str) -> pd.Series:
    """UTC timestamps as text, formatted once per distinct value (offers share a few validity dates)."""
    codes, uniques = pd.factorize(col)
    text = np.asarray(uniques.strftime(fmt), dtype=object)
    return pd.Series(text[codes], index=col.index, dtype=object)


def _insert_many(conn: sa.Connection, table: sa.Table, batch_id: str, df: pd.DataFrame) -> None:
    """executemany of plain tuples: SQLAlchemy's per-row dict processing would be 3× slower."""
    cols = {c: df[c].to_numpy(dtype=object, na_value=None) if c in _TEXT_COLUMNS else df[c].to_numpy()
            for c in df.columns}
    for c in _TIME_COLUMNS:
        cols[c] = _format_ts(df[c], _SQLITE_TS).to_numpy()
    cols["is_control"] = df["is_control"].to_numpy(dtype="int64")
    names = ["batch_id", *df.columns]
    prep = conn.dialect.identifier_preparer
    stmt = (f"INSERT INTO {prep.format_table(table)} ({', '.join(prep.quote(n) for n in names)}) "  # noqa: S608
            f"VALUES ({', '.join('?' for _ in names)})")
    rows = zip([batch_id] * len(df), *(cols[c].tolist() for c in df.columns), strict=True)
    conn.exec_driver_sql(stmt, list(rows))


def read_batch(url: str, batch_id: str, schema: str | None = None) -> pd.DataFrame:
    """All rows of one batch (control included) as written, in canonical types: what is validated."""
    s = _schema(schema)
    with _engine(url, schema) as engine, engine.connect() as conn:
        return _read_batch(conn, s, batch_id)


def _read_batch(conn: sa.Connection, s: _Schema, batch_id: str) -> pd.DataFrame:
    q = (sa.select(*(s.offers.c[c] for c in OFFER_COLUMNS)).where(s.offers.c.batch_id == batch_id)
         .order_by(s.offers.c.customer_id, s.offers.c.rank))
    if conn.dialect.name == "postgresql":
        df = _copy_out_pg(conn, q)
    else:
        # Timestamps as stored text, parsed once by pandas: SQLAlchemy's per-row DateTime
        # processing would double the read time.
        q = q.with_only_columns(*(sa.type_coerce(s.offers.c[c], sa.Text).label(c) if c in _TIME_COLUMNS
                                  else s.offers.c[c] for c in OFFER_COLUMNS))
        rows = conn.execute(q).all()
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(OFFER_COLUMNS)
        df = pd.DataFrame({c: pd.Series(v, dtype=object)
                           for c, v in zip(OFFER_COLUMNS, columns, strict=True)})
    return _typed(df, OFFER_COLUMNS)


def _copy_out_pg(conn: sa.Connection, query: sa.Select) -> pd.DataFrame:
    """COPY (SELECT ...) TO STDOUT parsed by pyarrow: 3× faster than fetching rows through psycopg."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    compiled = query.compile(dialect=conn.dialect)
    compiled_columns = [c.name for c in query.selected_columns]
    pg = conn.connection.driver_connection
    out = io.BytesIO()
    with pg.cursor() as cur, cur.copy(f"COPY ({compiled.string}) TO STDOUT WITH (FORMAT csv, HEADER true)",
                                      compiled.params) as cp:
        for block in cp:
            out.write(block)
    out.seek(0)
    # PostgreSQL writes NULL as an empty unquoted field and '' as "": pyarrow keeps them apart.
    types = {c: pa.int64() if c == "rank" else pa.float64() if c in ("propensity", "expected_value")
             else pa.bool_() if c == "is_control" else pa.string() for c in compiled_columns}
    table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
        column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False,
        true_values=["t"], false_values=["f"]))
    return table.to_pandas()


def _typed(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    out = {}
    for c in columns:
        col = df[c]
        if c in _TEXT_COLUMNS or c == "batch_id":
            out[c] = col.astype("string")
        elif c in _TIME_COLUMNS:
            t = pd.to_datetime(col, utc=True, format="ISO8601")
            out[c] = t.dt.tz_convert(None).astype("datetime64[us]")
        elif c == "rank":
            out[c] = col.astype("int64")
        elif c == "is_control":
            text = col.astype(str).str.lower()  # 't'/'f' (COPY), 0/1 (SQLite), True/False
            out[c] = text.isin(["t", "true", "1"])
        else:
            out[c] = col.astype("float64")
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def _describe(failures: Sequence[Any], k: int = 5) -> str:
    parts = []
    for f in failures[:k]:
        where = ".".join(str(x) for x in (getattr(f, "table", None), getattr(f, "column", None)) if x)
        what = getattr(f, "check", None) or type(f).__name__
        count = getattr(f, "count", None)
        # The error text lands in the CRM database: never copy an email-like value there.
        ex = [e for e in getattr(f, "examples", None) or [] if not _EMAIL.search(str(e))]
        detail = getattr(f, "detail", None)
        bits = [f"{what} [{where}]" if where else str(what)]
        if count is not None:
            bits.append(f"{count} rows")
        if ex:
            bits.append(f"e.g. {list(ex)[:3]}")
        if detail:
            bits.append(str(detail))
        parts.append(": ".join(bits[:1]) + (": " + ", ".join(bits[1:]) if len(bits) > 1 else ""))
    more = f" (+{len(failures) - k} more)" if len(failures) > k else ""
    return "output validation failed: " + "; ".join(parts) + more


def _default_validate(df: pd.DataFrame) -> list:
    from ml.quality import run_suite  # lazy: GE is heavy and not needed to read the CRM

    return run_suite("crm_offers", df)


def _flip(conn: sa.Connection, s: _Schema, batch_id: str, n_offers: int, n_control: int) -> str | None:
    """The one transaction's writes: old published → superseded, this batch → published."""
    b = s.batches
    previous = conn.execute(sa.select(b.c.batch_id).where(b.c.status == "published")
                            .with_for_update()).scalar_one_or_none()
    conn.execute(b.update().where(b.c.status == "published").values(status="superseded"))
    conn.execute(b.update().where(b.c.batch_id == batch_id)
                 .values(status="published", published_at=_now(), n_offers=n_offers, n_control=n_control,
                         error=None))
    return previous


def publish_batch(url: str, batch_id: str, validate: Callable[[pd.DataFrame], list] | None = None,
                  retention: int = POLICY.retention_batches, schema: str | None = None) -> PublishResult:
    """Validate the loaded rows and make them the current offers in one transaction.

    The batch row is locked while its rows are read back and validated, so no shard can slip in
    between validation and flip. On any failure the batch becomes ``failed`` (with the reason),
    the previous batch stays published, and ``PublishError`` is raised.
    """
    if retention < 1:
        raise ValueError("retention must keep at least the published batch (>= 1)")
    s = _schema(schema)
    validate = validate or _default_validate
    t0 = time.perf_counter()
    with _engine(url, schema) as engine:
        failures: list = []
        try:
            with _write(engine) as conn:
                status = _status(conn, s, batch_id, lock="update")
                if status != "loading":
                    raise PublishError(batch_id, f"it is {status or 'unknown'}, not loading")
                df = _read_batch(conn, s, batch_id)
                failures = list(validate(df))
                if failures:
                    raise PublishError(batch_id, _describe(failures), failures)
                n_offers, n_control = len(df), int(df["is_control"].sum())
                previous = _flip(conn, s, batch_id, n_offers, n_control)
        except Exception as exc:
            _mark_failed(engine, s, batch_id, exc)
            if isinstance(exc, PublishError):
                raise
            raise PublishError(batch_id, f"{type(exc).__name__}: {exc}") from exc
        return _published(engine, s, batch_id, retention, n_offers, n_control, previous, t0)


def _published(engine: sa.Engine, s: _Schema, batch_id: str, retention: int, n_offers: int, n_control: int,
               previous: str | None, t0: float) -> PublishResult:
    """After the flip: retention (best effort, the batch is live either way) and the result."""
    try:
        deleted = _apply_retention(engine, s, retention)
    except sa.exc.SQLAlchemyError as exc:  # published all the same: clean up next time
        log.warning("crm: retention failed after publishing %s: %s", batch_id, exc)
        deleted = []
    res = PublishResult(batch_id, "published", n_offers, n_control, previous, deleted,
                        time.perf_counter() - t0)
    log.info("crm: %s", res.summary())
    return res


def _mark_failed(engine: sa.Engine, s: _Schema, batch_id: str, exc: BaseException) -> None:
    """Best effort: record why (a published batch is never demoted here)."""
    try:
        with _write(engine) as conn:
            conn.execute(s.batches.update()
                         .where(s.batches.c.batch_id == batch_id, s.batches.c.status == "loading")
                         .values(status="failed", error=str(exc)[:4000]))
    except sa.exc.SQLAlchemyError as mark_exc:  # the database may be what failed
        log.warning("crm: could not mark batch %s failed: %s", batch_id, mark_exc)


def _apply_retention(engine: sa.Engine, s: _Schema, retention: int) -> list[str]:
    """Keep the ``retention`` newest batches (the published one always); delete the rest with their rows."""
    b = s.batches
    with _write(engine) as conn:
        ids = conn.execute(sa.select(b.c.batch_id, b.c.status)
                           .order_by(b.c.created_at.desc(), b.c.batch_id.desc())).all()
        doomed = [bid for i, (bid, st) in enumerate(ids) if i >= retention and st != "published"]
        keep_published = [bid for bid, st in ids[:retention] if st == "published"]
        if not keep_published and any(st == "published" for _, st in ids[retention:]):
            # The published batch is older than the window: it takes one of the kept slots.
            newest_other = [bid for bid, st in ids[:retention] if st != "published"]
            if len(newest_other) == retention:
                doomed.append(newest_other[-1])
        if doomed:
            conn.execute(s.offers.delete().where(s.offers.c.batch_id.in_(doomed)))
            conn.execute(b.delete().where(b.c.batch_id.in_(doomed)))
    if doomed:
        log.info("crm: retention removed %d batch(es)", len(doomed))
    return doomed


def publish(url: str, offers: pd.DataFrame, batch_id: str, as_of: dt.date,
            model_versions: Mapping[str, str], run_ids: Mapping[str, str],
            validate: Callable[[pd.DataFrame], list] | None = None,
            retention: int = POLICY.retention_batches, schema: str | None = None) -> PublishResult:
    """start_batch, then load + validate + flip as one part; a rerun of a published batch id is a no-op.

    The outcome is that of start_batch + load_rows + publish_batch (failed validation: the batch is
    ``failed`` with its rows and the reason, the previous batch stays published), in less time:
    ``validate`` checks the canonical frame being written, in a thread while the rows load, and the
    load and the flip are one transaction holding the batch row, so no other loader can add or
    change rows in between and the rows published are exactly the rows validated.
    """
    if retention < 1:
        raise ValueError("retention must keep at least the published batch (>= 1)")
    t0 = time.perf_counter()
    if start_batch(url, batch_id, as_of, model_versions, run_ids, schema=schema) == "published":
        row = list_batches(url, schema=schema).set_index("batch_id").loc[batch_id]
        log.info("crm: batch %s already published, nothing to do", batch_id)
        return PublishResult(batch_id, "already published", int(row["n_offers"]), int(row["n_control"]),
                             seconds=time.perf_counter() - t0)
    s = _schema(schema)
    validate = validate or _default_validate
    with _engine(url, schema) as engine:
        try:
            df = prepare_offers(offers)
            _refuse_duplicates(df)
        except Exception as exc:
            _mark_failed(engine, s, batch_id, exc)
            raise
        n_offers, n_control = len(df), int(df["is_control"].sum())
        rejected: PublishError | None = None
        loaded = False
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="offerflow-validate") as pool:
                checked = pool.submit(validate, df)
                with _write(engine) as conn:
                    status = _status(conn, s, batch_id, lock="update")
                    if status != "loading":
                        raise ValueError(f"batch {batch_id} is {status or 'unknown'}, not loading: "
                                         "call start_batch first")
                    # Rows another loader may have added since start_batch: this part replaces them.
                    conn.execute(s.offers.delete().where(s.offers.c.batch_id == batch_id))
                    _write_rows(conn, s.offers, batch_id, df)
                    loaded = True
                    failures = list(checked.result())
                    if failures:  # keep the rows for inspection, as after a read-back validation
                        rejected = PublishError(batch_id, _describe(failures), failures)
                    else:
                        previous = _flip(conn, s, batch_id, n_offers, n_control)
            if rejected is not None:
                raise rejected
        except Exception as exc:
            _mark_failed(engine, s, batch_id, exc)
            if isinstance(exc, PublishError) or not loaded:  # load errors surface as load_rows raises them
                raise
            raise PublishError(batch_id, f"{type(exc).__name__}: {exc}") from exc
        return _published(engine, s, batch_id, retention, n_offers, n_control, previous, t0)


# ---------------------------------------------------------------------------- readers

def current_offers(url: str, schema: str | None = None) -> pd.DataFrame:
    """What the CRM sees: the published batch without control rows (empty before any publish)."""
    s = _schema(schema)
    with _engine(url, schema) as engine, engine.connect() as conn:
        if not sa.inspect(conn).has_table(VIEW, schema=schema):
            return _typed(pd.DataFrame({c: [] for c in VIEW_COLUMNS}), VIEW_COLUMNS)
        q = sa.select(s.view).order_by(s.view.c.customer_id, s.view.c["rank"])
        return _typed(pd.read_sql_query(q, conn), VIEW_COLUMNS)


def list_batches(url: str, schema: str | None = None) -> pd.DataFrame:
    """All batches, newest first, with status, counts and the error of failed ones."""
    s = _schema(schema)
    with _engine(url, schema) as engine, engine.connect() as conn:
        if not sa.inspect(conn).has_table(BATCHES, schema=schema):
            return pd.DataFrame(columns=[c.name for c in s.batches.columns])
        q = sa.select(s.batches).order_by(s.batches.c.created_at.desc(), s.batches.c.batch_id.desc())
        return pd.read_sql_query(q, conn)
