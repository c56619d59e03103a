"""Scenario ``product-reviews``: what a customer review is about (a defect, a delivery problem, or praise)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, ExtraStage, SampleData, ScenarioBase, ScenarioDefaults, StageHook

_SAMPLE = Path(__file__).parent / "data" / "product_reviews"


class ProductReviewsScenario(ScenarioBase):
    """Routes a review to the team that handles it; decided by macro-F1 (every class counts the same)."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "product-reviews"
    description: ClassVar[str] = "Product reviews: defect, delivery problem or praise (example plugin)."
    head: ClassVar[str] = "mean-pooled-classifier"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("reviews", "review", "issue", "CSV: review,issue (defect, delivery or praise)"),
        DataLayout("generic", "text", "label", "any table with text and label columns"),
    )
    # Raw label values as they appear in files -> the label names the model reports.
    label_names: ClassVar[dict[str, str]] = {
        "defect": "defect",
        "broken": "defect",
        "delivery": "delivery",
        "shipping": "delivery",
        "praise": "praise",
        "positive": "praise",
    }
    primary_metric: ClassVar[str] = "macro_f1"
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=48,
        learning_rate=1e-4,
        epochs=3.0,
        batch_size=16,
        eval_every_steps=20,
    )
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = (
        ExtraStage(
            "label-report",
            StageHook.BEFORE_REGISTER,
            "ffx_example.stages:label_report",
            "Label counts of the training and eval data: a version tag, a served file and a report.",
        ),
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE / "train.csv",
            eval=_SAMPLE / "eval.csv",
            attribution="Synthetic reviews generated from templates for this example; no real customer wrote them.",
        )
