"""
### offers_monitor — daily: drift and outcomes, retraining when the models go stale

1. **validate_inputs** — the Great Expectations gate over today's inputs.
2. **monitor** — feature and score drift (PSI) against the training reference, realised
   conversion of treated vs control customers of past CRM batches (uplift); logged to MLflow.
3. **retrain_needed** — short-circuit: when the monitor says `retrain`, logs why and lets
   **trigger_retrain** start `offers_train` with the same `as_of` and `data`; otherwise skips it.

Retraining goes through `TriggerDagRunOperator` (not an Asset) so the training run receives
this run's `as_of`/`data` as its conf and is linked from this task ("Triggered DAG"); the run id
`retrain__<this run id>` makes a task retry idempotent.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task
from offerflow_operators import (
    AS_OF,
    DATA,
    GreatExpectationsValidationOperator,
    airflow_run_tags,
    crm_url,
    run_params,
)


@dag(
    dag_id="offers_monitor",
    schedule=CronTriggerTimetable("0 4 * * *", timezone="UTC"),  # daily 04:00 UTC, before scoring
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["offerflow", "monitoring", "mlflow"],
    doc_md=__doc__,
    params=run_params(),
)
def offers_monitor():
    validate = GreatExpectationsValidationOperator(task_id="validate_inputs", data=DATA, as_of=AS_OF)

    @task
    def monitor(data: str, as_of: str) -> dict:
        from ml import pipeline

        return pipeline.monitor(data, as_of, crm_url=crm_url(),
                                run_tags=airflow_run_tags(get_current_context()))

    @task.short_circuit
    def retrain_needed(report: dict) -> bool:
        print(f"retrain: {report['retrain']} — {report.get('why', '')}")
        return bool(report["retrain"])

    trigger = TriggerDagRunOperator(
        task_id="trigger_retrain",
        trigger_dag_id="offers_train",
        trigger_run_id="retrain__{{ run_id }}",
        conf={"as_of": AS_OF, "data": DATA},
        skip_when_already_exists=True,
        wait_for_completion=False,
    )

    report = monitor(data=DATA, as_of=AS_OF)
    validate >> report
    retrain_needed(report) >> trigger


offers_monitor()
