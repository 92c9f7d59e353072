"""offerflow's Airflow UI plugin: navigation links to the MLflow UI and to the data-quality report.

- "MLflow" opens the tracking UI (runs, metrics, plots, registered models and their aliases);
  URL from ``OFFERFLOW_MLFLOW_UI_URL`` (default http://localhost:5000).
- "Data quality" opens the reports of the latest validations (written by the validation operator
  in ``offerflow_operators``: one JSON per run plus an ``index.html``, newest first). When
  ``OFFERFLOW_DQ_REPORT_URL`` is set (e.g. a Data Docs site on object storage) the link goes
  there; otherwise the API server serves the report folder (``OFFERFLOW_DQ_REPORT_DIR``, default
  ``$OFFERFLOW_HOME/quality`` or ``./var/quality``) under ``/offerflow/quality/`` and the page is
  shown inside the Airflow UI.
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin
from offerflow_operators import quality_report_dir

DQ_URL_PREFIX = "/offerflow/quality"


def mlflow_ui_url() -> str:
    return os.environ.get("OFFERFLOW_MLFLOW_UI_URL", "http://localhost:5000").rstrip("/")


def _external_views() -> list[dict]:
    external_dq = os.environ.get("OFFERFLOW_DQ_REPORT_URL")
    dq_view = {"name": "Data quality", "category": "offerflow", "destination": "nav"}
    if external_dq:
        dq_view["href"] = external_dq
    else:
        dq_view.update(href=f"{DQ_URL_PREFIX}/index.html", url_route="offerflow-data-quality")
    return [
        {"name": "MLflow", "href": mlflow_ui_url(), "category": "offerflow", "destination": "nav"},
        dq_view,
    ]


def _fastapi_apps() -> list[dict]:
    if os.environ.get("OFFERFLOW_DQ_REPORT_URL"):
        return []
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="offerflow data-quality report")
    app.mount("/", StaticFiles(directory=quality_report_dir(), html=True, check_dir=False), name="quality")
    return [{"app": app, "url_prefix": DQ_URL_PREFIX, "name": "offerflow data-quality report"}]


class OfferflowPlugin(AirflowPlugin):
    name = "offerflow"
    external_views = _external_views()
    fastapi_apps = _fastapi_apps()
