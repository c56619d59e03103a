"""The finance scenario's extra stage: ship a topic assigner with the classifier, so ``monitor`` can group texts.

Before registration, the all-MiniLM-L6-v2 sentence encoder is exported to ONNX through the
bi-encoder head (the same pooling the recommender serves), checked against that head on the
run's own eval texts, and put in a folder with its tokenizer and the scenario's taxonomy. The
folder travels inside the registered model (``TOPIC_ARTIFACT``); its served pyfunc then adds a
``topic`` column. An invalid taxonomy fails here, before anything is published.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from finetune_flows.plugins import SCENARIOS, ConfigError
from finetune_flows.tasks.core.model_source import minilm_path
from finetune_flows.tasks.core.stages import StageContext, StageOutput
from finetune_flows.tasks.export.model_export import (
    SENTENCE_ENCODER_HEAD,
    check_head_parity,
    export_sentence_encoder,
    parity_texts,
)
from finetune_flows.tasks.monitoring.taxonomy import load_taxonomy
from finetune_flows.tasks.serving.classifier import TOPIC_ARTIFACT
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TAXONOMY_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)


def build_topic_folder(
    source: Path, taxonomy: Path, folder: Path, texts: list[str], opset: int, tolerance: float
) -> float:
    """Export ``source``'s sentence encoder, its tokenizer and ``taxonomy`` into ``folder``; the parity max |diff|."""
    load_taxonomy(taxonomy)  # fail before anything is published if the taxonomy is invalid
    onnx_path = export_sentence_encoder(source, folder / ENCODER_FILE, opset=opset)
    shutil.copy2(source / "tokenizer.json", folder / TOKENIZER_FILE)
    shutil.copy2(taxonomy, folder / TAXONOMY_FILE)
    result = check_head_parity(onnx_path, source, SENTENCE_ENCODER_HEAD, texts, tolerance, min_texts=1)
    return result.max_abs_diff


def export_topic_encoder(context: StageContext) -> StageOutput:
    """The scenario's taxonomy with the offline sentence encoder, as a folder the served model carries."""
    config = context.config
    taxonomy = SCENARIOS.get(config.scenario).taxonomy()
    if taxonomy is None or context.data is None:
        raise ConfigError(f"scenario {config.scenario!r} declares a topic stage but no taxonomy")
    folder = Path(context.run.run_dir) / "topic_encoder"
    texts = parity_texts(Path(context.data.dataset_dir), config.export.parity_samples)
    worst = build_topic_folder(minilm_path(), taxonomy, folder, texts, config.export.opset, config.export.tolerance)
    logger.info("topic encoder: %s (parity max |diff| %.2g)", folder, worst)
    return StageOutput(
        metrics={"topic_encoder_max_abs_diff": worst},
        tags={"topics": Path(taxonomy).name},
        served_artifacts={TOPIC_ARTIFACT: str(folder)},
    )
