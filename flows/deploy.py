"""`recycler deploy`: the work pools a deployment file names, then its deployments, on a Prefect server.

`prefect deploy --all` alone fails on a fresh server ("work pool 'cpu' does not exist"): the pools
were created only by the compose workers. This creates every missing pool first, as `process` pools
(one worker per host, compose and checkouts) or `kubernetes` pools from infra/k8s/<pool>-pool.json,
then runs `prefect deploy` on the same file. Existing pools are left as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml

from recycler.errors import InvalidConfig, RecyclerError

PoolType = Literal["process", "kubernetes"]


def pools_of(prefect_file: Path) -> list[str]:
    """The work pools the deployments of `prefect_file` run on."""
    try:
        deployments = yaml.safe_load(Path(prefect_file).read_text())["deployments"]
        return sorted({d["work_pool"]["name"] for d in deployments})
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise InvalidConfig(
            f"{prefect_file}: not a prefect.yaml with deployments and work pools ({e})"
        ) from None


def _prefect(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args], capture_output=True, text=True, env=os.environ
    )
    if check and done.returncode != 0:
        raise RecyclerError(
            f"`prefect {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-800:]}"
        )
    return done


def ensure_pools(
    prefect_file: Path, pool_type: PoolType = "process", templates: Path | None = None
) -> list[str]:
    """Create the pools `prefect_file` names that the server does not have; return the created ones."""
    if not os.environ.get("PREFECT_API_URL"):
        raise RecyclerError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server (see infra/README.md)"
        )
    created = []
    for pool in pools_of(prefect_file):
        if _prefect("work-pool", "inspect", pool, check=False).returncode == 0:
            continue
        args = ["work-pool", "create", pool, "--type", pool_type]
        if pool_type == "kubernetes":
            template = (templates or Path(prefect_file).parent / "k8s") / f"{pool}-pool.json"
            args += ["--base-job-template", str(template)]
        _prefect(*args)
        created.append(pool)
    return created


def deploy(prefect_file: Path, pool_type: PoolType = "process") -> tuple[list[str], str]:
    """Pools first, then every deployment of `prefect_file`; returns (created pools, prefect's output)."""
    created = ensure_pools(prefect_file, pool_type)
    done = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    return created, done.stdout
