"""Scenario ``sentiment``: binary review sentiment (SST-2, IMDB and generic text/label files)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, SampleData, ScenarioBase, ScenarioDefaults

_SAMPLE = Path(__file__).parent / "data" / "sst2_sample"


class SentimentScenario(ScenarioBase):
    """Positive or negative opinion in reviews; decided by accuracy, like the GLUE SST-2 task."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "sentiment"
    description: ClassVar[str] = "Binary review sentiment (negative/positive); reads SST-2 TSV and IMDB CSV."
    head: ClassVar[str] = "sequence-classification"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("sst2", "sentence", "label", "GLUE SST-2 TSV: sentence<TAB>label (0/1)"),
        DataLayout("imdb", "text", "label", "IMDB CSV: id,text,label,rating"),
        DataLayout("generic", "text", "label", "any table with text and label columns"),
    )
    # Raw label values as they appear in files -> the label names the model reports.
    label_names: ClassVar[dict[str, str]] = {
        "0": "negative",
        "1": "positive",
        "negative": "negative",
        "positive": "positive",
        "neg": "negative",
        "pos": "positive",
    }
    primary_metric: ClassVar[str] = "accuracy"
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=64,
        learning_rate=1e-4,
        epochs=1.0,
        batch_size=32,
        warmup_ratio=0.06,
        weight_decay=0.01,
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE / "train.tsv",
            eval=_SAMPLE / "dev.tsv",
            attribution=(_SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines()[0],
        )
