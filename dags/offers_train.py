"""
### offers_train — weekly: validate, train one propensity model per offer type, promotion gate

1. **validate_inputs** — the Great Expectations gate over the input tables (`expectations/`).
   A failure stops the run here with a readable summary; no model is trained.
2. **train** (mapped over `cross_sell`, `upsell`, `downsell`) — point-in-time training set,
   LightGBM fit, out-of-time evaluation, logged to MLflow (experiment `offerflow/<type>`, tags
   with this dag_id/run_id) and registered as `offerflow-<type>` with alias `challenger`.
3. **gate** (mapped) — moves alias `champion` to the new version only when it beats the
   baseline, is not worse than the current champion beyond the tolerance, and is calibrated.
4. **publish_champions** — emits the Asset `offerflow/champions` (which schedules `offers_score`)
   when at least one champion moved; skipped otherwise.

Params: `as_of` (YYYY-MM-DD, empty = the run's logical date) and `data` (a Parquet folder or
a SQLAlchemy URL, default `$OFFERFLOW_DATA`). Runs and models: see the MLflow UI link in the
navigation bar.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task
from offerflow_operators import (
    AS_OF,
    CHAMPIONS,
    DATA,
    OFFER_TYPES,
    GreatExpectationsValidationOperator,
    airflow_run_tags,
    run_params,
)


@dag(
    dag_id="offers_train",
    schedule=CronTriggerTimetable("0 2 * * 1", timezone="UTC"),  # Mondays 02:00 UTC
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["offerflow", "training", "mlflow"],
    doc_md=__doc__,
    params=run_params(),
)
def offers_train():
    validate = GreatExpectationsValidationOperator(task_id="validate_inputs", data=DATA, as_of=AS_OF)

    @task(map_index_template="{{ task.op_kwargs['offer_type'] }}")
    def train(offer_type: str, data: str, as_of: str) -> dict:
        from ml.pipeline import train_offer

        return train_offer(data, as_of, offer_type, run_tags=airflow_run_tags(get_current_context()))

    @task(map_index_template="{{ task.op_kwargs['train_result']['offer_type'] }}")
    def gate(train_result: dict) -> dict:
        from ml.pipeline import gate_offer

        result = gate_offer(train_result)
        decision = result.get("decision") or result  # the verdict, nested or flat
        promoted, reasons = bool(decision["promoted"]), list(decision.get("reasons", []))
        print(f"{result['offer_type']} v{result['version']}: "
              f"{'PROMOTED to champion' if promoted else 'not promoted'}; " + "; ".join(reasons))
        return {**result, "promoted": promoted, "reasons": reasons}

    @task(outlets=[CHAMPIONS])
    def publish_champions(decisions: list[dict]) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        decisions = list(decisions)
        promoted = {d["offer_type"]: str(d["version"]) for d in decisions if d["promoted"]}
        if not promoted:
            raise AirflowSkipException("no champion moved; offers_score keeps its daily schedule")
        get_current_context()["outlet_events"][CHAMPIONS].extra = {"promoted": promoted}
        return {"promoted": promoted, "decisions": decisions}

    trained = train.partial(data=DATA, as_of=AS_OF).expand(offer_type=OFFER_TYPES)
    validate >> trained
    publish_champions(gate.expand(train_result=trained))


offers_train()
