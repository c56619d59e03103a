"""The drift reference a version carries, and how the monitor finds it again.

A scenario stage (``record_drift_reference``, before registration) measures the reference of
``drift.py`` on the run's own prepared data: up to ``SAMPLE`` training texts embedded with the
sentence encoder the version ships for topics (or, without one, all-MiniLM-L6-v2 exported into the
reference folder), the training vocabulary, and the served graph's predictions on the eval texts.
The folder travels inside the registered model as artifact ``drift_reference``.

The monitor downloads it (and the encoder it names) once per model version into its store, so the
texts of a window are embedded by the same encoder as the training sample.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from finetune_flows.tasks.core.stages import StageContext, StageOutput
from finetune_flows.tasks.monitoring.drift import DriftReference, label_shares, median_distance, oov_rate, words
from finetune_flows.tasks.serving.classifier import TOPIC_ARTIFACT, OnnxTextClassifier
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)

DRIFT_ARTIFACT = "drift_reference"
REFERENCE_FILE, EMBEDDINGS_FILE, ENCODER_NOTE = "reference.json", "embeddings.npy", "encoder.json"
SAMPLE = 1000


def build_reference(
    train_texts: list[str],
    eval_texts: list[str],
    eval_labels: list[str],
    eval_confidences: list[float],
    encoder: SentenceEncoder,
    seed: int = 0,
) -> tuple[DriftReference, np.ndarray]:
    """The reference and its embeddings: a seeded sample of ``train_texts``, the eval texts' predictions."""
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(train_texts), min(SAMPLE, len(train_texts)), replace=False).tolist())
    sample = [train_texts[i] for i in pick]
    embeddings = encoder.encode(sample).astype(np.float32)
    vocabulary = sorted({w for text in train_texts for w in words(text)})
    reference = DriftReference(
        label_shares=label_shares(eval_labels),
        mean_confidence=float(np.mean(eval_confidences)) if eval_confidences else 1.0,
        oov_rate=oov_rate(eval_texts, set(vocabulary)),
        vocabulary=vocabulary,
        lengths=[len(words(t)) for t in sample],
        bandwidth=median_distance(embeddings),
        texts=len(train_texts),
    )
    return reference, embeddings


def write_reference(reference: DriftReference, embeddings: np.ndarray, folder: Path, encoder_artifact: str) -> Path:
    """``folder`` with the reference, its embeddings and the artifact that holds the encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REFERENCE_FILE).write_text(reference.model_dump_json(), encoding="utf-8")
    np.save(folder / EMBEDDINGS_FILE, embeddings)
    (folder / ENCODER_NOTE).write_text(json.dumps({"artifact": encoder_artifact}), encoding="utf-8")
    return folder


def record_drift_reference(context: StageContext) -> StageOutput:
    """Scenario stage: measure the drift reference on the run's data and ship it with the model."""
    from finetune_flows.tasks.core.model_source import minilm_path
    from finetune_flows.tasks.export.model_export import export_sentence_encoder

    if context.data is None or context.onnx_path is None or context.model_dir is None:
        raise ValueError("the drift reference needs the prepared data, the served graph and the model folder")
    dataset = Path(context.data.dataset_dir)
    train = pd.read_parquet(dataset / "train.parquet", columns=["text"])["text"].astype(str).tolist()
    evaluation = pd.read_parquet(dataset / "eval.parquet", columns=["text"])["text"].astype(str).tolist()
    predicted = OnnxTextClassifier(context.onnx_path, Path(context.model_dir) / "tokenizer.json").predict(evaluation)
    folder = Path(context.run.run_dir) / DRIFT_ARTIFACT
    topics = Path(context.run.run_dir) / TOPIC_ARTIFACT  # the topic stage's encoder, when the scenario has one
    if (topics / ENCODER_FILE).is_file():
        source, artifact = topics, TOPIC_ARTIFACT
    else:
        export_sentence_encoder(minilm_path(), folder / ENCODER_FILE, opset=context.config.export.opset)
        shutil.copy2(minilm_path() / "tokenizer.json", folder / TOKENIZER_FILE)
        source, artifact = folder, DRIFT_ARTIFACT
    encoder = SentenceEncoder(source / ENCODER_FILE, source / TOKENIZER_FILE)
    reference, embeddings = build_reference(
        train, evaluation, predicted["label"].astype(str).tolist(), predicted["score"].astype(float).tolist(), encoder
    )
    write_reference(reference, embeddings, folder, artifact)
    logger.info(
        "drift reference: %d training texts (%d embedded), %d words, eval OOV %.3f, mean confidence %.3f",
        reference.texts, len(embeddings), len(reference.vocabulary), reference.oov_rate, reference.mean_confidence,
    )  # fmt: skip
    return StageOutput(
        metrics={"drift_reference_oov_rate": reference.oov_rate},
        tags={"drift_reference": f"{len(embeddings)} embedded of {reference.texts} training texts"},
        served_artifacts={DRIFT_ARTIFACT: str(folder)},
    )


def fetch_reference(model_name: str, version: str, cache: Path) -> tuple[DriftReference, np.ndarray, Path] | None:
    """(reference, embeddings, encoder folder) of ``models:/<model_name>/<version>``, downloaded once into
    ``cache``; None when the version carries no reference."""
    import mlflow

    target = cache / version
    uri = f"models:/{model_name}/{version}/artifacts"
    if not (target / DRIFT_ARTIFACT / REFERENCE_FILE).is_file() and not download(
        f"{uri}/{DRIFT_ARTIFACT}", target / DRIFT_ARTIFACT
    ):
        return None
    folder = target / DRIFT_ARTIFACT
    artifact = json.loads((folder / ENCODER_NOTE).read_text(encoding="utf-8"))["artifact"]
    encoder = target / artifact
    if not (encoder / ENCODER_FILE).is_file() and not download(f"{uri}/{artifact}", encoder):
        raise mlflow.exceptions.MlflowException(
            f"models:/{model_name}/{version} has a drift reference but not its encoder artifact {artifact!r}"
        )
    reference = DriftReference.model_validate_json((folder / REFERENCE_FILE).read_text(encoding="utf-8"))
    return reference, np.load(folder / EMBEDDINGS_FILE), encoder


def download(uri: str, target: Path) -> bool:
    """Download ``uri`` to ``target`` through a temporary folder (no half folder is left); False if it is absent."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
        except (mlflow.exceptions.MlflowException, OSError) as err:
            logger.info("no %s: %s", uri, str(err).splitlines()[0] if str(err) else type(err).__name__)
            return False
        if not local.is_dir() or not any(local.iterdir()):
            return False
        if target.exists():
            shutil.rmtree(target)
        local.rename(target)
    return True
