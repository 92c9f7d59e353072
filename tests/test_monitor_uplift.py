"""Issue #7, Done-when (1) and (3): the monitor measures a known uplift, and says nothing personal.

One simulated shop, seen by the real pipeline as of D: champions trained (``small_config``), offers
scored and published into a SQLite CRM (a 50% control group, so that treated and control are
both large). The simulator then runs the same shop again with that batch as ``external_offers``:
identical up to D, after it the non-control customers get the offers and answer with the simulator's
true uplift (once with ``TRUE_UPLIFT``, once with zero). The monitor as of D + H measures treated vs
control; the simulator's exact oracle gives the true uplift of the treated customers it should find.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import shutil

import pandas as pd
import pytest

from ml.contract import OFFER_TYPES, write_parquet

pytestmark = pytest.mark.slow

START, PRE_DAYS, H, SEED = dt.date(2025, 1, 6), 196, 28, 11
N_CUSTOMERS = 6000
CONTROL_SHARE = 0.5
ZERO = dict.fromkeys(OFFER_TYPES, 0.0)
EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
CUSTOMER_ID = re.compile(rb"C\d{7}")  # the simulator's customer ids (7 digits below 10M customers)


class _Lines(logging.Handler):
    """Collects the ``offerflow`` logger's lines (INFO and up) while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Lines:
        logger = logging.getLogger("offerflow")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("offerflow")
        logger.removeHandler(self)
        logger.setLevel(self._level)


@pytest.fixture(scope="module")
def shop(tmp_path_factory, mlflow_template_db):
    """Train, score and publish as of D, then simulate the horizon with and without a true effect."""
    import mlflow

    from ml import registry
    from ml.config import POLICY
    from ml.crm import read_batch
    from ml.monitor import monitor
    from ml.score import score
    from ml.simulate import run_simulation
    from ml.train import small_config, train_offer_types

    home = tmp_path_factory.mktemp("uplift")
    var = home / "var"
    var.mkdir()
    shutil.copy(mlflow_template_db, var / "mlflow.db")
    lines = _Lines()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFERFLOW_HOME", str(var))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{var}/mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{var}/mlflow.db")
        days = PRE_DAYS + H  # the shop's own campaigns stop at its cutoff D = day PRE_DAYS
        base = run_simulation(N_CUSTOMERS, days, SEED, START, H)
        d = base.cutoff
        write_parquet(base.tables, home / "shop_at_d")
        for r in train_offer_types(str(home / "shop_at_d"), d, list(OFFER_TYPES), cfg=small_config()):
            if r.version and registry.champion_version(r.offer_type) is None:
                registry.promote(r.offer_type, r.version, "test: a tiny shop's model is good enough")
        url = f"sqlite:///{home / 'crm.db'}"
        published = score(str(home / "shop_at_d"), d, crm_url=url,
                          cfg=dataclasses.replace(POLICY, control_share=CONTROL_SHARE))
        batch = read_batch(url, published.batch_id)
        out = {"home": home, "url": url, "d": d, "base": base, "batch": batch, "batch_id": published.batch_id}
        with lines:
            for name, uplift in (("true", None), ("zero", ZERO)):
                sim = run_simulation(N_CUSTOMERS, days, SEED, START, H, external_offers=batch,
                                     external_uplift=uplift)
                write_parquet(sim.tables, home / f"shop_{name}")
                res = monitor(str(home / f"shop_{name}"), d + dt.timedelta(days=H), crm_url=url,
                              recompute=True, log_mlflow=name == "true")
                out[name] = {"sim": sim, "res": res}
        out["log"] = "\n".join(lines.lines)
        yield out
        mlflow.set_tracking_uri(None)


def _measured_vs_true(run: dict) -> pd.DataFrame:
    """Per offer type (all channels): the monitor's row next to the true uplift of its treated customers."""
    truth = run["sim"].external_truth.astype({"offer_type": "string"})
    treated = truth[~truth["is_control"]]
    att = (treated["p_treated"] - treated["p_control"]).groupby(treated["offer_type"]).mean()
    o = run["res"].outcomes
    o = o[o["channel"] == "all"].set_index("offer_type")
    o["true_uplift"] = att.reindex(o.index)
    o["n_truth_treated"] = treated.groupby("offer_type").size().reindex(o.index)
    o["n_truth_control"] = truth[truth["is_control"]].groupby("offer_type").size().reindex(o.index)
    return o


def _report(o: pd.DataFrame) -> str:
    return "\n".join(f"{t}: true {r.true_uplift:+.4f} measured {r.uplift_abs:+.4f} "
                     f"[{r.uplift_ci_low:+.4f}, {r.uplift_ci_high:+.4f}] n_t={r.n_treated} n_c={r.n_control}"
                     for t, r in o.iterrows())


def test_the_history_before_d_is_what_the_models_saw(shop):
    """The offers change nothing before D (same draws), so the scores as of D stand for both runs."""
    before = pd.Timestamp(shop["d"])
    for name in ("true", "zero"):
        a, b = shop["base"].tables, shop[name]["sim"].tables
        pd.testing.assert_frame_equal(a["customers"], b["customers"])
        pd.testing.assert_frame_equal(a["orders"][a["orders"]["order_ts"] < before],
                                      b["orders"][b["orders"]["order_ts"] < before])
        pd.testing.assert_frame_equal(shop["base"].ground_truth, shop[name]["sim"].ground_truth)
    # every treated offer of the batch was sent (and only those): the monitor counts exposure "sent"
    hist = shop["true"]["sim"].tables["offer_history"]
    sent = hist[hist["sent_at"] >= before]
    batch = shop["batch"]
    assert len(sent) == int((~batch["is_control"]).sum())
    assert set(sent["customer_id"].astype(str)) == set(batch.loc[~batch["is_control"], "customer_id"])


def test_measured_uplift_ci_contains_the_true_uplift(shop):
    o = _measured_vs_true(shop["true"])
    print(_report(o))
    assert set(o.index) == set(OFFER_TYPES), o.index
    assert (o["exposure"] == "sent").all()
    # the monitor's groups are the simulator's treated and control customers
    assert (o["n_treated"] == o["n_truth_treated"]).all() and (o["n_control"] == o["n_truth_control"]).all()
    for t, r in o.iterrows():
        assert r.true_uplift > 0, t
        assert r.uplift_ci_low <= r.true_uplift <= r.uplift_ci_high, f"{t}\n{_report(o)}"
    # not trivially wide: cross-sell (the largest true effect, u·(1 − p0) with p0 small) is detected
    cs = o.loc["cross_sell"]
    assert cs.uplift_ci_low > 0, _report(o)
    assert cs.uplift_ci_high - cs.uplift_ci_low < 0.15, _report(o)


def test_with_zero_true_uplift_the_ci_contains_zero(shop):
    o = _measured_vs_true(shop["zero"])
    print(_report(o))
    assert set(o.index) == set(OFFER_TYPES)
    assert (o["true_uplift"] == 0).all()
    for t, r in o.iterrows():
        assert r.uplift_ci_low <= 0 <= r.uplift_ci_high, f"{t}\n{_report(o)}"
    # same customers, same baseline orders: only the answers to the offers differ between the runs
    true = _measured_vs_true(shop["true"])
    assert (true["conv_control"] == o["conv_control"]).all()
    assert (true["conv_treated"] >= o["conv_treated"]).all()


def _personal_tokens(tables: dict[str, pd.DataFrame]) -> dict[str, set[bytes]]:
    c = tables["customers"]
    return {"customer id": {s.encode() for s in c["customer_id"].astype(str)},
            "email": {s.encode() for s in c["email"].dropna().astype(str)}}


def _assert_clean(data: bytes, where: str, tokens: dict[str, set[bytes]]) -> None:
    assert not EMAIL.search(data), f"email-like text in {where}"
    found = set(CUSTOMER_ID.findall(data))
    assert not found, f"customer ids {sorted(found)[:3]} in {where}"
    for kind, values in tokens.items():
        hits = [v for v in values if v in data]
        assert not hits, f"{kind} {hits[:3]} in {where}"
    for column in (b"customer_id", b"birth_year", b"signup_date"):  # ("email" is also a channel)
        assert column not in data, f"personal column name {column!r} in {where}"


def test_monitoring_output_has_no_personal_data(shop):
    """MLflow run (params, metrics, tags, every artifact), crm_offer_outcomes and the log: aggregates only."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from ml.cli import app
    from ml.monitor import read_outcomes

    tables = shop["true"]["sim"].tables
    tokens = _personal_tokens(tables)
    client = MlflowClient()
    run = client.get_run(shop["true"]["res"].run_id)
    meta = json.dumps({"params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags},
                      sort_keys=True).encode()
    _assert_clean(meta, "the run's params/metrics/tags", tokens)
    folder = shop["home"] / "artifacts"
    client.download_artifacts(run.info.run_id, "", str(folder))
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"drift_table.csv", "outcomes.csv", "monitor_result.json", "uplift_over_batches.png"} <= names
    assert any(n.startswith("psi_") and n.endswith(".png") for n in names)
    for path in files:
        _assert_clean(path.read_bytes(), str(path.relative_to(folder)), tokens)
    # the tables behind the plots: the drift and outcome tables are the plotted aggregates
    outcomes = pd.read_csv(folder / "outcomes" / "outcomes.csv")
    assert (outcomes[["n_treated", "n_control"]].min(axis=1) >= 1).all()  # groups, never single rows
    stored = read_outcomes(shop["url"])
    assert len(stored) and not {"customer_id", "email"} & set(stored.columns)
    _assert_clean(stored.to_csv(index=False).encode(), "crm_offer_outcomes", tokens)
    assert shop["log"] and "uplift" in shop["log"]
    _assert_clean(shop["log"].encode(), "the monitor's log", tokens)

    # the CLI's output (stdout, stderr and log lines) for the same shop and CRM
    with _Lines() as lines:
        as_of = (shop["d"] + dt.timedelta(days=H)).isoformat()
        result = CliRunner().invoke(app, ["monitor", "--data", str(shop["home"] / "shop_true"),
                                          "--as-of", as_of, "--crm", shop["url"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_batches_measured"] == 1
    _assert_clean((result.output + "\n".join(lines.lines)).encode(), "the CLI's output", tokens)


def test_a_control_customer_is_never_sent_an_offer(shop):
    """The held-out group stays unexposed: no offer_history row, no answer to an offer."""
    batch = shop["batch"]
    control = set(batch.loc[batch["is_control"], "customer_id"])
    assert control
    hist = shop["true"]["sim"].tables["offer_history"]
    recent = hist[hist["sent_at"] >= pd.Timestamp(shop["d"])]
    assert not control & set(recent["customer_id"].astype(str))
    # their orders after D are the same whether the treated customers' offers work or not
    a, b = (shop[k]["sim"].tables["orders"] for k in ("true", "zero"))
    keep = [x[x["customer_id"].astype(str).isin(control)][["customer_id", "order_ts"]].reset_index(drop=True)
            for x in (a, b)]
    pd.testing.assert_frame_equal(*keep)
