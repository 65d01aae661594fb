#!/usr/bin/env bash
# Creates the two databases on the first start of an empty data volume (run by the postgres image from
# /docker-entrypoint-initdb.d). One role per service, each owning only its database, so a leaked MLflow
# password cannot read Prefect's state and vice versa. Passwords come from the environment (infra/.env)
# and are passed to psql as variables, never pasted into SQL text by the shell.
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
     -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
\connect prefect
-- Prefect's migrations use trigram indexes; create the extension as superuser up front.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
