"""`make demo`: the real Airflow DAGs end to end on a synthetic shop, embedded, no services needed.

    .venv/bin/python scripts/demo.py [--customers 5000] [--days 365] [--seed 7]

1. Airflow metadata in SQLite under ./var/airflow (migrated in-process), the DAGs of ./dags.
2. A seeded synthetic shop in ./var/shop (ml.simulate).
3. `offers_train` (validate → train ×3 → gate ×3 → champions) and then `offers_score` (validate →
   score → decide and load → publish) with `dag.test()`, as_of = the shop's last day + 1.
4. A few rows of the CRM view `crm_current_offers` and where to look next.

Everything lands under ./var (or $OFFERFLOW_HOME): MLflow store, CRM database, scored parts,
data-quality reports. Exit code 0 when both DAG runs succeed, 1 when one fails (its failed tasks
are listed), 2 on wrong usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _environment(var: Path) -> None:
    """Airflow reads its configuration at import time: set it before anything imports airflow."""
    airflow_home = var / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        "OFFERFLOW_HOME": str(var),
    })
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{var / 'mlflow.db'}")


def _run(dag, conf: dict) -> tuple[bool, str]:
    """dag.test() does not raise when a task fails: read the run's state and its failed tasks."""
    t0 = time.perf_counter()
    dr = dag.test(run_conf=conf)
    seconds = time.perf_counter() - t0
    states = {}
    for ti in dr.get_task_instances():
        states.setdefault(str(ti.state), []).append(
            ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]")
    summary = ", ".join(f"{state}: {len(ids)}" for state, ids in sorted(states.items()))
    print(f"  {dag.dag_id} run {dr.run_id}: {dr.state} in {seconds:.0f} s ({summary} task instances)")
    if dr.state != "success":
        return False, (f"{dag.dag_id} failed; failed tasks: {states.get('failed', [])}; "
                       f"upstream_failed: {states.get('upstream_failed', [])}. The task log above has "
                       f"the error (task logs also under {os.environ['AIRFLOW_HOME']}/logs).")
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=5_000, help="customers in the synthetic shop")
    parser.add_argument("--days", type=int, default=365, help="days of history")
    parser.add_argument("--seed", type=int, default=7, help="random seed (same seed, same shop)")
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2025, 1, 1),
                        help="first day of the shop, YYYY-MM-DD")
    args = parser.parse_args(argv)
    if args.customers < 50 or args.days < 120:
        parser.error("need at least 50 customers and 120 days (rolling cutoffs plus a 28-day horizon)")

    t_start = time.perf_counter()
    var = Path(os.environ.get("OFFERFLOW_HOME", ROOT / "var")).resolve()
    _environment(var)
    shop = var / "shop"
    as_of = (args.start + dt.timedelta(days=args.days)).isoformat()

    print(f"offerflow demo: {args.customers:,} customers, {args.days} days, as_of {as_of}; "
          f"everything under {var}")
    print("1/4 Airflow metadata (SQLite) ...")
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.upgradedb()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1

    print("2/4 simulating the shop ...")
    from ml.simulate import simulate_to

    print("  " + simulate_to(shop, customers=args.customers, days=args.days, seed=args.seed,
                             start=args.start))

    conf = {"as_of": as_of, "data": str(shop)}
    for step, dag_id in (("3/4", "offers_train"), ("4/4", "offers_score")):
        print(f"{step} dag.test({dag_id}) ...")
        ok, why = _run(bag.dags[dag_id], conf)
        if not ok:
            print(f"\nDEMO FAILED: {why}", file=sys.stderr)
            return 1

    from ml import config
    from ml.crm import current_offers, list_batches
    from ml.pipeline import crm_url_from_airflow

    url = crm_url_from_airflow(os.environ.get("AIRFLOW_CONN_OFFERFLOW_CRM"))  # the default: var/crm.db
    batches = list_batches(url)
    offers = current_offers(url)
    published = batches[batches["status"] == "published"].head(1)
    print(f"\nCRM {url}: {len(offers):,} offers visible in crm_current_offers"
          + (f" (batch {published['batch_id'].iloc[0]})" if len(published) else ""))
    columns = [c for c in ("customer_id", "rank", "offer_type", "category", "product_id", "channel",
                           "propensity", "expected_value", "segment") if c in offers.columns]
    print(offers[columns].head(8).to_string(index=False))
    if "reason_codes" in offers.columns and len(offers):
        print(f"  reason codes of the first offer: {offers['reason_codes'].iloc[0]}")
    print(f"""
Done in {time.perf_counter() - t_start:.0f} s. Where to look next:
  MLflow UI (runs, metrics, plots, models):  make ui
                                             (.venv/bin/mlflow ui --backend-store-uri {config.tracking_uri()})
  CRM database:                              {url}
                                             (view crm_current_offers; tables crm_offers, crm_offer_batches)
  Data-quality reports:                      {var / 'quality' / 'index.html'}
  Models and their aliases:                  .venv/bin/offerflow models list
  The DAGs in the Airflow UI (airflow standalone, same metadata DB):
    AIRFLOW_HOME={var / 'airflow'} AIRFLOW__CORE__DAGS_FOLDER=dags \\
    AIRFLOW__CORE__PLUGINS_FOLDER=plugins AIRFLOW__CORE__LOAD_EXAMPLES=False .venv/bin/airflow standalone""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
