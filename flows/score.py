"""Flow ``score``: batch prediction with any registered model over a file or folder of texts.

The input (Parquet, CSV or JSONL; one file or a folder) is checked and cut into partitions; each
partition is scored by ``models:/<model_name>/<version of alias>`` into ``part-<id>.parquet`` in
the output folder (input columns, model outputs, ``model_version``), in this process or on a Dask
cluster (``engine=dask``: a local cluster of ``workers`` processes, or the cluster at
``address``). A rerun into the same folder skips the parts already written, so a killed run
resumes where it stopped. Deployments reach it by entrypoint ``flows/score.py:score``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from pydantic import ConfigDict, Field

from finetune_flows.tasks.batch.engine import EngineConfig
from finetune_flows.tasks.batch.partitions import Partition, plan_partitions
from finetune_flows.tasks.batch.runner import ScoreRun, resolve_version, run_partitions


class ScoreConfig(EngineConfig):
    """Score every text of a file or folder with a registered model; write partitioned Parquet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1, max_length=200, description="Registered MLflow model that scores.")
    alias: str = Field(default="champion", pattern=r"^[\w-]{1,100}$", description="Alias of the version that scores.")
    input: str = Field(
        min_length=1, max_length=1000, description="A Parquet, CSV or JSONL file, or a folder of them (read in order)."
    )
    output: str = Field(
        min_length=1, max_length=1000, description="Output folder: part-<id>.parquet per partition and manifest.json."
    )
    text_column: str = Field(default="text", min_length=1, max_length=200, description="The column holding the texts.")


@task(name="plan-partitions")
def plan_input(config: ScoreConfig) -> list[Partition]:
    """Check the input and cut it into partitions of at most ``partition_rows`` records."""
    return plan_partitions(Path(config.input).expanduser(), config.text_column, config.partition_rows)


@flow(name="score", log_prints=False)
def score(config: ScoreConfig) -> ScoreRun:
    """Score the input with ``models:/<model_name>@<alias>`` into partitioned Parquet; completed parts are skipped."""
    parts = plan_input(config)
    version = resolve_version(config.model_name, config.alias)
    model_uri = f"models:/{config.model_name}/{version}"  # the alias may move while the run goes on
    return run_partitions(parts, model_uri, version, Path(config.output).expanduser(), config.engine_settings())
