"""Publish throughput: our CRM publish vs a raw psycopg COPY and pandas ``to_sql`` (DESIGN §6).

PostgreSQL (a scratch database created and dropped here): rows/s of ``ml.crm.publish`` (start +
COPY load + flip in one transaction, with a no-op validation and with the GE output suite, which
runs on the in-memory frame while COPY streams; GE is imported and warmed before timing, as
psycopg/pyarrow are for the baselines) and of its load step alone, against a raw ``df.to_csv`` →
``COPY`` into a plain table (the fastest hand-written loader, STACK.md §6) and pandas ``to_sql``
(the default). SQLite: our rows/s.

    python benchmarks/bench_publish.py --rows 100000 --json var/bench_publish.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ml import crm

AS_OF = dt.date(2025, 12, 31)
NO_CHECK = lambda df: []  # noqa: E731 - measure the database path, not GE


def make_offers(rows: int, seed: int = 0) -> pd.DataFrame:
    """Offers shaped like the policy's output: 3 per customer, JSON reason codes, ~10% control."""
    rng = np.random.default_rng(seed)
    n = -(-rows // 3)
    cust = np.repeat(np.array([f"c{i:08d}" for i in range(n)]), 3)[:rows]
    reasons = np.array([json.dumps([{"feature": "recency_days", "value": v, "text": f"{v} days ago"}])
                        for v in range(90)], dtype=object)
    start = pd.Timestamp("2025-12-31")
    return pd.DataFrame({
        "customer_id": cust,
        "rank": np.tile([1, 2, 3], n)[:rows],
        "offer_type": rng.choice(["cross_sell", "upsell", "downsell"], rows),
        "category": rng.choice(["Coffee", "Tea", "Snacks", "Dairy, eggs"], rows),
        "product_id": np.char.add("p", rng.integers(0, 5000, rows).astype(str)).astype(object),
        "channel": rng.choice(["email", "sms", "push"], rows),
        "propensity": rng.random(rows),
        "expected_value": rng.random(rows) * 20,
        "reason_codes": reasons[rng.integers(0, 90, rows)],
        "segment": rng.choice(["champions", "at_risk", "new"], rows),
        "is_control": np.repeat(rng.random(n) < 0.1, 3)[:rows],
        "valid_from": start,
        "valid_until": start + pd.Timedelta(days=7),
        "model_version": rng.choice(["offerflow-cross_sell/4", "offerflow-upsell/2"], rows),
    })


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def raw_copy(url: str, df: pd.DataFrame, arrow: bool = False) -> float:
    """The baseline: CSV (pandas to_csv, or pyarrow as ml.crm does) + COPY FROM STDIN into a plain table."""
    engine = sa.create_engine(url)
    table = "raw_arrow" if arrow else "raw_offers"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {table} (batch_id text, customer_id text, rank integer, offer_type text, "
            "category text, product_id text, channel text, propensity double precision, "
            "expected_value double precision, reason_codes text, segment text, is_control boolean, "
            "valid_from timestamptz, valid_until timestamptz, model_version text)")
    cols = ", ".join(["batch_id", *df.columns])

    def run() -> None:
        raw = engine.raw_connection()
        try:
            frame = df.assign(batch_id="raw")[["batch_id", *df.columns]]
            if arrow:
                out = io.BytesIO()
                pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), out,
                                pacsv.WriteOptions(include_header=False))
                buf, null = out.getbuffer(), ""
            else:
                buf, null = frame.to_csv(index=False, header=False, na_rep="\\N"), "\\N"
            with raw.driver_connection.cursor() as cur, \
                    cur.copy(f"COPY {table} ({cols}) FROM STDIN WITH (FORMAT csv, NULL '{null}')") as cp:
                for i in range(0, len(buf), 8 << 20):
                    cp.write(buf[i:i + (8 << 20)])
            raw.commit()
        finally:
            raw.close()

    try:
        return timed(run)
    finally:
        engine.dispose()


def to_sql(url: str, df: pd.DataFrame) -> float:
    engine = sa.create_engine(url)
    try:
        return timed(lambda: df.assign(batch_id="to_sql").to_sql(
            "to_sql_offers", engine, index=False, chunksize=10_000))
    finally:
        engine.dispose()


def ours(url: str, df: pd.DataFrame) -> dict[str, float]:
    """Load alone (start + load_rows), then publish() of a second batch, then one with the GE suite."""
    from ml.quality import run_suite

    crm.ensure_schema(url)
    run_suite("crm_offers", crm.prepare_offers(df.head(100)))  # GE import + first run: before timing
    t0 = time.perf_counter()
    crm.start_batch(url, "bench_load", AS_OF, {}, {})
    crm.load_rows(url, "bench_load", df)
    load = time.perf_counter() - t0
    full = timed(lambda: crm.publish(url, df, "bench_publish", AS_OF, {}, {}, validate=NO_CHECK))
    suite = timed(lambda: crm.publish(url, df, "bench_suite", AS_OF, {}, {}))
    return {"load": load, "publish": full, "suite": suite}


def bench_pg(admin_url: str, df: pd.DataFrame) -> list[dict]:
    name = f"offerflow_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        base = raw_copy(url, df)
        arrow = raw_copy(url, df, arrow=True)
        mine = ours(url, df)
        slow = to_sql(url, df)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    return [
        {"backend": "postgresql", "method": "raw COPY (to_csv + COPY, plain table)", "seconds": base},
        {"backend": "postgresql", "method": "raw COPY (pyarrow CSV + COPY, plain table)", "seconds": arrow,
         "ratio_vs_raw_copy": base / arrow},
        {"backend": "postgresql", "method": "ml.crm load (start_batch + load_rows)", "seconds": mine["load"],
         "ratio_vs_raw_copy": base / mine["load"]},
        {"backend": "postgresql", "method": "ml.crm publish (start+load+flip)",
         "seconds": mine["publish"], "ratio_vs_raw_copy": base / mine["publish"],
         "ratio_vs_to_sql": slow / mine["publish"]},
        {"backend": "postgresql", "method": "ml.crm publish + GE output suite",
         "seconds": mine["suite"], "ratio_vs_raw_copy": base / mine["suite"],
         "ratio_vs_to_sql": slow / mine["suite"]},
        {"backend": "postgresql", "method": "pandas to_sql (chunksize 10k)", "seconds": slow,
         "ratio_vs_raw_copy": base / slow},
    ]


def bench_sqlite(df: pd.DataFrame) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mine = ours(f"sqlite:///{tmp}/crm.db", df)
    return [{"backend": "sqlite", "method": "ml.crm load (start_batch + load_rows)", "seconds": mine["load"]},
            {"backend": "sqlite", "method": "ml.crm publish (start+load+flip)", "seconds": mine["publish"]},
            {"backend": "sqlite", "method": "ml.crm publish + GE output suite", "seconds": mine["suite"]}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="offer rows per batch (default 100000)")
    p.add_argument("--pg-url", default=os.environ.get(
        "OFFERFLOW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="admin URL of a PostgreSQL server (a scratch database is created and dropped)")
    p.add_argument("--no-pg", action="store_true", help="SQLite only")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    df = make_offers(args.rows)
    results = [] if args.no_pg else bench_pg(args.pg_url, df)
    results += bench_sqlite(df)
    for r in results:
        r["rows"] = len(df)
        r["rows_per_s"] = len(df) / r["seconds"]

    print(f"publish benchmark: {len(df):,} rows, load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'backend':<11} {'method':<44} {'seconds':>8} {'rows/s':>10} {'vs COPY':>8} {'vs to_sql':>9}")
    for r in results:
        ratio = f"{r['ratio_vs_raw_copy']:.2f}" if "ratio_vs_raw_copy" in r else ""
        slow = f"{r['ratio_vs_to_sql']:.1f}x" if "ratio_vs_to_sql" in r else ""
        print(f"{r['backend']:<11} {r['method']:<44} {r['seconds']:>8.2f} {r['rows_per_s']:>10,.0f} "
              f"{ratio:>8} {slow:>9}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": len(df), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
