"""Environment settings (RECYCLER_* variables), with embedded defaults that need no server.

Defaults: MLflow on a local SQLite file and artifacts in a local folder, both under RECYCLER_HOME
(./.recycler). Production points `artifact_store` at s3://bucket/prefix and `tracking_uri` at an
MLflow server. Credentials are never settings: boto3 reads AWS_* / IAM roles and MLflow reads
MLFLOW_TRACKING_USERNAME/PASSWORD from the environment, so secrets never reach logs, params or tags.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where recycler keeps its registry and artifacts."""

    model_config = SettingsConfigDict(env_prefix="RECYCLER_", frozen=True, extra="ignore")

    home: Path = Field(
        Path(".recycler"), description="Folder for the embedded defaults (SQLite registry, local artifacts)."
    )
    tracking_uri: str = Field("", description="MLflow tracking URI; default sqlite:///<home>/mlflow.db.")
    registry_uri: str = Field("", description="MLflow registry URI; default: the tracking URI.")
    experiment: str = Field("recycler", description="MLflow experiment for runs logged by recycler.")
    ui_url: str = Field(
        "",
        description="MLflow UI address for the links recycler prints and puts in Prefect artifacts; "
        "default: the tracking URI when it is http(s), else http://127.0.0.1:5000 (what `mlflow ui` serves).",
    )
    artifact_store: str = Field(
        "", description="Local folder or s3://bucket/prefix; default <home>/artifacts."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); None = AWS.")
    s3_region: str | None = Field(None, description="S3 region, if the endpoint needs one.")
    s3_max_concurrency: int = Field(8, ge=1, le=64, description="Parallel part transfers per file.")
    s3_multipart_chunk_mb: int = Field(64, ge=5, description="Multipart part size in MiB (S3 minimum 5).")
    chain_lease_ttl: float = Field(
        120.0,
        gt=0,
        description="Seconds a family's chain turn outlives its holder: renewed every third of it while a "
        "cycle runs, taken over this long after the holder dies.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        home = self.home.resolve()
        object.__setattr__(self, "home", home)
        if not self.tracking_uri:
            # timeout: several local processes (two watchers, a CLI call) may write at once; wait for
            # SQLite's lock instead of failing with "database is locked" after its default 5 s
            object.__setattr__(self, "tracking_uri", f"sqlite:///{home / 'mlflow.db'}?timeout=60")
        if not self.registry_uri:
            object.__setattr__(self, "registry_uri", self.tracking_uri)
        if not self.ui_url:
            remote = self.tracking_uri.startswith(("http://", "https://"))
            object.__setattr__(self, "ui_url", self.tracking_uri if remote else "http://127.0.0.1:5000")
        if not self.artifact_store:
            object.__setattr__(self, "artifact_store", str(home / "artifacts"))
        return self


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///…` URI (query stripped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].partition("?")[0])


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (read once from the environment; tests construct `Settings` directly)."""
    return Settings()
