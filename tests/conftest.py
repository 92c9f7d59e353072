"""Shared fixtures. Environment first: Airflow and MLflow read it at import time."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import uuid
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TMP_HOME = tempfile.mkdtemp(prefix="offerflow_tests_")
os.environ.update({
    "AIRFLOW_HOME": os.path.join(_TMP_HOME, "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    "OFFERFLOW_HOME": os.path.join(_TMP_HOME, "var"),  # nothing a test does lands in ./var
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
})
for _var in ("MLFLOW_TRACKING_URI", "OFFERFLOW_CRM_URL", "OFFERFLOW_DATA"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402

PG_ADMIN_URL = os.environ.get("OFFERFLOW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin_engine():
    import sqlalchemy as sa

    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _require_postgres() -> None:
    import sqlalchemy as sa

    try:
        eng = _pg_admin_engine()
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
    except Exception as exc:
        msg = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc.__class__.__name__}: {exc}"
        if ON_CI:
            pytest.fail(msg + " (CI=true: PostgreSQL tests must run)", pytrace=False)
        pytest.skip(msg)


def _create_database() -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"offerflow_test_{uuid.uuid4().hex[:12]}"
    eng = _pg_admin_engine()
    with eng.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(name: str) -> None:
    import sqlalchemy as sa

    eng = _pg_admin_engine()
    with eng.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name, dropped afterwards (skips without a server)."""
    _require_postgres()
    name, url = _create_database()
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database with a random name, dropped afterwards."""
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> pathlib.Path:
    """An empty, migrated MLflow SQLite store: creating one costs 3–20 s here, copying it 0.3 s."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, mlflow_template_db):
    """A private local MLflow store (SQLite + file artifacts under tmp_path) for one test."""
    import shutil

    home = tmp_path / "var"
    monkeypatch.setenv("OFFERFLOW_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template_db, home / "mlflow.db")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    yield home
    mlflow.set_tracking_uri(None)
