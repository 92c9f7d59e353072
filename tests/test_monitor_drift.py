"""Issue #7, Done-when (2): a shop whose behaviour shifts after T raises the drift status and makes
``offers_monitor`` trigger ``offers_train`` (a real ``dag.test()`` run); the same shop unchanged does not.

Champions are trained as of D on the unchanged shop (``small_config``); the shifted shop is the same
shop (identical up to D: same random draws) with ``ml.simulate.default_shift`` from D on: 25–40%
dearer drinks, household and personal care, pet and baby demand trading places. The monitor runs
28 days later with its default thresholds. Its log output is checked for personal data too.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil

import pytest
from test_dags import _fresh, _states, airflow_db, dagbag  # noqa: F401 - module fixtures reused

from ml.contract import OFFER_TYPES

pytestmark = pytest.mark.slow

START, PRE_DAYS, GAP_DAYS, H, SEED, N_CUSTOMERS = dt.date(2024, 1, 1), 540, 28, 28, 11, 3000
D = START + dt.timedelta(days=PRE_DAYS)  # training date and start of the shift (mid-2025, no Christmas)
AS_OF = (D + dt.timedelta(days=GAP_DAYS)).isoformat()
CUSTOMER_ID = re.compile(r"C\d{7}")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


@pytest.fixture(scope="module")
def shops(airflow_db, dagbag, tmp_path_factory, mlflow_template_db):  # noqa: F811
    import mlflow

    from ml import registry
    from ml.simulate import default_shift, simulate_to
    from ml.train import small_config, train_offer_types

    home = tmp_path_factory.mktemp("drift")
    var = home / "var"
    var.mkdir()
    shutil.copy(mlflow_template_db, var / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFERFLOW_HOME", str(var))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{var}/mlflow.db")
        mp.setenv("AIRFLOW_CONN_OFFERFLOW_CRM", f"sqlite:///{home}/crm.db")
        mp.delenv("OFFERFLOW_CRM_URL", raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{var}/mlflow.db")
        days = PRE_DAYS + GAP_DAYS + H  # the shop's own campaigns go on until the monitoring date
        simulate_to(home / "unchanged", N_CUSTOMERS, days, SEED, START, H)
        simulate_to(home / "shifted", N_CUSTOMERS, days, SEED, START, H, shift=default_shift(D))
        for r in train_offer_types(str(home / "unchanged"), D, list(OFFER_TYPES), cfg=small_config()):
            if r.version and registry.champion_version(r.offer_type) is None:
                registry.promote(r.offer_type, r.version, "test: a small shop's model is good enough")
        yield {"home": home}
        mlflow.set_tracking_uri(None)


def _monitor_run(data: str, capfd) -> tuple:
    """dag.test() of offers_monitor; -> (dag run, its MLflow monitoring run, drift table, output text)."""
    import mlflow
    import pandas as pd

    dr = _fresh("offers_monitor").test(run_conf={"as_of": AS_OF, "data": data})
    out = capfd.readouterr()
    assert dr.state == "success", _states(dr)  # dag.test() does not raise: check the states
    assert _states(dr)["validate_inputs"] == ["success"] and _states(dr)["monitor"] == ["success"]
    runs = mlflow.search_runs(experiment_names=["offerflow/monitoring"],
                              filter_string=f"tags.airflow_run_id = '{dr.run_id}'")
    assert len(runs) == 1
    run = mlflow.get_run(runs.iloc[0]["run_id"])
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="drift/drift_table.csv")
    return dr, run, pd.read_csv(path), out.out + out.err


def _counted(drift, cfg) -> dict[str, list[tuple[str, float]]]:
    """Per offer type: the features in alert that the retrain rule counts, with their PSI."""
    keep = ((drift["status"] == "alert") & (drift["kind"] != "score")
            & ~drift["feature"].isin(cfg.exempt_features))
    return {t: [(f, round(p, 2)) for f, p in zip(g["feature"], g["psi"], strict=True)]
            for t, g in drift[keep].groupby("offer_type")}


def _assert_no_personal_data(text: str, home) -> None:
    import pandas as pd

    assert not CUSTOMER_ID.search(text), "a customer id in the DAG run's output"
    assert not EMAIL.search(text), "an email address in the DAG run's output"
    customers = pd.read_parquet(home / "unchanged" / "customers.parquet")
    assert not any(c in text for c in customers["customer_id"].head(200))


def test_shifted_shop_raises_drift_and_triggers_retraining(shops, capfd):
    from airflow.models.dagrun import DagRun

    from ml.monitor import MonitorConfig

    dr, run, drift, text = _monitor_run(str(shops["home"] / "shifted"), capfd)
    counted = _counted(drift, MonitorConfig())
    print("shifted:", run.data.tags["drift_status"], counted)
    assert run.data.tags["drift_status"] == "alert" and run.data.tags["retrain"] == "true"
    assert _states(dr)["retrain_needed"] == ["success"]
    assert _states(dr)["trigger_retrain"] == ["success"]
    (triggered,) = DagRun.find(dag_id="offers_train", run_id=f"retrain__{dr.run_id}")
    assert triggered.conf == {"as_of": AS_OF, "data": str(shops["home"] / "shifted")}
    # the price change is what the features see: paid vs list price, offered vs usual price
    why = run.data.tags["why"]
    assert "features in drift alert" in why and "share_below_list" in why, why
    assert max(len(v) for v in counted.values()) >= MonitorConfig().min_alert_features
    # ... and the task log says why
    assert "retrain: True" in text and "share_below_list" in text, text[-2000:]
    _assert_no_personal_data(text, shops["home"])


def test_unchanged_shop_does_not_trigger_retraining(shops, capfd):
    from airflow.models.dagrun import DagRun

    from ml.monitor import MonitorConfig

    cfg = MonitorConfig()
    dr, run, drift, text = _monitor_run(str(shops["home"] / "unchanged"), capfd)
    counted = _counted(drift, cfg)
    behavioural = drift[(drift["kind"] != "score") & ~drift["feature"].isin(cfg.exempt_features)]
    print("unchanged:", run.data.tags["drift_status"], counted,
          "max PSI", behavioural.groupby("offer_type")["psi"].max().round(3).to_dict())
    assert run.data.tags["drift_status"] in ("ok", "warn") and run.data.tags["retrain"] == "false"
    assert _states(dr)["trigger_retrain"] == ["skipped"]
    assert not DagRun.find(dag_id="offers_train", run_id=f"retrain__{dr.run_id}")
    assert all(len(v) < cfg.min_alert_features - 1 for v in counted.values()), counted  # margin: >= 2
    assert (drift.loc[drift["kind"] == "score", "psi"] < cfg.psi_warn).all()
    assert "retrain: False" in text
    _assert_no_personal_data(text, shops["home"])
