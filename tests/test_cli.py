"""The `recycler` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECYCLER = [sys.executable, "-m", "recycler.cli"]


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*RECYCLER, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_help_explains_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("diff", "apply", "recycle", "inspect", "verify"):
        assert cmd in r.stdout
    r = run("apply", "--help")
    for opt in (
        "--alpha",
        "--include",
        "--exclude",
        "--vocab",
        "--tokenizer-from",
        "--only-in-delta",
        "--overwrite",
    ):
        assert opt in r.stdout


def test_diff_apply_inspect_verify(models, tmp_path):
    d, o = tmp_path / "delta", tmp_path / "out"
    r = run("diff", models["base"], models["tuned"], "-o", d, "--shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    assert f"wrote {d}" in r.stdout and "round trip exact: True" in r.stderr
    r = run("apply", models["grown"], d, "-o", o)
    assert r.returncode == 0, r.stderr
    assert "vocabulary: tokens" in r.stderr and "3 target rows with zero Δ" in r.stderr
    assert json.loads((o / "compatibility.json").read_text())["vocab"]["method"] == "tokens"
    r = run("inspect", d)
    assert r.returncode == 0 and "bfloat16" in r.stdout and "total" in r.stdout and "exceptions" in r.stdout
    r = run("inspect", d, "--json")
    assert json.loads(r.stdout)["kind"] == "diff"
    r = run("verify", o)
    assert r.returncode == 0 and r.stdout.startswith("ok:")


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing-folder", 2, "not a folder"),
        ("exists", 7, "already exists; pass --overwrite"),
        ("shape", 3, "shape [84, 32] in base vs [87, 32]"),
        ("tampered", 6, "sha256 mismatch"),
        ("not-a-delta", 2, "not a recycler Δ"),
    ],
)
def test_errors_are_one_clear_line_with_distinct_exit_codes(models, delta, tmp_path, case, code, message):
    if case == "missing-folder":
        r = run("diff", tmp_path / "nope", models["tuned"], "-o", tmp_path / "d", "-q")
    elif case == "exists":
        (tmp_path / "d").mkdir()
        r = run("diff", models["base"], models["tuned"], "-o", tmp_path / "d", "-q")
    elif case == "shape":
        r = run("diff", models["base"], models["grown"], "-o", tmp_path / "d", "-q")
    elif case == "tampered":
        d = shutil.copytree(delta, tmp_path / "d")
        shard = sorted(Path(d).glob("model-*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[-2] ^= 0xFF
        shard.write_bytes(bytes(data))
        r = run("verify", d)
    else:
        r = run("apply", models["target"], models["tuned"], "-o", tmp_path / "o", "-q")
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in r.stderr.replace("\n", " ")


def test_demo_help_says_what_it_runs_and_where_it_writes():
    r = run("demo", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "v3→v5" in text and "backport" in text
    assert "RECYCLER_TRACKING_URI" in text and "honoured" in text


def test_init_spec_writes_a_template_the_service_loads_and_refuses_to_overwrite(tmp_path):
    from recycler.service.spec import spec_template

    target = tmp_path / "family.yaml"
    r = run("init-spec", target)
    assert r.returncode == 0, r.stderr
    assert target.read_text() == spec_template()
    assert "family" in target.read_text() and "evaluation" in target.read_text()
    again = run("init-spec", target)
    assert again.returncode != 0 and "--overwrite" in again.stderr + again.stdout
    assert "Traceback" not in again.stderr
