"""Training options Trainer does not decide itself: layer-wise learning-rate decay (groups, and the
rates Trainer actually steps with), label smoothing, and the finance scenario taking them as defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer, TrainerCallback

from finetune_flows.plugins import HEADS, SCENARIOS
from finetune_flows.tasks.core.config import FinetuneConfig, TrainingConfig
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.tokenization import tokenize_dataset
from finetune_flows.tasks.core.training import train_model
from finetune_flows.tasks.core.training_options import layer_depth, layerwise_param_groups


def test_layer_depth_reads_bert_parameter_names() -> None:
    assert layer_depth("bert.embeddings.word_embeddings.weight", 6) == 0
    assert layer_depth("bert.encoder.layer.0.attention.self.query.weight", 6) == 1
    assert layer_depth("bert.encoder.layer.5.output.dense.bias", 6) == 6
    assert layer_depth("bert.pooler.dense.weight", 6) == 7
    assert layer_depth("classifier.weight", 6) == 7


def test_layerwise_groups_decay_towards_the_embeddings(tiny_classifier_dir: Path) -> None:
    model = HEADS.get("sequence-classification").build_model(str(tiny_classifier_dir), {0: "negative", 1: "positive"})
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # Trainer's rule; it uses no instance state
    groups = layerwise_param_groups(model, learning_rate=1e-3, decay=0.5, weight_decay=0.01, decayed=decayed)

    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter, once
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 layers: embeddings 1e-3 * 0.5**3, layer 0 * 0.5**2, layer 1 * 0.5, classifier and pooler 1e-3
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    assert rate[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(2.5e-4)
    assert rate[id(named["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(5e-4)
    assert rate[id(named["classifier.weight"])] == rate[id(named["bert.pooler.dense.weight"])] == pytest.approx(1e-3)
    assert decay[id(named["bert.encoder.layer.1.output.LayerNorm.weight"])] == 0.0
    assert decay[id(named["classifier.bias"])] == 0.0 and decay[id(named["classifier.weight"])] == 0.01


class RecordRates(TrainerCallback):
    """Keeps the learning rate of every optimizer group at each step."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.rates.append([group["lr"] for group in optimizer.param_groups])


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_trainer_steps_with_the_decayed_rates(decay, tiny_model_dir, sentiment_files, tmp_path) -> None:
    data = ingest_files(*sentiment_files, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    tokens = tokenize_dataset(
        Path(data.dataset_dir), tiny_model_dir, data.data_hash, 32, "sequence-classification", tmp_path / "cache"
    )
    config = TrainingConfig(
        max_steps=3, batch_size=16, eval_every_steps=3, learning_rate=1e-3, warmup_ratio=0.0,
        precision="fp32", layer_lr_decay=decay, label_smoothing=0.1,
    )  # fmt: skip
    recorder = RecordRates()
    result = train_model(
        Path(tokens.tokenized_dir), tiny_model_dir, "sequence-classification", data.id2label, config,
        tmp_path / "run", "accuracy", callbacks=[recorder],
    )  # fmt: skip

    assert result.steps == 3 and len(recorder.rates) == 3
    rates = sorted(set(recorder.rates[0]))
    if decay == 1.0:  # Trainer's own optimizer: one rate (two groups, with and without weight decay)
        assert len(rates) == 1
    else:  # embeddings, layer 0, layer 1, top: each half the next, through the linear schedule
        assert [r / rates[-1] for r in rates] == pytest.approx([0.125, 0.25, 0.5, 1.0])
        assert max(recorder.rates[-1]) < max(recorder.rates[0])  # the schedule decays them


def test_the_finance_scenario_trains_with_layer_decay_and_label_smoothing() -> None:
    training = FinetuneConfig.for_scenario("finance-monitoring").training
    assert (training.layer_lr_decay, training.label_smoothing, training.learning_rate) == (0.8, 0.1, 1e-4)
    assert (training.epochs, training.eval_every_steps, training.early_stopping_patience) == (5.0, 100, 6)
    sentiment = FinetuneConfig.for_scenario("sentiment").training
    assert (sentiment.layer_lr_decay, sentiment.label_smoothing) == (1.0, 0.0)
