"""Scale-out: scoring mapped over customer shards gives exactly the CRM rows of unsharded scoring.

The same functions ``offers_score`` runs as tasks (``ml.pipeline``): ``score_offer`` per (offer type,
shard), ``open_batch`` once, ``load_shard`` per shard (policy, arbitration, reason codes for that
shard's customers only) into the one ``loading`` batch, one ``publish`` over the shards' results. Models are
trained once per module on a small simulated shop, in a private MLflow store.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pytest

OFFER_TYPES = ("cross_sell", "upsell", "downsell")
START, DAYS = dt.date(2025, 1, 1), 240
AS_OF = (START + dt.timedelta(days=DAYS)).isoformat()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_template_db):
    """A 600-customer shop and a champion per offer type (forced when the gate rejects a tiny model)."""
    import mlflow

    from ml import registry
    from ml.simulate import simulate_to
    from ml.train import small_config, train_offer_types

    home = tmp_path_factory.mktemp("sharding")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFERFLOW_HOME", str(home / "var"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/var/mlflow.db")
        mp.delenv("OFFERFLOW_CRM_URL", raising=False)
        (home / "var").mkdir()
        shutil.copy(mlflow_template_db, home / "var" / "mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{home}/var/mlflow.db")
        shop = home / "shop"
        simulate_to(shop, customers=600, days=DAYS, seed=11, start=START)
        results = train_offer_types(str(shop), dt.date.fromisoformat(AS_OF), list(OFFER_TYPES),
                                    cfg=small_config())
        for r in results:
            if registry.champion_version(r.offer_type) is None:
                registry.promote(r.offer_type, r.version, "test: sharding needs a champion per type")
        versions = {t: str(registry.champion_version(t)) for t in OFFER_TYPES}
        yield {"home": home, "shop": str(shop), "versions": versions}
        mlflow.set_tracking_uri(None)


def _run_score(trained: dict, url: str, n_shards: int) -> tuple[list[dict], dict]:
    """offers_score's task sequence: score × types × shards → open_batch → load_shard × shards → publish."""
    from ml import pipeline

    parts = [pipeline.score_offer(trained["shop"], AS_OF, t, shard=s, n_shards=n_shards,
                                  version=trained["versions"][t])
             for t in OFFER_TYPES for s in range(n_shards)]
    jobs = pipeline.open_batch(trained["shop"], AS_OF, parts, crm_url=url)
    assert [j["shard"] for j in jobs] == list(range(n_shards))
    loads = [pipeline.load_shard(trained["shop"], AS_OF, job, crm_url=url) for job in jobs]
    assert {r["status"] for r in loads} == {"loading"}
    published = pipeline.publish(loads, crm_url=url)
    assert published["published"] is True
    return parts, published


def _table(url: str, name: str) -> pd.DataFrame:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return pd.read_sql_table(name, conn)
    finally:
        engine.dispose()


def _crm(backend: str, tmp_path, request) -> tuple[str, str]:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/four.db"
    first = request.getfixturevalue("pg_url")  # skips without PostgreSQL
    second = request.getfixturevalue("pg_url_second")
    return first, second


@pytest.fixture
def pg_url_second():
    """A second scratch PostgreSQL database (conftest's ``pg_url`` gives one per test)."""
    from conftest import scratch_database

    with scratch_database() as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_shards_publish_exactly_the_rows_of_one(trained, backend, tmp_path, request):
    url_one, url_four = _crm(backend, tmp_path, request)
    parts_one, one = _run_score(trained, url_one, 1)
    parts_four, four = _run_score(trained, url_four, 4)

    # The shards split the customers: every shard scores someone, nobody is in two shards, and
    # together they are the unsharded candidates.
    scored_one = {p["offer_type"]: pd.read_parquet(p["path"]) for p in parts_one}
    for t in OFFER_TYPES:
        shards = [pd.read_parquet(p["path"]) for p in parts_four if p["offer_type"] == t]
        assert len(shards) == 4 and all(len(s) for s in shards)
        ids = [set(s["customer_id"]) for s in shards]
        assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
        key = ["customer_id", "category", "product_id"]
        merged = pd.concat(shards, ignore_index=True).sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(merged, scored_one[t].sort_values(key).reset_index(drop=True))

    # The CRM: the same deterministic batch id, the same rows, every column.
    assert one["batch_id"] == four["batch_id"]
    assert (one["n_offers"], one["n_control"]) == (four["n_offers"], four["n_control"])
    assert one["n_offers"] > 0
    key = ["batch_id", "customer_id", "rank"]
    rows_one = _table(url_one, "crm_offers").sort_values(key).reset_index(drop=True)
    rows_four = _table(url_four, "crm_offers").sort_values(key).reset_index(drop=True)
    assert len(rows_one) == one["n_offers"]
    pd.testing.assert_frame_equal(rows_four, rows_one)
    batches_one, batches_four = _table(url_one, "crm_offer_batches"), _table(url_four, "crm_offer_batches")
    same = ["batch_id", "as_of", "status", "n_offers", "n_control", "model_versions", "run_ids"]
    pd.testing.assert_frame_equal(batches_four[same], batches_one[same])
    assert list(batches_one["status"]) == ["published"]
