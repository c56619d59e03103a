"""Environment facts, read once from ``FINETUNE_FLOWS_*`` variables (or a ``.env`` file).

With nothing configured everything lives under one project-local state folder:
``.finetune-flows/`` holding Prefect's home (its SQLite database), MLflow's SQLite store and
artifact folder, the cache of ingested and tokenized data, and each run's working folder.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where state lives and which services to talk to."""

    model_config = SettingsConfigDict(env_prefix="FINETUNE_FLOWS_", env_file=".env", extra="ignore")

    state_dir: Path = Field(
        default=Path(".finetune-flows"),
        description="Project-local folder for all state: Prefect home, MLflow store, caches, runs.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: a SQLite store at <state_dir>/mlflow.db.",
    )
    mlflow_artifact_root: str | None = Field(
        default=None,
        description="Artifact location for new experiments; default: <state_dir>/mlartifacts.",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=512, description="torch intra-op threads for training; 0 keeps torch's default."
    )
    prefect_port: int = Field(
        default=4200, ge=1024, le=65535, description="Port of the Prefect server `finetune-flows up` starts."
    )
    mlflow_port: int = Field(
        default=5000, ge=1024, le=65535, description="Port of the MLflow server `finetune-flows up` starts."
    )
    service_timeout: float = Field(
        default=120.0, ge=5.0, le=1800.0, description="Seconds `finetune-flows up` waits for each service's health."
    )
    services_auth: bool = Field(
        default=False,
        description=(
            "`finetune-flows up` starts both servers with basic auth (as `up --auth`). The credentials come "
            "only from the environment, never a default: PREFECT_API_AUTH_STRING (user:password) and "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (at least 12 characters)."
        ),
    )

    notify_block: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+/[\w-]+$",
        description=(
            "A Prefect notification block, <block-type-slug>/<name> (e.g. custom-webhook/ops, slack-webhook/ml-team), "
            "that `finetune-flows up` wires to the automations of deployments/automations.yaml (failed runs, spikes, "
            "drift). Empty: no notifications."
        ),
    )

    @cached_property
    def state(self) -> Path:
        """The state folder as an absolute path (created on first use)."""
        path = self.state_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.state / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or (self.state / "mlartifacts").as_uri()

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def cache_dir(self) -> Path:
        return self.state / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.state / "runs"


def get_settings() -> Settings:
    """Settings as the environment says now (cheap; tests change the environment between calls)."""
    return Settings()
