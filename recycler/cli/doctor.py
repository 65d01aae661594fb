"""`recycler doctor`: check a deployment (recycler.doctor) and, with `--fix`, repair what is safe.

Mounted by the main CLI with `from recycler.cli.doctor import register; register(app)`. The exit
code is the contract for scripts and health probes: 0 when no check fails (warnings allowed), 1 when
any does. Settings come from RECYCLER_* (recycler.settings); heavy imports happen inside the command
so that `recycler --help` stays fast.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer

_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Repair what is safe: add the S3 abort-multipart lifecycle rule, abort old multipart "
            "uploads, delete expired registration leases, remove old temporary folders.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            min=0,
            help="Hours after which a multipart upload counts as orphaned (keep it above your longest upload).",
        ),
    ] = 24.0,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="Re-hash every artifact byte (--no-verify: manifests only)."
        ),
    ] = True,
    audit: Annotated[
        bool, typer.Option("--audit/--no-audit", help="Run pip-audit for known vulnerabilities (needs PyPI).")
    ] = True,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each server.")
    ] = 3.0,
) -> None:
    """Check package versions, servers, the artifact store and the registry; exit 1 if any check fails."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from recycler.doctor import failed, run_doctor
    from recycler.settings import get_settings

    results = run_doctor(
        get_settings(),
        fix=fix,
        upload_age=timedelta(hours=older_than),
        verify=verify,
        timeout=timeout,
        audit=audit,
    )
    bad = failed(results)
    if as_json:
        typer.echo(json.dumps({"ok": not bad, "results": [r.model_dump() for r in results]}, indent=1))
    else:
        table = Table(title="recycler doctor" + (" --fix" if fix else ""))
        for col in ("check", "status", "detail"):
            table.add_column(col, overflow="fold")
        for r in results:
            status = f"[{_STYLE[r.status]}]{r.status}[/]" + (" (fixed)" if r.fixed else "")
            table.add_row(r.name, status, escape(r.detail))
        console = Console()
        console.print(table)
        fixable = sum(r.fixable and not r.fixed for r in results)
        if fixable and not fix:
            console.print(f"{fixable} finding(s) can be repaired with --fix", highlight=False)
    raise typer.Exit(1 if bad else 0)


def register(app: typer.Typer) -> None:
    """Add `doctor` to the main recycler CLI."""
    app.command("doctor")(doctor)
