"""One end-to-end run with the real all-MiniLM-L6-v2 on 800 SST-2 rows (the bundled
sample), through the whole flow: registration, ONNX export with parity, pyfunc on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from finetune_flows.flows.finetune import finetune
from finetune_flows.tasks.core.config import FinetuneConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_minilm_learns_sst2_sentiment_end_to_end(state_dir: Path) -> None:
    config = FinetuneConfig.for_scenario(
        "sentiment",
        {
            "data.max_train_rows": "800",
            "training.batch_size": "16",
            "training.eval_every_steps": "1000",
            "model.max_length": "64",
        },
    )
    summary = finetune(config)

    # 800 rows, one epoch (50 steps): far from the full-data figure, but clearly learned (chance is ~0.51).
    assert summary.metrics["accuracy"] >= 0.70, summary.metrics
    assert summary.aliases == ["challenger", "champion"]

    model = mlflow.pyfunc.load_model("models:/sentiment@champion")
    scored = model.predict(["a gorgeous, witty film", "a tedious, joyless slog"])
    assert list(scored["label"]) == ["positive", "negative"]
    assert scored["score"].between(0.5, 1.0).all()
    version = mlflow.MlflowClient().get_model_version("sentiment", summary.version)
    assert float(version.tags["onnx_max_abs_diff"]) <= 1e-4
