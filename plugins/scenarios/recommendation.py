"""Scenario ``recommendation``: rank items for users from interaction logs with item text.

Reads a folder in the MovieLens layout (ratings.csv, movies.csv, tags.csv) or the generic one
(interactions.csv user,item,rating,timestamp + items.csv item,text); see ``tasks.ranking.interactions``.
Evaluated leave-one-out by time against 99 sampled negatives; promotion uses NDCG@10.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, ExtraStage, SampleData, ScenarioBase, ScenarioDefaults, StageHook

_SAMPLE = Path(__file__).parent / "data" / "movielens_sample"


class RecommendationScenario(ScenarioBase):
    """Top-k items for a user from the text of what they liked; cold-start items by their text alone."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "recommendation"
    description: ClassVar[str] = "Text-based recommendation from ratings + item text (MovieLens or generic layout)."
    head: ClassVar[str] = "bi-encoder"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("movielens", "title", "rating", "folder: ratings.csv, movies.csv, tags.csv (optional)"),
        DataLayout("generic", "text", "rating", "folder: interactions.csv user,item,rating,timestamp; items.csv"),
    )
    primary_metric: ClassVar[str] = "ndcg_at_10"
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = (
        ExtraStage(
            "prepare-interactions",
            StageHook.PREPARE,
            "finetune_flows.tasks.ranking.dataset:prepare_interactions",
            "interaction folder -> leave-one-out split by time, training pairs and candidates",
        ),
        ExtraStage(
            "compare-with-baselines",
            StageHook.BEFORE_REGISTER,
            "finetune_flows.tasks.ranking.comparison:compare_with_baselines",
            "popularity, item-kNN, BPR-MF and a hybrid ranked on the same candidates; the ranking table",
        ),
    )
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=64,
        learning_rate=5e-5,
        epochs=1.0,
        batch_size=32,
        warmup_ratio=0.1,
        weight_decay=0.01,
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE,
            attribution=(_SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines()[0],
        )
