"""Publishing the adapted encoder: an ONNX sentence encoder checked against the checkpoint, registered as its own
MLflow model through the one publishing path (``publish_version``).

The served pyfunc (``tasks/serving/encoder_model.py``) embeds texts; the version also carries the Hugging
Face checkpoint as artifact ``hf_model``, which ``model.source=models:/<name>@<alias>`` fine-tunes. The
promotion gate compares ``neg_mlm_loss`` (minus the MLM loss on held-back text: higher is better) of
versions measured on the same held-back texts with the same tokenizer and masking; the first version
becomes champion, a later one only when its loss is lower by more than ``registration.promotion_margin``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune_flows.plugins import PluginError
from finetune_flows.tasks.core.config import ExportConfig
from finetune_flows.tasks.core.model_source import HF_SUBDIR
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.export.model_export import SENTENCE_ENCODER_HEAD, check_head_parity, export_sentence_encoder
from finetune_flows.tasks.export.onnx_graph import ExportResult
from finetune_flows.tasks.pretraining.config import PretrainConfig
from finetune_flows.tasks.pretraining.corpus import CorpusResult
from finetune_flows.tasks.pretraining.masking import TokenizedCorpus
from finetune_flows.tasks.pretraining.pretraining import PretrainResult, summary_of
from finetune_flows.tasks.publishing.registration import (
    RegisterResult,
    ServedModel,
    publish_version,
    summary_markdown,
)
from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from finetune_flows.tasks.serving.packaging import SERVING_REQUIREMENTS, served_code_paths

PRIMARY_METRIC = "neg_mlm_loss"
"""The gate's metric: minus the MLM loss on the held-back texts (the gate promotes the higher)."""
ENTRY_MODULE = "finetune_flows.tasks.serving.encoder_model"
EXAMPLE_ROWS = 3


def corpus_texts(corpus_dir: Path, count: int) -> list[str]:
    """Up to ``count`` texts, held-back ones first, topped up from the training texts."""
    texts: list[str] = []
    for split in ("held_back", "train"):
        texts += pd.read_parquet(corpus_dir / f"{split}.parquet")["text"].tolist()[: count - len(texts)]
    return texts


def measurement_hash(corpus: CorpusResult, tokens: TokenizedCorpus, config: PretrainConfig) -> str:
    """What makes two MLM losses comparable: the held-back texts, the tokenizer, the length and the masking."""
    training = config.training
    parts = [
        corpus.held_back_hash, tokens.tokenizer_hash, str(tokens.max_length), str(training.mlm_probability),
        str(training.whole_word), str(training.seed),
    ]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@task(name="export-encoder")
def export_encoder(model_dir: str, corpus: CorpusResult, export: ExportConfig, max_length: int) -> ExportResult:
    """The adapted encoder as an ONNX sentence encoder (mean pooling, L2 norm) that passed the parity gate on the
    corpus's texts, or a ``ParityError`` so that nothing is published."""
    folder = Path(model_dir)
    onnx_path = export_sentence_encoder(folder, folder.parent / "onnx" / "encoder.onnx", export.opset, max_length)
    texts = corpus_texts(Path(corpus.corpus_dir), export.parity_samples)
    return check_head_parity(onnx_path, folder, SENTENCE_ENCODER_HEAD, texts, export.tolerance, min_texts=1)


@task(name="register-encoder")
def register_encoder(
    config: PretrainConfig,
    corpus: CorpusResult,
    tokens: TokenizedCorpus,
    trained: PretrainResult,
    exported: ExportResult,
    run: RunInfo,
) -> RegisterResult:
    """Register the adapted encoder as a version of ``config.model_name`` with its evidence, through the gate."""
    import mlflow

    spec = importlib.util.find_spec(ENTRY_MODULE)
    if spec is None or spec.origin is None:
        raise PluginError(f"serving entry module {ENTRY_MODULE!r} not found")
    mlflow.set_tracking_uri(run.tracking_uri())
    tags = {
        "scenario": config.scenario,
        "head": config.head_name,
        "corpus.kind": config.corpus.kind.value,
        "corpus.summary": corpus.summary,
        "data_hash": corpus.data_hash,
        "tokenizer_hash": tokens.tokenizer_hash,
        "model_source": config.model.source,
        "mlm_head": "built" if trained.head_built else "loaded",
        "onnx_max_abs_diff": f"{exported.max_abs_diff:.3g}",
        **{key: f"{value:.4f}" for key, value in summary_of(trained).items()},
    }
    with mlflow.start_run(run_id=run.run_id):
        mlflow.set_tags(tags)
        mlflow.log_metric("onnx_max_abs_diff", exported.max_abs_diff)
    served = ServedModel(
        python_model=spec.origin,
        artifacts={
            ONNX_ARTIFACT: exported.onnx_path,
            TOKENIZER_ARTIFACT: str(Path(trained.model_dir) / "tokenizer.json"),
            HF_SUBDIR: trained.model_dir,
        },
        code_paths=served_code_paths(Path(run.run_dir) / "served_code"),
        pip_requirements=SERVING_REQUIREMENTS,
        input_example=corpus_texts(Path(corpus.corpus_dir), EXAMPLE_ROWS),
    )
    result = publish_version(
        run.run_id,
        config.model_name,
        served,
        metric=-trained.loss_after,
        primary_metric=PRIMARY_METRIC,
        eval_hash=measurement_hash(corpus, tokens, config),
        margin=config.registration.promotion_margin,
        tags=tags,
        idempotency_key=config.registration.idempotency_key or f"mlflow-run:{run.run_id}",
    )
    create_markdown_artifact(
        key=f"{config.scenario}-encoder-registration",
        description="Registered adapted encoder and promotion decision",
        markdown=summary_markdown(result, PRIMARY_METRIC, run.tracking_uri_redacted),
    )
    return result
