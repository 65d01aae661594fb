"""Addresses of MLflow UI pages: in-app links for Markdown in the UI itself, full URLs for people.

Every address carries `workflowType=machine_learning`: MLflow 3 opens on its GenAI pages otherwise
(no model registry in the sidebar, an empty traces dashboard where the runs are). The experiment is
also tagged as a model-training one (`EXPERIMENT_KIND`), which the UI reads when no URL says.
"""

from __future__ import annotations

from urllib.parse import quote

ML = "workflowType=machine_learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def model_path(name: str) -> str:
    return f"#/models/{quote(name)}?{ML}"


def version_path(reference: str) -> str:
    """The page of `name/version`."""
    name, _, version = reference.rpartition("/")
    return f"#/models/{quote(name)}/versions/{version}?{ML}"


def run_path(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML}"


def experiment_path(experiment_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs?{ML}"


def url(ui: str, path: str) -> str:
    """A full URL of the UI at `ui` (e.g. http://127.0.0.1:5000) for an in-app path."""
    return f"{ui.rstrip('/')}/{path}"


def _href(path: str, ui: str) -> str:
    return url(ui, path) if ui else path


def version_link(reference: str, ui: str = "") -> str:
    """`[name/v](#/models/name/versions/v?…)`: a link MLflow renders in descriptions and notes (with
    `ui`, a full URL for pages outside MLflow, such as Prefect artifacts)."""
    return f"[{reference}]({_href(version_path(reference), ui)})"


def run_link(experiment_id: str, run_id: str, label: str, ui: str = "") -> str:
    return f"[{label}]({_href(run_path(experiment_id, run_id), ui)})"


def model_link(name: str, ui: str = "") -> str:
    return f"[{name}]({_href(model_path(name), ui)})"
