"""CRM tables and the atomic publish protocol (DESIGN §6), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import pickle
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from ml import crm

AS_OF = dt.date(2025, 12, 31)
OK = lambda df: []  # noqa: E731 - a validator that accepts everything
REASONS = np.array([json.dumps([{"feature": "recency_days", "value": v, "text": f"bought 3 times, {v} days"}])
                    for v in range(60)], dtype=object)
SUITE = Path(__file__).resolve().parents[1] / "expectations" / "crm_offers.json"


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crm.db'}"
    return request.getfixturevalue("pg_url")


def make_offers(n_customers: int, seed: int = 0, k: int = 3, first: int = 0) -> pd.DataFrame:
    """k offers per customer, ~10% of customers in control, text with commas, quotes and NULLs."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"c{i:07d}" for i in range(first, first + n_customers)])
    cust = np.repeat(ids, k)
    m = len(cust)
    start = pd.Timestamp("2025-12-31")
    return pd.DataFrame({
        "customer_id": cust,
        "rank": np.tile(np.arange(1, k + 1), n_customers),
        "offer_type": rng.choice(["cross_sell", "upsell", "downsell"], m),
        "category": rng.choice(["Coffee", 'Tea, "green"', "Snacks"], m),
        "product_id": [f"p{x}" for x in rng.integers(0, 500, m)],
        "channel": rng.choice(["email", "sms", "push"], m),
        "propensity": rng.random(m),
        "expected_value": rng.random(m) * 10,
        "reason_codes": REASONS[rng.integers(0, len(REASONS), m)],
        "segment": rng.choice(np.array(["champions", None, ""], dtype=object), m),  # NULL and '' differ
        "is_control": np.repeat(rng.random(n_customers) < 0.1, k),
        "valid_from": start,
        "valid_until": start + pd.Timedelta(days=7),
        "model_version": "offerflow-upsell/3",
    })


def expected_rows(offers: pd.DataFrame, batch_id: str | None = None, control: bool = True) -> pd.DataFrame:
    df = crm.prepare_offers(offers)
    if not control:
        df = df[~df["is_control"]].drop(columns="is_control")
    df = df.sort_values(["customer_id", "rank"]).reset_index(drop=True)
    if batch_id is not None:
        df.insert(0, "batch_id", pd.array([batch_id] * len(df), dtype="string"))
    return df


def publish(url: str, offers: pd.DataFrame, batch_id: str, **kw) -> crm.PublishResult:
    kw.setdefault("validate", OK)
    return crm.publish(url, offers, batch_id, AS_OF, {"upsell": "3"}, {"upsell": "run1"}, **kw)


def status_of(url: str) -> dict[str, str]:
    return dict(crm.list_batches(url)[["batch_id", "status"]].itertuples(index=False, name=None))


def test_publish_shows_batch_without_control(url):
    offers = make_offers(300, seed=1)
    as_objects = offers.assign(reason_codes=offers["reason_codes"].map(json.loads))  # lists of dicts → JSON
    res = publish(url, as_objects, "b1")
    assert res.status == "published" and res.superseded is None
    n_control = int(offers["is_control"].sum())
    assert 0 < n_control < len(offers)
    assert (res.n_offers, res.n_control) == (len(offers), n_control)  # n_offers counts control rows too

    pd.testing.assert_frame_equal(crm.current_offers(url), expected_rows(offers, "b1", control=False))
    pd.testing.assert_frame_equal(crm.read_batch(url, "b1"), expected_rows(offers))
    row = crm.list_batches(url).iloc[0]
    assert row["status"] == "published" and pd.notna(row["published_at"])
    assert (row["n_offers"], row["n_control"]) == (len(offers), n_control)
    assert json.loads(row["model_versions"]) == {"upsell": "3"}
    assert json.loads(row["run_ids"]) == {"upsell": "run1"}


def test_second_batch_supersedes_first(url):
    publish(url, make_offers(100, seed=1), "b1")
    second = make_offers(150, seed=2, first=1000)
    res = publish(url, second, "b2")
    assert res.superseded == "b1"
    assert status_of(url) == {"b1": "superseded", "b2": "published"}
    cur = crm.current_offers(url)
    assert set(cur["batch_id"]) == {"b2"}
    pd.testing.assert_frame_equal(cur, expected_rows(second, "b2", control=False))


def test_at_most_one_published_is_enforced_by_the_database(url):
    publish(url, make_offers(10, seed=1), "b1")
    crm.start_batch(url, "b2", AS_OF, {}, {})
    engine = sa.create_engine(url)
    try:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("UPDATE crm_offer_batches SET status = 'published' WHERE batch_id = 'b2'"))
    finally:
        engine.dispose()


def test_reader_never_sees_a_partial_or_mixed_batch(url):
    """A CRM reader polls the view in its own connection while a 50k-row batch loads in 4 shards."""
    old, new = make_offers(1_000, seed=1), make_offers(16_667, seed=2, first=50_000)
    publish(url, old, "old")
    allowed = {"old": int((~old["is_control"]).sum()), "new": int((~new["is_control"]).sum())}
    assert len(new) >= 50_000

    seen: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                while not stop.is_set():
                    rows = conn.execute(sa.text(
                        "SELECT batch_id, COUNT(*) FROM crm_current_offers GROUP BY batch_id")).all()
                    conn.rollback()  # next poll sees a fresh snapshot
                    seen.append(tuple(rows))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            engine.dispose()

    def wait_for_polls(n: int, timeout: float = 30.0) -> None:
        target, deadline = len(seen) + n, time.monotonic() + timeout
        while len(seen) < target and time.monotonic() < deadline:
            time.sleep(0.005)

    def slow_validate(df: pd.DataFrame) -> list:
        # All new rows are written but not yet published: the most tempting moment for a leak.
        assert len(df) == len(new)
        polls_during_validation.append(len(seen))
        wait_for_polls(10)
        polls_during_validation.append(len(seen))
        return []

    polls_during_validation: list[int] = []
    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    wait_for_polls(3)
    assert crm.start_batch(url, "new", AS_OF, {}, {}) == "loading"
    for shard in np.array_split(np.arange(len(new)), 4):
        crm.load_rows(url, "new", new.iloc[shard])
        wait_for_polls(3)
    crm.publish_batch(url, "new", validate=slow_validate)
    wait_for_polls(3)
    stop.set()
    reader.join(30)

    assert not errors, errors
    assert len(seen) >= 20, f"the reader polled only {len(seen)} times"
    assert polls_during_validation[1] - polls_during_validation[0] >= 10
    for rows in seen:
        assert len(rows) == 1, f"mixed batches visible: {rows}"
        batch_id, count = rows[0]
        assert allowed[batch_id] == count, f"partial batch visible: {rows}"
    assert seen[0] == (("old", allowed["old"]),) and seen[-1] == (("new", allowed["new"]),)
    flips = sum(a != b for a, b in itertools.pairwise(seen))
    assert flips == 1  # old ... old new ... new: it never flickers back


@pytest.mark.parametrize("how", ["validation", "flip raises"])
def test_failure_before_the_flip_keeps_the_previous_batch(url, how, monkeypatch):
    first = make_offers(100, seed=1)
    publish(url, first, "b1")
    before = crm.current_offers(url)
    if how == "validation":
        failure = SimpleNamespace(table="crm_offers", check="expect_column_values_to_be_between",
                                  column="propensity", count=3, examples=[1.5, 2.0], detail="max 1")
        kw = {"validate": lambda df: [failure]}
    else:
        def boom(*args, **kwargs):
            raise RuntimeError("disk full while flipping")

        monkeypatch.setattr(crm, "_flip", boom)
        kw = {}
    with pytest.raises(crm.PublishError) as info:
        publish(url, make_offers(120, seed=2, first=500), "b2", **kw)
    assert info.value.batch_id == "b2"
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # crosses process boundaries
    assert status_of(url) == {"b1": "published", "b2": "failed"}
    pd.testing.assert_frame_equal(crm.current_offers(url), before)
    error = crm.list_batches(url).set_index("batch_id").loc["b2", "error"]
    assert ("propensity" in error and "3 rows" in error) if how == "validation" else "disk full" in error

    # The failed batch can be rerun once the cause is fixed.
    monkeypatch.undo()
    assert publish(url, make_offers(120, seed=2, first=500), "b2").status == "published"
    assert status_of(url) == {"b1": "superseded", "b2": "published"}


def test_rerun_of_the_same_batch_id_replaces_its_rows_and_publishes_once(url):
    offers = make_offers(200, seed=3)
    # An earlier attempt crashed half-way through loading.
    crm.start_batch(url, "b1", AS_OF, {}, {})
    crm.load_rows(url, "b1", offers.iloc[: len(offers) // 2])
    assert status_of(url) == {"b1": "loading"}
    assert crm.current_offers(url).empty

    res = publish(url, offers, "b1")
    assert res.status == "published" and res.n_offers == len(offers)
    rows = crm.read_batch(url, "b1")
    pd.testing.assert_frame_equal(rows, expected_rows(offers))
    published_at = crm.list_batches(url).loc[0, "published_at"]

    again = publish(url, offers, "b1")
    assert again.status == "already published" and again.n_offers == len(offers)
    pd.testing.assert_frame_equal(crm.read_batch(url, "b1"), rows)
    batches = crm.list_batches(url)
    assert len(batches) == 1 and batches.loc[0, "published_at"] == published_at


def test_superseded_batch_can_be_made_current_again(url):
    """E.g. a model rollback reproduces an earlier batch id: the rerun makes it live again."""
    a, b = make_offers(50, seed=1), make_offers(60, seed=2, first=100)
    publish(url, a, "ba")
    publish(url, b, "bb")
    assert publish(url, a, "ba").status == "published"
    assert status_of(url) == {"ba": "published", "bb": "superseded"}
    pd.testing.assert_frame_equal(crm.current_offers(url), expected_rows(a, "ba", control=False))


def test_retention_deletes_the_oldest_batches(url):
    for i in range(5):
        publish(url, make_offers(20, seed=i, first=100 * i), f"b{i}", retention=3)
    batches = crm.list_batches(url)
    assert list(batches["batch_id"]) == ["b4", "b3", "b2"]
    assert dict(zip(batches["batch_id"], batches["status"], strict=True))["b4"] == "published"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            left = set(conn.execute(sa.text("SELECT DISTINCT batch_id FROM crm_offers")).scalars())
    finally:
        engine.dispose()
    assert left == {"b2", "b3", "b4"}  # rows of deleted batches are gone too


def test_retention_never_deletes_the_published_batch(url):
    """Newer failed batches may outnumber the window: the live batch still keeps its slot."""
    crm.start_batch(url, "live", AS_OF, {}, {})  # created first, published last
    for i in range(3):
        with pytest.raises(crm.PublishError):
            publish(url, make_offers(20, seed=i), f"f{i}", validate=lambda df: ["bad"])
    crm.load_rows(url, "live", make_offers(20, seed=9))
    res = crm.publish_batch(url, "live", validate=OK, retention=2)
    assert set(crm.list_batches(url)["batch_id"]) == {"live", "f2"}
    assert sorted(res.deleted) == ["f0", "f1"]
    assert crm.current_offers(url)["batch_id"].unique().tolist() == ["live"]


def test_ensure_schema_twice_is_a_noop(url):
    crm.ensure_schema(url)
    publish(url, make_offers(30, seed=1), "b1")

    def snapshot() -> dict:
        engine = sa.create_engine(url)
        try:
            insp = sa.inspect(engine)
            tables = {t: ([(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                          sorted((i["name"], i["unique"]) for i in insp.get_indexes(t)),
                          insp.get_pk_constraint(t)["constrained_columns"]) for t in insp.get_table_names()}
            views = {v: [c["name"] for c in insp.get_columns(v)] for v in insp.get_view_names()}
            return {**tables, **views}
        finally:
            engine.dispose()

    before = snapshot()
    assert {crm.BATCHES, crm.OFFERS, crm.VIEW} <= set(before)
    assert ("crm_offer_batches_one_published", True) in before[crm.BATCHES][1]
    assert before[crm.VIEW] == crm.VIEW_COLUMNS
    crm.ensure_schema(url)
    crm.ensure_schema(url)
    assert snapshot() == before
    assert status_of(url) == {"b1": "published"} and len(crm.current_offers(url)) > 0


def test_ensure_schema_migrates_a_missing_view_and_column(url):
    crm.ensure_schema(url)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP VIEW crm_current_offers"))
            conn.execute(sa.text("ALTER TABLE crm_offer_batches DROP COLUMN error"))
    finally:
        engine.dispose()
    crm.ensure_schema(url)
    with pytest.raises(crm.PublishError):
        publish(url, make_offers(10), "b1", validate=lambda df: ["nope"])
    assert crm.list_batches(url).loc[0, "error"].startswith("batch b1 not published")
    assert crm.current_offers(url).empty


@pytest.mark.parametrize("bad", ["x; DROP TABLE crm_offers", "Public", "1abc", "a-b", "", "a" * 64, 'a"b'])
def test_bad_identifiers_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="identifier"):
        crm.check_identifier(bad)
    with pytest.raises(ValueError, match="identifier"):
        crm.ensure_schema("postgresql+psycopg://nobody@127.0.0.1:1/none", schema=bad)  # never connects


def test_schema_option_is_refused_on_sqlite(tmp_path):
    with pytest.raises(ValueError, match="PostgreSQL"):
        crm.ensure_schema(f"sqlite:///{tmp_path / 'x.db'}", schema="crm")


@pytest.mark.postgres
def test_postgres_schema_option(pg_url):
    offers = make_offers(40, seed=5)
    publish(pg_url, offers, "b1", schema="crm")
    pd.testing.assert_frame_equal(crm.current_offers(pg_url, schema="crm"),
                                  expected_rows(offers, "b1", control=False))
    assert crm.current_offers(pg_url).empty  # nothing in public
    engine = sa.create_engine(pg_url)
    try:
        assert crm.VIEW in sa.inspect(engine).get_view_names(schema="crm")
    finally:
        engine.dispose()


def test_sharded_load_equals_one_shot_load(url):
    offers = make_offers(2_000, seed=7)
    publish(url, offers, "one")
    crm.start_batch(url, "sharded", AS_OF, {}, {})
    # Shards by a hash of customer_id, as the scoring workers split them; loaded out of order.
    shard = pd.util.hash_pandas_object(offers["customer_id"], index=False) % 4
    total = sum(crm.load_rows(url, "sharded", offers[shard == s]) for s in (2, 0, 3, 1))
    assert total == len(offers)
    # A retried shard (the worker died after its commit) replaces its rows instead of duplicating them.
    assert crm.load_rows(url, "sharded", offers[shard == 0]) == int((shard == 0).sum())
    res = crm.publish_batch(url, "sharded", validate=OK)
    assert res.n_offers == len(offers)
    pd.testing.assert_frame_equal(crm.read_batch(url, "sharded"), crm.read_batch(url, "one"))


def test_load_refuses_a_batch_that_is_not_loading(url):
    offers = make_offers(10)
    with pytest.raises(ValueError, match="not loading"):
        crm.ensure_schema(url) or crm.load_rows(url, "nope", offers)
    publish(url, offers, "b1")
    with pytest.raises(ValueError, match="published, not loading"):
        crm.load_rows(url, "b1", offers)
    with pytest.raises(crm.PublishError, match="not loading"):
        crm.publish_batch(url, "b1", validate=OK)
    assert status_of(url) == {"b1": "published"}  # a refused re-publish demotes nothing


def test_duplicate_offer_keys_fail_the_load(url):
    offers = make_offers(10)
    dup = pd.concat([offers, offers.iloc[:1]])
    with pytest.raises(ValueError, match="share a"):
        publish(url, dup, "b1")
    assert status_of(url) == {"b1": "failed"}


def test_personal_and_extra_columns_never_reach_the_crm(url):
    offers = make_offers(10).assign(email="someone@example.com", birth_year=1970)
    publish(url, offers, "b1")
    engine = sa.create_engine(url)
    try:
        cols = {c["name"] for c in sa.inspect(engine).get_columns(crm.OFFERS)}
    finally:
        engine.dispose()
    assert cols == {"batch_id", *crm.OFFER_COLUMNS}
    with pytest.raises(ValueError, match="lacks column"):
        crm.prepare_offers(offers.drop(columns=["channel"]))


def test_batch_id_is_deterministic():
    policy = {"offers_per_customer": 3, "control_share": 0.1}
    models = {"upsell": "3", "cross_sell": "1"}
    a = crm.batch_id_for(AS_OF, "abc123", models, policy)
    assert re.fullmatch(r"b20251231-[0-9a-f]{12}", a)
    assert a == crm.batch_id_for(AS_OF, "abc123", {"cross_sell": "1", "upsell": "3"}, dict(policy))
    others = {crm.batch_id_for(AS_OF + dt.timedelta(days=1), "abc123", models, policy),
              crm.batch_id_for(AS_OF, "abc124", models, policy),
              crm.batch_id_for(AS_OF, "abc123", {**models, "upsell": "4"}, policy),
              crm.batch_id_for(AS_OF, "abc123", models, {**policy, "control_share": 0.2})}
    assert a not in others and len(others) == 4
    from ml.config import POLICY

    assert crm.batch_id_for(AS_OF, "x", {}, POLICY) == crm.batch_id_for(AS_OF, "x", {}, POLICY)


def test_output_suite_is_valid_and_catches_bad_offers():
    gx = pytest.importorskip("great_expectations")
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite = ExpectationSuite(**json.loads(SUITE.read_text()))
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (ctx.data_sources.add_pandas("p").add_dataframe_asset("crm_offers")
             .add_batch_definition_whole_dataframe("w"))
    good = crm.prepare_offers(make_offers(200, seed=1))
    assert batch.get_batch(batch_parameters={"dataframe": good}).validate(suite).success

    bad = good.copy()
    bad.loc[0, "customer_id"] = "jane.doe@example.com"
    bad.loc[1, "propensity"] = 1.5
    bad.loc[2, "channel"] = "fax"
    bad.loc[3, "valid_until"] = bad.loc[3, "valid_from"]
    bad.loc[5, ["customer_id", "rank"]] = bad.loc[4, ["customer_id", "rank"]].to_numpy()
    bad.loc[6, "rank"] = 0
    res = batch.get_batch(batch_parameters={"dataframe": bad}).validate(suite)
    failed = {(r.expectation_config.type, r.expectation_config.kwargs.get("column")) for r in res.results
              if not r.success}
    assert {("expect_column_values_to_not_match_regex", "customer_id"),
            ("expect_column_values_to_be_between", "propensity"),
            ("expect_column_values_to_be_in_set", "channel"),
            ("expect_column_pair_values_a_to_be_greater_than_b", None),
            ("expect_compound_columns_to_be_unique", None),
            ("expect_column_values_to_be_between", "rank")} <= failed


def test_default_validation_is_the_output_suite(tmp_path):
    """Without validate=, publish_batch runs ml.quality.run_suite('crm_offers', rows as written)."""
    pytest.importorskip("ml.quality")
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    good = make_offers(50, seed=1)
    assert publish(url, good, "b1", validate=None).status == "published"
    bad = make_offers(50, seed=2, first=100)
    bad.loc[3, "propensity"] = 1.5
    with pytest.raises(crm.PublishError) as info:
        publish(url, bad, "b2", validate=None)
    assert [(f.check, f.column) for f in info.value.failures] == [("out of range", "propensity")]
    assert status_of(url) == {"b1": "published", "b2": "failed"}


# ---------------------------------------------------------------- publish(): one part, validated in memory

def test_publish_validates_the_frame_it_writes_while_loading(url):
    """publish() validates the canonical frame in a worker thread; those are exactly the rows published."""
    offers = make_offers(400, seed=4)
    calls: list[tuple[str, pd.DataFrame]] = []

    def spy(df: pd.DataFrame) -> list:
        calls.append((threading.current_thread().name, df.copy()))
        return []

    publish(url, offers, "b1", validate=spy)
    [(thread, checked)] = calls
    assert thread != threading.main_thread().name  # ran beside the load, not after it
    written = crm.read_batch(url, "b1")
    ordered = checked.sort_values(["customer_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ordered, written)  # same rows, same canonical types
    pd.testing.assert_frame_equal(written, expected_rows(offers))


@pytest.mark.parametrize("how", ["failures", "raises"])
def test_failed_concurrent_validation_fails_the_batch_and_keeps_the_previous_one(url, how):
    first = make_offers(100, seed=1)
    publish(url, first, "b1")
    before = crm.current_offers(url)
    second = make_offers(120, seed=2, first=500)

    def check(df: pd.DataFrame) -> list:
        time.sleep(0.2)  # still validating when the load is done: the flip must wait for the verdict
        if how == "raises":
            raise RuntimeError("suite crashed")
        return [SimpleNamespace(table="crm_offers", check="out of range", column="propensity", count=1,
                                examples=[1.5], detail="")]

    with pytest.raises(crm.PublishError) as info:
        publish(url, second, "b2", validate=check)
    assert info.value.batch_id == "b2"
    assert status_of(url) == {"b1": "published", "b2": "failed"}
    pd.testing.assert_frame_equal(crm.current_offers(url), before)
    error = crm.list_batches(url).set_index("batch_id").loc["b2", "error"]
    assert ("suite crashed" in error) if how == "raises" else ("propensity" in error)
    if how == "failures":  # the rows stay with the failed batch for inspection, as after a read-back
        pd.testing.assert_frame_equal(crm.read_batch(url, "b2"), expected_rows(second))
    assert publish(url, second, "b2").status == "published"  # rerun once fixed
    assert status_of(url) == {"b1": "superseded", "b2": "published"}


def test_reader_never_sees_the_batch_before_its_concurrent_validation_passed(url):
    old, new = make_offers(200, seed=1), make_offers(5_000, seed=2, first=10_000)
    publish(url, old, "old")
    visible: list[tuple] = []

    def slow_check(df: pd.DataFrame) -> list:
        deadline = time.monotonic() + 1.0
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    visible.append(tuple(conn.execute(sa.text(
                        "SELECT batch_id, COUNT(*) FROM crm_current_offers GROUP BY batch_id")).all()))
                    conn.rollback()
                    time.sleep(0.02)
        finally:
            engine.dispose()
        return []

    publish(url, new, "new", validate=slow_check)
    assert len(visible) >= 5
    assert set(visible) == {(("old", int((~old["is_control"]).sum())),)}
    assert set(crm.current_offers(url)["batch_id"]) == {"new"}


def test_publish_rejects_bad_rows_before_loading_anything(url):
    publish(url, make_offers(50, seed=1), "b1")
    dup = make_offers(20, seed=2, first=100)
    dup.loc[1, ["customer_id", "rank"]] = dup.loc[0, ["customer_id", "rank"]].to_numpy()
    with pytest.raises(ValueError, match="share a"):
        publish(url, dup, "b2")
    assert status_of(url) == {"b1": "published", "b2": "failed"}
    assert len(crm.read_batch(url, "b2")) == 0
