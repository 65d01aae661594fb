"""The shape of the code base, checked: distinct exit codes, a light flows package, a complete package
list, modules that stay small. (The import layers are checked by `lint-imports` in `make lint`.)"""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import recycler
from recycler.errors import RecyclerError, error_classes, exit_codes

ROOT = Path(__file__).resolve().parents[1]


def all_modules() -> list[str]:
    import recycler_flows

    return [
        m.name
        for pkg, prefix in ((recycler, "recycler."), (recycler_flows, "recycler_flows."))
        for m in pkgutil.walk_packages(pkg.__path__, prefix)
        if not m.name.endswith("__main__")
    ]


def test_every_error_has_its_own_exit_code_and_lives_in_errors():
    for name in all_modules():
        importlib.import_module(name)  # so that any stray RecyclerError subclass gets defined
    classes = error_classes()
    assert {c.__module__ for c in classes} == {"recycler.errors"}, [
        c for c in classes if c.__module__ != "recycler.errors"
    ]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), sorted(codes)
    assert (
        exit_codes()[RecyclerError.exit_code] == "RecyclerError" and len(exit_codes()) == len(classes) >= 20
    )


def test_importing_the_flows_leaves_the_tensor_stack_out():
    code = (
        "import sys, recycler_flows.release, recycler_flows.transfer, recycler_flows.cli, recycler.cli.app\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "recycler").rglob("__init__.py")}
    assert listed == found | {"recycler_flows"} and (ROOT / "flows" / "__init__.py").is_file()


def test_modules_stay_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in [*(ROOT / "recycler").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not big, f"split these modules by what they do: {big}"


def test_readme_exit_code_table_matches_the_errors():
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", (ROOT / "README.md").read_text(), re.M)
    assert {int(code): name for code, name in rows} == exit_codes()


def test_readme_tag_table_matches_the_registry_vocabulary():
    from recycler.registry.names import TAGS

    table = (ROOT / "README.md").read_text().split("| tag | what it says |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([\w.<>]+)` \| (.+) \|$", table, re.M)
    assert dict(rows) == TAGS
