"""Airflow-side glue shared by the offerflow DAGs: the Great Expectations validation operator,
the common Params and templates, and the CRM connection lookup.

Everything heavy (pandas, great_expectations, ``ml``) is imported inside ``execute()`` or inside
the helper functions, which only run in tasks, so importing this module costs nothing at DAG
parse time. Importable from DAG files because Airflow puts the plugins folder on ``sys.path``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, BaseOperator, Param
from airflow.sdk.exceptions import AirflowFailException

CRM_CONN_ID = "offerflow_crm"

# Assets linking the DAGs: offers_train emits CHAMPIONS (offers_score is scheduled on it),
# offers_score emits CRM_OFFERS after each publish.
CHAMPIONS = Asset("offerflow/champions")
CRM_OFFERS = Asset("offerflow/crm_offers")

# The offer types of ml.contract.OFFER_TYPES, spelled out so DAG files can map over them without
# importing ``ml`` at parse time (tests/test_dags.py checks that both lists agree).
OFFER_TYPES = ["cross_sell", "upsell", "downsell"]

# Rendered at run time. ``as_of`` defaults to the run's logical date; asset-triggered and some
# manual runs have no logical date in Airflow 3, so fall back to ``run_after`` (when the run was due).
AS_OF = "{{ params.as_of or ((dag_run.logical_date or dag_run.run_after) | ds) }}"
DATA = "{{ params.data }}"

_DATE_PATTERN = r"^$|^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"


def run_params() -> dict[str, Param]:
    """The Params every offerflow DAG takes: the cutoff date and the data source."""
    return {
        "as_of": Param(
            "", type="string", pattern=_DATE_PATTERN, title="As-of date (cutoff T)",
            description="YYYY-MM-DD; empty = the run's logical date. Rows at or after it are ignored.",
        ),
        "data": Param(
            os.environ.get("OFFERFLOW_DATA", ""), type="string", title="Data source",
            description="A folder of Parquet files or a SQLAlchemy URL (default: $OFFERFLOW_DATA).",
        ),
    }


def crm_url() -> str:
    """The CRM target as a SQLAlchemy URL: Airflow connection ``offerflow_crm`` if defined, else
    ``$OFFERFLOW_CRM_URL``, else the embedded SQLite default (``ml.config.crm_url``)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from ml.pipeline import crm_url_from_airflow

    try:
        conn = BaseHook.get_connection(CRM_CONN_ID)
    except AirflowNotFoundException:
        return crm_url_from_airflow(None)
    if conn.conn_type == "sqlite":
        # get_uri() percent-encodes the path ("sqlite:///%2Ftmp%2F..."), which SQLAlchemy would read as a
        # relative file name. The path is in ``schema`` for URI/env connections, in ``host`` for UI ones.
        return f"sqlite:///{conn.schema or conn.host}"
    return crm_url_from_airflow(conn.get_uri())


def quality_report_dir() -> Path:
    """Where validation reports go (served by offerflow_plugin under /offerflow/quality/)."""
    default = Path(os.environ.get("OFFERFLOW_HOME", "var")) / "quality"
    return Path(os.environ.get("OFFERFLOW_DQ_REPORT_DIR", str(default))).resolve()


def write_quality_report(report: dict, dag_id: str, run_id: str, keep: int = 50) -> Path:
    """Keep the report of one validation as JSON and rebuild ``index.html`` (newest first)."""
    folder = quality_report_dir()
    runs = folder / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dag_id}__{run_id}")
    path = runs / f"{safe}.json"
    path.write_text(json.dumps({"dag_id": dag_id, "run_id": run_id, **report}, indent=2, default=str))
    reports = sorted(runs.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in reports[keep:]:
        old.unlink(missing_ok=True)
    items = []
    for p in reports[:keep]:
        r = json.loads(p.read_text())
        colour = "#1a7f37" if r.get("success") else "#cf222e"
        title = html.escape(f"{r['dag_id']} · {r['run_id']}")
        items.append(f'<h3 style="color:{colour}">{title}</h3>'
                     f'<pre>{html.escape(r.get("summary", ""))}</pre>'
                     f'<p><a href="runs/{html.escape(p.name)}">JSON</a></p>')
    page = ("<!doctype html><meta charset=utf-8><title>offerflow data quality</title>"
            "<body style=\"font-family:sans-serif\"><h1>offerflow data-quality reports</h1>"
            + "\n".join(items) + "</body>")
    (folder / "index.html").write_text(page)
    return path


def airflow_run_tags(context: Any) -> dict[str, str]:
    """MLflow tags naming the Airflow run that produced a model."""
    ti = context["ti"]
    return {"airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id, "airflow_task_id": ti.task_id}


class GreatExpectationsValidationOperator(BaseOperator):
    """Run the offerflow data-quality gate (GE suites in ``expectations/`` + cross-table checks).

    Succeeds with the report as XCom (``{"success", "tables", "summary", ...}``); fails the task,
    without retries, with the readable summary (table, check, row count, examples) when the data
    fails a check, so nothing downstream runs.

    :param data: the data source (folder of Parquet files or SQLAlchemy URL); templated.
    :param as_of: the cutoff date YYYY-MM-DD; rows at or after it are ignored; templated.
    """

    template_fields = ("data", "as_of")
    ui_color = "#e8f4ea"

    def __init__(self, *, data: str = DATA, as_of: str = AS_OF, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.as_of = as_of

    def execute(self, context: Any) -> dict:
        from ml import pipeline, quality

        if not self.data:
            raise AirflowFailException(
                "no data source: pass the DAG param 'data' or set OFFERFLOW_DATA for the Airflow workers")
        self.log.info("Validating %s as of %s", self.data, self.as_of)
        ti = context["ti"]
        try:
            report = pipeline.validate_inputs(self.data, self.as_of)
        except quality.DataQualityError as exc:
            self.log.error("Data quality gate FAILED, nothing downstream runs:\n%s", exc)
            failed = {**_report_dict(exc), "success": False, "summary": str(exc)}
            self._keep_report(failed, ti)
            msg = f"data quality gate failed for {self.data} as of {self.as_of}:\n{exc}"
            raise AirflowFailException(msg) from None
        self.log.info("Data quality gate passed:\n%s", report.get("summary", ""))
        self._keep_report(report, ti)
        return report

    def _keep_report(self, report: dict, ti: Any) -> None:
        try:
            path = write_quality_report(report, ti.dag_id, ti.run_id)
        except OSError as exc:  # the report page is a convenience; never fail the gate over it
            self.log.warning("could not write the data-quality report page: %s", exc)
        else:
            self.log.info("Data-quality report: %s (Airflow UI: offerflow → Data quality)", path)


def _report_dict(exc: Exception) -> dict:
    report = getattr(exc, "report", None)
    to_dict = getattr(report, "to_dict", None)
    return to_dict() if callable(to_dict) else {}
