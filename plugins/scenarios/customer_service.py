"""Scenario ``customer-service``: single-label intent detection for banking support messages (Banking77).

Reads the Banking77 CSVs (``text,category``) and generic tables (``text,label``). The 77 intents are
the label set; a raw value the file writes is mapped to a clean intent name (lower case, only
``a-z0-9_``: Banking77's ``Refund_not_showing_up`` becomes ``refund_not_showing_up`` and
``reverted_card_payment?`` becomes ``reverted_card_payment``), because per-class metric names are
MLflow metric keys, which allow no ``?``. Both spellings are accepted in files.

Accuracy decides, as in the Banking77 paper (Casanueva et al. 2020). The defaults suit 77 short
classes (99% of texts fit in 53 MiniLM tokens) on all-MiniLM-L6-v2: a higher peak rate than the
binary scenarios for the freshly initialised 77-way head, several epochs, validation every 200
steps. Without an eval file 10% of the training rows, stratified, are held out; a test file
(``data.test_path``, e.g. Banking77's test.csv) is reported only.

Every registered version carries a reply template per intent (``answer_templates``), shipped with
the served model by the ``ship-answer-templates`` stage, and a hand-off policy (``fit-handoff``:
temperature scaling and a confidence threshold chosen on eval) under which the served model answers
``handoff``, for a person to take the message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, ExtraStage, SampleData, ScenarioBase, ScenarioDefaults, StageHook

_SAMPLE = Path(__file__).parent / "data" / "banking77_sample"
RAW_INTENTS: tuple[str, ...] = tuple(json.loads((_SAMPLE / "categories.json").read_text(encoding="utf-8")))
"""The 77 Banking77 intents as the dataset writes them."""


def intent_name(raw: str) -> str:
    """The clean label name of a raw intent value: lower case, only letters, digits and underscores."""
    return re.sub(r"[^a-z0-9_]", "", raw.strip().lower())


INTENTS: tuple[str, ...] = tuple(sorted({intent_name(raw) for raw in RAW_INTENTS}))
"""The 77 intents as the model reports them (sorted)."""


class CustomerServiceScenario(ScenarioBase):
    """Which of 77 banking intents a customer message expresses; decided by accuracy."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "customer-service"
    description: ClassVar[str] = (
        "Intent detection for banking support messages (Banking77, 77 intents); ships a reply template per intent."
    )
    head: ClassVar[str] = "sequence-classification"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("banking77", "text", "category", "Banking77 CSV: text,category (intent name)"),
        DataLayout("generic", "text", "label", "any table with text and label columns (intent names)"),
    )
    # Raw label values as files write them (Banking77's spelling or the clean one) -> the intent the model reports.
    label_names: ClassVar[dict[str, str]] = {
        **{raw: intent_name(raw) for raw in RAW_INTENTS},
        **{intent: intent for intent in INTENTS},
    }
    primary_metric: ClassVar[str] = "accuracy"
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = (
        ExtraStage(
            "ship-answer-templates",
            StageHook.BEFORE_REGISTER,
            "finetune_flows.tasks.classification.answers:ship_answer_templates",
            "a reply template and help-page name per intent, checked against the labels and shipped with the model",
        ),
        ExtraStage(
            "fit-handoff",
            StageHook.BEFORE_REGISTER,
            "finetune_flows.tasks.classification.handoff:fit_handoff",
            "temperature scaling and a confidence threshold on eval: below it the served model answers 'handoff'",
        ),
    )
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=64,
        learning_rate=1.5e-4,
        epochs=6.0,
        batch_size=32,
        warmup_ratio=0.1,
        weight_decay=0.01,
        eval_every_steps=200,
        early_stopping_patience=4,
        eval_fraction=0.1,
        test_fraction=0.0,
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE / "train.csv",
            eval=_SAMPLE / "eval.csv",
            attribution=(_SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines()[0],
        )

    def answer_templates(self) -> Path:
        return _SAMPLE / "answers.csv"
