# One-liners over the offerflow CLI and pytest. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(PYTHON) -m uv
STAMP  := $(VENV)/.installed

.PHONY: help install demo test test-fast lint bench ui lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	$(UV) venv -q --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install -q --python $(PY) --compile-bytecode -r requirements.txt
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)  ## create ./.venv with the pinned stack and offerflow itself

demo: install  ## run the real DAGs on a synthetic shop (embedded SQLite Airflow, MLflow and CRM under ./var)
	$(PY) scripts/demo.py

test: install  ## run the whole test suite (PostgreSQL tests skip off CI when the server is down)
	$(VENV)/bin/python -m pytest -q

test-fast: install  ## the tests not marked slow
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: install  ## ruff
	$(VENV)/bin/ruff check ml dags plugins tests benchmarks scripts

bench: install  ## benchmarks: rows/s and ratios against raw LightGBM / COPY (see benchmarks/)
	$(VENV)/bin/python benchmarks/run.py

ui: install  ## start the MLflow UI (:5000) and the Airflow UI (:8080, standalone) on the ./var stores
	@echo "MLflow UI:  http://127.0.0.1:5000    Airflow UI: http://127.0.0.1:8080 (user admin, password printed below)"
	AIRFLOW_HOME=$(CURDIR)/var/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins AIRFLOW__CORE__LOAD_EXAMPLES=False OFFERFLOW_HOME=$(CURDIR)/var \
	OFFERFLOW_DATA=$(CURDIR)/var/shop $(VENV)/bin/airflow standalone & \
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/var/mlflow.db --host 127.0.0.1 --port 5000; kill %1

lock:  ## re-resolve requirements.txt from requirements.in
	$(UV) pip compile -q requirements.in -o requirements.txt --python-version 3.11

clean:  ## remove local stores (./var) and the venv
	rm -rf var $(VENV)
