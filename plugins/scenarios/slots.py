"""Scenario ``slots``: slot filling (the values in a customer message: dates, amounts, company names) on NLU++.

Reads NLU++ JSON (``finetune_flows.tasks.classification.slot_data``): a folder of folds (such as
``nlupp/data/banking``), a folder of domains, or one JSON file; the bundled sample is the first four
banking folds (shared with ``intents-multilabel``). Protocol: the last tenth of the folds is the test
split (fold18, fold19 of a 20-fold domain: one of the paper's "large" pairs; fold3 of the sample),
eval is 10% of the training rows. The labels are BIO tags per slot type found in the data; span F1
(strict, seqeval-style) decides. The served model answers a ``slots`` column: a JSON list of
``{"slot", "text", "start", "end", "score"}`` with character offsets into the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from finetune_flows.plugins.specs import DataLayout, ExtraStage, SampleData, ScenarioBase, ScenarioDefaults, StageHook

_SAMPLE = Path(__file__).parent / "data" / "nlupp_sample"


class SlotsScenario(ScenarioBase):
    """Which character spans of a message fill which slot (NLU++ slot types); decided by span F1."""

    api_version: ClassVar[int] = 2
    name: ClassVar[str] = "slots"
    description: ClassVar[str] = (
        "Slot filling: character spans of dates, amounts, names... in messages (NLU++ JSON), BIO-tagged word pieces."
    )
    head: ClassVar[str] = "token-classification"
    layouts: ClassVar[tuple[DataLayout, ...]] = (
        DataLayout("nlupp", "text", "slots", "NLU++ JSON: a list of {text, slots: {slot: {span: [start, end]}}}"),
    )
    primary_metric: ClassVar[str] = "span_f1"
    extra_stages: ClassVar[tuple[ExtraStage, ...]] = (
        ExtraStage(
            "prepare-slots",
            StageHook.PREPARE,
            "finetune_flows.tasks.classification.slot_data:prepare_slots",
            "NLU++ JSON (a file, a folder of folds or of domains) -> train/eval/test texts with their slot spans",
        ),
    )
    defaults: ClassVar[ScenarioDefaults] = ScenarioDefaults(
        model="minilm",
        max_length=64,
        learning_rate=1e-4,
        epochs=10.0,
        batch_size=16,
        warmup_ratio=0.1,
        weight_decay=0.01,
        eval_every_steps=50,
        early_stopping_patience=5,
        eval_fraction=0.1,
        test_fraction=0.0,
        # Per-token logits of 64 tokens x 27 tags differ from the graph's by up to 1.1e-4 (NLU++ banking, MiniLM,
        # 256 texts): more values than a classifier's, each as exact; the predicted tags agreed on every text.
        parity_tolerance=3e-4,
    )

    def sample(self) -> SampleData:
        return SampleData(
            train=_SAMPLE,
            attribution=(_SAMPLE / "ATTRIBUTION.md").read_text(encoding="utf-8").splitlines()[0],
        )
