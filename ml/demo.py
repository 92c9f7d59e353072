"""``offerflow demo``: the whole pipeline on a synthetic shop, without Airflow.

Everything lands under ``./var`` (or ``$OFFERFLOW_HOME``): the shop, the MLflow store, the CRM.
``make demo`` runs the same steps through the real DAGs (scripts/demo.py).
"""

from __future__ import annotations

import datetime as dt
import time

from ml import config
from ml.contract import OFFER_TYPES
from ml.progress import log


def run_demo(customers: int = 5_000, days: int = 365, seed: int = 7,
             start: dt.date = dt.date(2025, 1, 1)) -> int:
    """Simulate → validate → train + gate the three models → score → publish; return an exit code."""
    from ml.crm import current_offers
    from ml.quality import validate_source
    from ml.score import score
    from ml.simulate import simulate_to
    from ml.train import train_offer_types

    t0 = time.perf_counter()
    shop_dir = config.var_dir() / "shop"
    as_of = start + dt.timedelta(days=days)
    log.info(simulate_to(shop_dir, customers=customers, days=days, seed=seed, start=start))
    report = validate_source(shop_dir, as_of=as_of)
    print(report.summary())
    if not report.success:
        return 1
    for result in train_offer_types(str(shop_dir), as_of=as_of, offer_types=list(OFFER_TYPES), promote=True):
        print(result.summary())
    print(score(str(shop_dir), as_of=as_of))
    url = config.crm_url()
    print(f"\nA few rows of crm_current_offers ({url}):")
    print(current_offers(url).head(8).to_string(index=False, max_colwidth=60))
    print(f"\nDone in {time.perf_counter() - t0:.0f} s. Next: `make ui` for the MLflow UI "
          f"(tracking store {config.tracking_uri()}), `offerflow models list`, "
          f"`offerflow score --data {shop_dir} --as-of {as_of} --dry-run`.")
    return 0
