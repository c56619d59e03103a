"""The extra stage of scenario ``product-reviews``: a label report before the version is registered."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from finetune_flows.plugins import DataError
from finetune_flows.tasks.core.stages import StageContext, StageOutput

COUNTS_TAG = "label_counts.train"
"""Version tag with the training rows per label, e.g. "defect=96, delivery=96, praise=96"."""
REPORT_ARTIFACT = "label_report"
"""Name of the folder shipped with the served model (label_counts.json, label_report.md)."""


def label_counts(dataset_dir: Path, split: str, labels: list[str]) -> dict[str, int]:
    """Rows per label (all of ``labels``, in their order) in one split of the prepared dataset."""
    frame = pd.read_parquet(dataset_dir / f"{split}.parquet", columns=["label"])
    counts = frame["label"].value_counts()
    return {label: int(counts.get(label, 0)) for label in labels}


def label_report(context: StageContext) -> StageOutput:
    """Count the training and eval rows per label; tag the version with the training counts, ship the counts
    (JSON) with the served model and write a Markdown report that lists them beside the eval F1 per label."""
    if context.data is None:
        raise DataError("the label-report stage needs the prepared dataset; it runs after the data is prepared")
    dataset, labels = Path(context.data.dataset_dir), context.data.labels
    counts = {split: label_counts(dataset, split, labels) for split in ("train", "eval")}
    metrics = context.evaluation.metrics if context.evaluation else {}

    folder = Path(context.run.run_dir) / REPORT_ARTIFACT
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "label_counts.json").write_text(json.dumps(counts, indent=2), encoding="utf-8")
    f1 = {label: f"{metrics[f'f1_{label}']:.3f}" if f"f1_{label}" in metrics else "-" for label in labels}
    rows = "\n".join(f"| {x} | {counts['train'][x]} | {counts['eval'][x]} | {f1[x]} |" for x in labels)
    report = folder / "label_report.md"
    report.write_text(
        f"### Labels of {context.config.scenario}\n\n| label | train rows | eval rows | eval F1 |\n|---|---|---|---|\n"
        f"{rows}\n",
        encoding="utf-8",
    )
    train = counts["train"]
    return StageOutput(
        metrics={"label_imbalance": max(train.values()) / max(min(train.values()), 1)},
        tags={COUNTS_TAG: ", ".join(f"{label}={count}" for label, count in train.items())},
        served_artifacts={REPORT_ARTIFACT: str(folder)},
        report=str(report),
    )
