"""Where batch scoring runs: this process (``local``) or a Dask cluster through Prefect's ``DaskTaskRunner``.

``engine=dask`` without an ``address`` starts a ``distributed.LocalCluster`` of ``workers``
processes with ``threads_per_worker`` threads each, listening on 127.0.0.1 only and without a
dashboard; the runner closes it when the scoring ends. With an ``address`` the work goes to the
existing cluster's scheduler (its workers must see the input and output folders and the MLflow
store). Each worker process loads the model once; its ONNX sessions use ``threads_per_worker``
threads.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Engine(StrEnum):
    """Where the partitions are scored."""

    LOCAL = "local"
    DASK = "dask"


class EngineConfig(BaseModel):
    """The cluster choice, shared by every flow that scores in partitions (its fields sit flat in theirs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Engine = Field(
        default=Engine.LOCAL, description="local: one process (the default); dask: a Dask cluster, local or remote."
    )
    workers: int = Field(default=2, ge=1, le=256, description="dask: worker processes of the local cluster.")
    threads_per_worker: int = Field(
        default=1, ge=1, le=64, description="dask: threads per worker; also each worker's ONNX intra-op threads."
    )
    address: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^(tcp|tls|ucx|inproc)://[\w.\-\[\]:]+$|^[\w.\-\[\]]+:\d+$",
        description="dask: scheduler address of an existing cluster (e.g. tcp://10.0.0.5:8786). Empty: a local one.",
    )
    partition_rows: int = Field(
        default=10_000, ge=1, le=10_000_000, description="Most records per partition (one part file each)."
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> EngineConfig:
        if self.address and self.engine is not Engine.DASK:
            raise ValueError(f"address {self.address!r} is set but engine is {self.engine.value!r}; set engine=dask")
        return self

    def engine_settings(self) -> EngineConfig:
        """Only the engine's own fields (a flow config that extends this model carries more)."""
        return EngineConfig.model_validate({k: getattr(self, k) for k in EngineConfig.model_fields})


def local_cluster_kwargs(config: EngineConfig) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments: worker processes on 127.0.0.1, no dashboard."""
    return {
        "n_workers": config.workers,
        "threads_per_worker": config.threads_per_worker,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "silence_logs": 40,  # logging.ERROR: the workers' own start and stop lines stay out of the run log
    }


def dask_runner(config: EngineConfig) -> Any:
    """Prefect's ``DaskTaskRunner`` for ``config``: the cluster at ``address``, else a new local cluster.

    Use it as a context manager; leaving it closes a cluster it started."""
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(config))
