# syntax=docker/dockerfile:1.7
# MLflow tracking + registry server: PostgreSQL backend, artifacts proxied to S3/MinIO, basic auth.
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/recycler/mlflow:3.17.2 .
# The server command and every secret come from compose (infra/compose.yaml) or the Kubernetes manifest.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# mlflow[auth] adds Flask-WTF for --app-name basic-auth; fastapi/SQLAlchemy pinned to the versions the
# project runs MLflow 3.17.2 with (newest ones are not verified with this server).
RUN python -m venv /opt/venv \
 && pip install "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
        "fastapi==0.150.0" "sqlalchemy==2.0.58"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 mlflow \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow \
 && mkdir -p /etc/mlflow /var/lib/mlflow \
 && chown 10001:10001 /var/lib/mlflow
COPY --from=build /opt/venv /opt/venv
# Users/permissions of basic auth live in SQLite on the /var/lib/mlflow volume (the file holds password
# hashes only). The admin is bootstrapped from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD on first start.
RUN printf '%s\n' '[mlflow]' 'default_permission = READ' \
        'database_uri = sqlite:////var/lib/mlflow/basic_auth.db' 'admin_username = admin' \
        'authorization_function = mlflow.server.auth:authenticate_request_basic_auth' \
        > /etc/mlflow/basic_auth.ini
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
WORKDIR /var/lib/mlflow
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
