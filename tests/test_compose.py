"""docker-compose.yaml: the production shape (DESIGN §11) without a Docker engine — parsed as YAML
(anchors and merge keys resolved the way Compose resolves them) and checked for services, commands,
health checks, start order, the shared environment, and secrets that only come from .env."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
AIRFLOW = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
LONG_RUNNING = ["postgres", "mlflow", *AIRFLOW]
# ${X}, ${X:-default}, ${X:?message}; not $${X} (escaped: a variable of the container's shell)
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _command(service: str) -> str:
    cmd = SERVICES[service].get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def test_services_exist():
    assert set(SERVICES) == {"postgres", "airflow-init", *AIRFLOW, "mlflow"}


def test_images_and_commands():
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    for name in ["airflow-init", *AIRFLOW, "mlflow"]:  # one image: Airflow 3.3.2 + the pinned stack + ml
        assert SERVICES[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert SERVICES[name]["image"] == "offerflow-airflow:3.3.2"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM apache/airflow:3.3.2-python3.11" in dockerfile and "requirements.txt" in dockerfile
    assert "airflow db migrate" in _command("airflow-init")
    assert "passwords.json" in _command("airflow-init")  # the admin user's password, from .env
    assert _command("airflow-apiserver").startswith("airflow api-server")
    assert _command("airflow-scheduler") == "airflow scheduler"
    assert _command("airflow-dag-processor") == "airflow dag-processor"
    assert _command("airflow-triggerer") == "airflow triggerer"
    mlflow = _command("mlflow")
    assert "mlflow server" in mlflow and "--serve-artifacts" in mlflow and "--artifacts-destination" in mlflow
    assert "MLFLOW_BACKEND_STORE_URI" in mlflow
    assert SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "--allowed-hosts" in mlflow and "mlflow:5000" in mlflow  # other containers call it by name


def test_postgres_creates_the_three_databases():
    (init,) = [v for v in SERVICES["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    sql = (ROOT / init.split(":")[0]).read_text()
    assert {m.lower() for m in re.findall(r"CREATE DATABASE (\w+)", sql)} == {"airflow", "mlflow", "crm"}


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_long_running_services_have_healthchecks(service):
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) >= 2
    assert check.get("interval") and check.get("retries")
    assert SERVICES[service].get("restart") == "unless-stopped"


def test_start_order():
    assert SERVICES["airflow-init"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert SERVICES["airflow-init"]["restart"] == "no"
    for name in AIRFLOW:
        deps = SERVICES[name]["depends_on"]
        assert deps["postgres"] == {"condition": "service_healthy"}
        assert deps["airflow-init"] == {"condition": "service_completed_successfully"}
    assert SERVICES["airflow-scheduler"]["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert SERVICES["mlflow"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("service", ["airflow-init", *AIRFLOW])
def test_shared_airflow_environment(service):
    env = SERVICES[service]["environment"]
    assert re.fullmatch(r"postgresql\+psycopg://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}"
                        r"@postgres:5432/airflow", env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert re.fullmatch(r"postgresql://\$\{POSTGRES_USER[^}]*\}:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/crm",
                        env["AIRFLOW_CONN_OFFERFLOW_CRM"])
    assert env["OFFERFLOW_DATA"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    for secret in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", env[secret]), secret  # required, from .env
    # every component shares the volume where scored parts and data-quality reports live
    assert any(v.endswith(":/opt/offerflow/var") for v in SERVICES[service]["volumes"])


def test_every_variable_is_defined_in_env_example():
    used = set(VAR.findall(COMPOSE_TEXT))
    assert used, "compose uses no ${VAR}?"
    assert used - set(_env_example()) == set()


def test_no_secret_committed():
    # In the compose file, credentials are only ${VAR} references (resolved from .env by Compose).
    for service, spec in SERVICES.items():
        env = spec.get("environment", {})
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|FERNET|TOKEN", key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), f"{service}: {key}={value}"
    text = re.sub(r"\$\{[^}]*\}", "VAR", COMPOSE_TEXT)  # what is left once every reference is removed
    for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", text):
        assert (user, password) == ("VAR", "VAR")
    assert not re.search(r"(?i)(password|secret|token)\w*\s*[=:]\s*(?!VAR\b)[\w.-]+", text), \
        re.search(r"(?i)(password|secret|token)\w*\s*[=:]\s*(?!VAR\b)[\w.-]+", text)
    # In .env.example: placeholders only; .env itself is git-ignored.
    for key, value in _env_example().items():
        if re.search(r"PASSWORD|SECRET|KEY", key):
            assert value == "change-me", f"{key} must be a placeholder in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_secret_check_catches_a_literal_password():
    """The check above must fail on what it guards against."""
    text = re.sub(r"\$\{[^}]*\}", "VAR", "url: postgresql://airflow:hunter2@postgres/airflow")
    assert re.findall(r"://([^:/@\s]+):([^@\s]+)@", text) == [("airflow", "hunter2")]
