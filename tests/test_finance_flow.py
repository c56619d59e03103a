"""The finetune flow for a scenario with a topic taxonomy: the sentence encoder is exported,
parity-checked and registered with the classifier, and the pyfunc returns a topic per text; the drift
reference travels with it, embedded by that encoder."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_flows.flows.finetune import finetune
from finetune_flows.tasks.core.config import FinetuneConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SENTENCES = {
    "negative": ["Operating profit fell sharply", "The company will cut 200 jobs", "Net sales decreased"],
    "neutral": ["The annual meeting is held in May", "The company is based in Helsinki", "The report is out"],
    "positive": ["Operating profit rose clearly", "Orders grew by a third", "Net sales increased strongly"],
}


def test_finance_flow_registers_the_topic_encoder(state_dir, tiny_model_dir, tmp_path: Path) -> None:
    rows = [
        (f"{text} in quarter {q} of {year}", label)
        for label, texts in SENTENCES.items()
        for text in texts
        for q in range(1, 5)
        for year in range(2001, 2013)
    ]  # 432 rows: train + eval still hold the 256 texts of the parity gates
    train = tmp_path / "news.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(train, index=False)
    config = FinetuneConfig.for_scenario(
        "finance-monitoring",
        {"model.source": str(tiny_model_dir), "data.train_path": str(train), "training.max_steps": "1"},
    )
    summary = finetune(config)
    assert summary.aliases == ["challenger", "champion"]
    assert "test_macro_f1" in summary.metrics  # the FinBERT-protocol test split is scored

    model = mlflow.pyfunc.load_model("models:/finance-monitoring@champion")
    scored = model.predict(["The company will cut 500 jobs in Finland", "Quarterly net profit rose 12 %"])
    assert list(scored.columns[:2]) == ["label", "score"] and "topic" in scored.columns
    assert list(scored["topic"]) == ["layoffs_restructuring", "earnings"]
    artifacts = {
        a.path
        for a in mlflow.artifacts.list_artifacts(
            f"models:/finance-monitoring/{summary.version}/artifacts/topic_encoder"
        )
    }
    assert {"artifacts/topic_encoder/encoder.onnx", "artifacts/topic_encoder/topics.json"} <= artifacts

    # The drift reference: embedded by the topic encoder the version ships (not a second copy of it).
    from finetune_flows.tasks.monitoring.drift_reference import fetch_reference

    found = fetch_reference("finance-monitoring", summary.version, tmp_path / "reference")
    assert found is not None
    reference, embeddings, encoder = found
    assert encoder.name == "topic_encoder" and embeddings.shape == (reference.texts, 384)  # all train texts < 1000
    assert set(reference.label_shares) <= set(SENTENCES) and abs(sum(reference.label_shares.values()) - 1) < 1e-9
    assert {"profit", "jobs", "helsinki"} <= set(reference.vocabulary) and reference.oov_rate < 0.05
