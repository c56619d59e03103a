"""Scenario ``intents-multilabel``: every intent a customer message expresses, as a set (NLU++).

"I want to cancel my transfer, it doesn't work" is cancel_close_leave_freeze +
transfer_payment_deposit + wrong_notworking_notshowing: NLU++
(Casanueva et al. 2022) annotates such messages with intent modules, 48 for banking (22 banking,
25 general, 1 shared with hotels), 0 to 6 per message. The scenario reads NLU++ fold folders and
files and any table with a ``labels`` column of ``;``-separated names (its ``prepare-multilabel``
stage, ``tasks.classification.multilabel_data``), trains the ``multi-label`` head (a sigmoid per
intent, binary cross-entropy), tunes a threshold per intent on eval and ships them with the served
model (``ship-thresholds``). Micro-F1 decides.

The fold protocol on an NLU++ folder: the last tenth of the folds is the test split (on the
20 banking folds, folds 18 and 19: one of the paper's "large" setups), 10% of the rest evaluates.
The bundled sample (folds 0-3 of banking) tests on fold 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, ExtraStage, SampleData, ScenarioBase, ScenarioDefaults, StageHook

_SAMPLE = Path(__file__).parent / "data" / "nlupp_sample"


class IntentsMultiLabelScenario(ScenarioBase):
    """Which intents (any number) a customer message expresses; decided by micro-F1."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "intents-multilabel"
    description: ClassVar[str] = (
        "Multi-label intents of customer messages (NLU++ banking/hotels, or a table of ';'-separated labels)."
    )
    head: ClassVar[str] = "multi-label"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("generic", "text", "labels", "any table with text and labels (';'-separated names) columns"),
        DataLayout("nlupp-table", "text", "intents", "a table with text and intents (';'-separated) columns"),
        DataLayout("nlupp", "text", "intents", "NLU++ folder (fold0.json ...) or fold file: JSON lists"),
    )
    primary_metric: ClassVar[str] = "micro_f1"
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = (
        ExtraStage(
            "prepare-multilabel",
            StageHook.PREPARE,
            "finetune_flows.tasks.classification.multilabel_data:prepare_multilabel",
            "NLU++ folds/files or a labels table -> train/eval/test with multi-hot targets (fold protocol)",
        ),
        ExtraStage(
            "ship-thresholds",
            StageHook.BEFORE_REGISTER,
            "finetune_flows.tasks.classification.multilabel:ship_thresholds",
            "the per-intent thresholds tuned on eval, shipped with the served model (thresholds.json)",
        ),
    )
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=64,
        learning_rate=1e-4,
        epochs=20.0,
        batch_size=32,
        warmup_ratio=0.1,
        weight_decay=0.01,
        eval_every_steps=50,
        early_stopping_patience=5,
        eval_fraction=0.1,
        test_fraction=0.0,
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE / "banking",
            attribution=(_SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines()[0],
        )
