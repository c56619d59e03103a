"""The multi-process training path: torchrun with 2 CPU processes (DDP over gloo) trains the tiny
model through ``python -m finetune_flows.tasks.core.training``, both ranks take part and end with the same weights,
and the main process leaves checkpoints, the final model and the result file."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import pytest

from finetune_flows.plugins import SCENARIOS
from finetune_flows.tasks.core.config import InfrastructureConfig, TrainingConfig
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.launching import launch_distributed
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tokenization import tokenize_dataset
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.core.train_request import TrainRequest


def test_two_cpu_processes_train_one_model(state_dir, tiny_model_dir, sentiment_files, tmp_path, caplog) -> None:
    train, dev = sentiment_files
    data = ingest_files(train, dev, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    tokens = tokenize_dataset(
        Path(data.dataset_dir), tiny_model_dir, data.data_hash, 32, "sequence-classification", tmp_path / "cache"
    )
    tracking_uri = get_settings().tracking_uri  # the stage reads the store's URI from the environment
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id="0") as run:  # the default experiment, whatever an earlier test set active
        pass
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    request = TrainRequest(
        tokenized_dir=tokens.tokenized_dir,
        model_dir=str(tiny_model_dir),
        head="sequence-classification",
        id2label=data.id2label,
        training=TrainingConfig(max_steps=4, batch_size=8, eval_every_steps=2, learning_rate=5e-3, precision="fp32"),
        infrastructure=InfrastructureConfig(processes=2),
        primary_metric="accuracy",
        run=RunInfo(
            run_dir=str(run_dir),
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            tracking_uri_redacted=tracking_uri,
        ),
    )

    with caplog.at_level(logging.INFO, logger="finetune_flows.tasks.core.launching"):
        result = launch_distributed(request)

    assert result.world_size == 2 and result.steps == 4
    ranks = dict(re.findall(r"rank (\d) of 2: 4 steps, weights checksum (-?[\d.]+)", caplog.text))
    assert set(ranks) == {"0", "1"}, caplog.text[-3000:]
    assert ranks["0"] == ranks["1"], "DDP ranks ended with different weights"
    assert float(ranks["0"]) == pytest.approx(result.weights_checksum, abs=1e-5)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints and all(name.startswith("checkpoint-") for name in checkpoints)
    assert Path(result.model_dir) == run_dir / "model" and list((run_dir / "model").glob("*.safetensors"))
    assert (run_dir / "model" / "tokenizer.json").is_file()
    logged = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert logged.data.tags["world_size"] == "2" and "train_seconds" in logged.data.metrics
