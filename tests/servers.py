"""Session fixtures with real servers on 127.0.0.1: moto S3, MLflow on SQLite, PostgreSQL, MLflow on PostgreSQL.

Import them into a test module with `from servers import aws_env, moto_s3, mlflow_server, ...`
(tests/ is on sys.path because tests/conftest.py exists). Each server starts once per session.
The AWS/MLflow/HF credentials are distinctive dummies (SECRETS), so a test can grep logs for them;
no real credentials or config files are visible to the tests.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "rcyTEST-aws-secret-9f8e7d6c5b4a",
    "AWS_SESSION_TOKEN": "rcyTEST-aws-session-token-1a2b3c4d5e",
    "MLFLOW_TRACKING_PASSWORD": "rcyTEST-mlflow-password-77aa",
    "HF_TOKEN": "hf_rcyTESTtokenDoNotLog0123",
}
BUCKET = "recycler-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def aws_env():
    """Dummy credentials for the whole session; real AWS config files hidden (E9)."""
    values = {
        "AWS_ACCESS_KEY_ID": "AKIARCYTESTACCESSKEY",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "MLFLOW_TRACKING_USERNAME": "recycler-test",
        **SECRETS,
    }
    saved = {k: os.environ.get(k) for k in (*values, "AWS_PROFILE")}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def moto_s3(aws_env):
    """A moto S3 server in a thread, bound to 127.0.0.1 (its default is 0.0.0.0), with one bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", BUCKET)
    s3.client().create_bucket(Bucket=BUCKET)
    yield s3
    server.stop()


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend: str
    log: Path


def _start_mlflow(
    backend_uri: str, workdir: Path, moto: S3Server, label: str
) -> tuple[subprocess.Popen, MlflowServer]:
    port = free_port()
    log = workdir / "mlflow-server.log"
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": moto.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    cmd += ["--artifacts-destination", f"s3://{moto.bucket}/mlflow-{label}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, MlflowServer(f"http://127.0.0.1:{port}", label, log)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(moto_s3, tmp_path_factory):
    """`mlflow server` on a SQLite file, artifacts proxied to the moto bucket."""
    workdir = tmp_path_factory.mktemp("mlflow-sqlite")
    proc, server = _start_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", workdir, moto_s3, "sqlite")
    try:
        wait_http(f"{server.uri}/health", proc, server.log)
        yield server
    finally:
        _stop(proc)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing(reason: str):
    """A server binary this machine lacks: a skip with the reason locally, a failure in CI (RECYCLER_CI=1),
    where a skipped PostgreSQL test would hide that production's backend went untested."""
    if os.environ.get("RECYCLER_CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (initdb into a temp dir, trust auth, 127.0.0.1 + a private socket
    dir). initdb refuses to run as root, so under root the cluster runs as the `postgres` user."""
    bindir = _pg_bin()
    if bindir is None:
        missing(
            "PostgreSQL server binaries not found: `make setup` installs them (apt-get install postgresql)"
        )
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            missing(
                "running as root and there is no `postgres` user for initdb (apt-get install postgresql creates it)"
            )
    root = Path(tempfile.mkdtemp(prefix="recycler-pg-"))
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            cwd=root,
        )

    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_pg_server(moto_s3, postgres, tmp_path_factory):
    """`mlflow server` on the PostgreSQL cluster (needs psycopg2)."""
    import psycopg2  # noqa: F401  (test extra: psycopg2-binary; a missing driver must fail, not skip)

    workdir = tmp_path_factory.mktemp("mlflow-pg")
    proc, server = _start_mlflow(postgres, workdir, moto_s3, "postgres")
    try:
        wait_http(f"{server.uri}/health", proc, server.log, timeout=120)
        yield server
    finally:
        _stop(proc)
