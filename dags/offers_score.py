"""
### offers_score — daily and when new champions arrive: score, decide, publish to the CRM

1. **validate_inputs** — the Great Expectations gate; a failure stops the run and nothing is
   published (the CRM keeps showing the previous batch).
2. **score_parts** → **score** (mapped over offer type × customer shard; Param `n_shards`, shards
   by a hash of customer_id) — champion propensities (`models:/offerflow-<type>@champion`), one
   Parquet file per part. Offer types without a champion yet are left out (logged).
3. **open_batch** — one deterministic batch id (data, models, policy) opened as `loading` in
   `crm_offers` (a rerun of the same inputs reuses it; a published one is left alone).
4. **decide_and_load** (mapped over customer shards) — eligibility (consent, caps, cooldown),
   expected value, arbitration, control group, reason codes for the shard's customers; appends
   its rows to the batch. Every rule is per customer, so the shards together are the unsharded
   decision, and a worker holds one shard's candidates only.
5. **publish** — the output suite, then one transaction supersedes the old batch and publishes
   this one; emits the Asset `offerflow/crm_offers`.

Scheduled daily at 05:00 UTC **and** on every `offerflow/champions` event from `offers_train`.
CRM target: the Airflow connection `offerflow_crm` (else `$OFFERFLOW_CRM_URL`, else the embedded
SQLite default). Params: `as_of`, `data`, `n_shards`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from offerflow_operators import (
    AS_OF,
    CHAMPIONS,
    CRM_OFFERS,
    DATA,
    OFFER_TYPES,
    GreatExpectationsValidationOperator,
    crm_url,
    run_params,
)


@dag(
    dag_id="offers_score",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 5 * * *", timezone="UTC"), assets=[CHAMPIONS]),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["offerflow", "scoring", "crm"],
    doc_md=__doc__,
    params={
        **run_params(),
        "n_shards": Param(1, type="integer", minimum=1, maximum=1024, title="Customer shards",
                          description="Scoring tasks per offer type (hash of customer_id)."),
    },
)
def offers_score():
    validate = GreatExpectationsValidationOperator(task_id="validate_inputs", data=DATA, as_of=AS_OF)

    @task
    def score_parts(params: dict | None = None) -> list[dict]:
        """(offer type, shard) pairs to score: the types that have a champion model."""
        from airflow.sdk.exceptions import AirflowFailException

        from ml import registry

        n = int(params["n_shards"])
        # Resolve each champion once: every shard then scores with the same version, even if the
        # alias moves while this run is in flight.
        versions = {t: registry.champion_version(t) for t in OFFER_TYPES}
        types = [t for t in OFFER_TYPES if versions[t]]
        if not types:
            raise AirflowFailException("no offer type has a champion model yet: run offers_train first")
        if len(types) < len(OFFER_TYPES):
            print(f"no champion yet for {sorted(set(OFFER_TYPES) - set(types))}: not scored today")
        return [{"offer_type": t, "shard": s, "n_shards": n, "version": str(versions[t])}
                for t in types for s in range(n)]

    @task(map_index_template="{{ task.op_kwargs['offer_type'] }} {{ task.op_kwargs['shard'] }}")
    def score(offer_type: str, shard: int, n_shards: int, version: str, data: str, as_of: str) -> dict:
        from ml.pipeline import score_offer

        return score_offer(data, as_of, offer_type, shard=shard, n_shards=n_shards, version=version)

    @task
    def open_batch(scored: list[dict], data: str, as_of: str) -> list[dict]:
        from ml import pipeline

        jobs = pipeline.open_batch(data, as_of, list(scored), crm_url=crm_url())
        print(f"batch {jobs[0]['batch_id']}: {jobs[0]['status']}, {len(jobs)} shard(s) to load")
        return jobs

    @task(map_index_template="shard {{ task.op_kwargs['job']['shard'] }}")
    def decide_and_load(job: dict, data: str, as_of: str) -> dict:
        from ml import pipeline

        result = pipeline.load_shard(data, as_of, job, crm_url=crm_url())
        print(f"batch {result['batch_id']} shard {result['shard']}: {result['status']}, "
              f"{result['n_offers']} offers ({result['n_control']} control)")
        return result

    @task(outlets=[CRM_OFFERS])
    def publish(loads: list[dict]) -> dict:
        from ml import pipeline

        return pipeline.publish(list(loads), crm_url=crm_url())

    parts = score_parts()
    validate >> parts
    scored = score.partial(data=DATA, as_of=AS_OF).expand_kwargs(parts)
    jobs = open_batch(scored, data=DATA, as_of=AS_OF)
    publish(decide_and_load.partial(data=DATA, as_of=AS_OF).expand(job=jobs))


offers_score()
