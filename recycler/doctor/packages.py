"""Installed packages: known vulnerabilities (pip-audit, where it can run) and the pins Prefect needs.

Vulnerability data changes daily, so doctor does not carry a table of its own: it runs pip-audit
(`pip install pip-audit`) against this environment. pip-audit needs PyPI's per-version JSON API; where
that is unreachable (an offline mirror, a proxy), the check says how many packages it could not
audit instead of claiming the environment is clean. The Prefect compatibility pins are ours: no
advisory database knows that Prefect 3.8 does not start with FastAPI ≥ 0.151.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata

from recycler.doctor.result import CheckResult, first_line, listing


@dataclass(frozen=True)
class Pin:
    package: str
    required: str  # PEP 440 specifier set
    why: str


# pyproject.toml: Prefect 3.8 needs these to run at all. Applied when prefect is in PREFECT_RANGE.
PREFECT_RANGE = ">=3.8,<3.10"
PINS: tuple[Pin, ...] = (
    Pin("fastapi", "<0.151", "Prefect 3.8's API server does not start with newer FastAPI"),
    Pin("sqlalchemy", ">=2.0,<2.1", "with SQLAlchemy 2.1 Prefect's scheduler never fires schedules"),
)


def installed_versions(
    names: Iterable[str] = ("prefect", *(p.package for p in PINS)),
) -> dict[str, str | None]:
    """name → installed distribution version, or None when it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _in(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def check_pins(installed: Mapping[str, str | None]) -> list[CheckResult]:
    """When Prefect is in PREFECT_RANGE, every PINS package must satisfy its pin (fail otherwise).
    Pure: pass `installed_versions()` or fake version strings."""
    prefect = installed.get("prefect")
    if prefect is None or not _in(prefect, PREFECT_RANGE):
        return []
    results = []
    for pin in PINS:
        v, name = installed.get(pin.package), f"pin {pin.package}"
        if v is None or not _in(v, pin.required):
            detail = (
                f"{v or 'not installed'}; prefect {prefect} needs {pin.package}{pin.required} ({pin.why})"
            )
            results.append(CheckResult(name=name, status="fail", detail=detail))
        else:
            results.append(CheckResult(name=name, status="ok", detail=f"{v} ({pin.required})"))
    return results


def check_kernels(compiled: bool) -> CheckResult:
    """Which kernels the Δ engine computes with: the compiled extension, or (a source install on a
    machine without a C compiler) the numpy reference: the same bytes, several times the CPU time.
    Pure: pass `recycler.delta.fast.available()`."""
    if compiled:
        return CheckResult(name="Δ kernels", status="ok", detail="compiled (recycler.delta._native)")
    detail = (
        "numpy reference kernels: recycler.delta._native is not built, so diff/apply/recycle take "
        "several times the CPU (same bytes); install a released wheel, or a C compiler and "
        "`pip install --force-reinstall --no-deps recycler`"
    )
    return CheckResult(name="Δ kernels", status="warn", detail=detail)


def audit_report(report: Mapping) -> CheckResult:
    """Turn pip-audit's JSON report into one finding: fail on any known vulnerability, warn when
    packages could not be audited (so "no vulnerabilities" is never claimed for packages not checked)."""
    deps = report.get("dependencies", [])
    found = [
        f"{d['name']} {d.get('version', '?')}: {v['id']}" + (f" (fixed in {', '.join(v['fix_versions'])})" if v.get("fix_versions") else "")
        for d in deps
        for v in d.get("vulns", [])
    ]  # fmt: skip
    skipped = [d["name"] for d in deps if d.get("skip_reason")]
    audited = len(deps) - len(skipped)
    if found:
        return CheckResult(
            name="vulnerabilities",
            status="fail",
            detail=f"{len(found)} known: {listing(found)}; upgrade",
            items=found,
        )
    if skipped:
        detail = (
            f"pip-audit checked {audited} of {len(deps)} packages, none vulnerable; {len(skipped)} could not be "
            f"audited (PyPI's per-version API unreachable from here?): {listing(skipped)}"
        )
        return CheckResult(name="vulnerabilities", status="warn", detail=detail, items=skipped)
    return CheckResult(
        name="vulnerabilities", status="ok", detail=f"pip-audit: none known in {audited} packages"
    )


def check_vulnerabilities(timeout: float = 300) -> CheckResult:
    """Run pip-audit on this interpreter's environment (installed packages, no resolution)."""
    exe = shutil.which("pip-audit") or str(_beside_python("pip-audit"))
    if not shutil.which(exe):
        return CheckResult(
            name="vulnerabilities",
            status="warn",
            detail="pip-audit is not installed (`pip install pip-audit`); not checked",
        )
    cmd = [exe, "--format", "json", "--progress-spinner", "off", "--local"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        report = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, ValueError, OSError) as e:
        return CheckResult(
            name="vulnerabilities", status="warn", detail=f"pip-audit did not run: {first_line(e)}"
        )
    return audit_report(report)


def _beside_python(name: str):
    from pathlib import Path

    return Path(sys.executable).parent / name
