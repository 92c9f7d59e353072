-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- one server, three databases — Airflow metadata, MLflow backend store, and the CRM target.
CREATE DATABASE airflow;
CREATE DATABASE mlflow;
CREATE DATABASE crm;
