"""Stage 5, export: torch.onnx export with dynamic batch and sequence axes, and a parity gate.

The gate runs real eval texts through both the PyTorch checkpoint and the exported graph, at
several batch shapes, through the very scorer that serving uses (``tokenizers`` +
onnxruntime). It passes only if max |logit difference| <= tolerance and every predicted label
agrees; otherwise it raises ``ParityError`` and nothing downstream is published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import ParityError
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.ingestion import IngestResult
from finetune_flows.tasks.core.tokenization import TokenizeResult
from finetune_flows.tasks.core.tracking import RunInfo

logger = logging.getLogger(__name__)

# Batch sizes of the parity check: a single text, an odd size, and full batches.
PARITY_BATCH_SIZES = (1, 7, 32, 64)


class ExportResult(BaseModel):
    """The checked ONNX file and the evidence of the parity gate."""

    model_config = ConfigDict(frozen=True)

    onnx_path: str
    parity_texts: int
    parity_shapes: list[list[int]]
    max_abs_diff: float
    labels_agree: bool


def trace_to_onnx(
    wrapper: Any,
    tokenizer: Any,
    names: Sequence[str],
    onnx_path: Path,
    opset: int,
    output_names: list[str] | None = None,
) -> Any:
    """Export ``wrapper`` (in eval mode: no dropout) with dynamic batch and sequence axes; returns the graph."""
    import onnx
    import torch

    example = tokenizer(["an example", "a longer example sentence for tracing"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper,
        (),
        str(onnx_path),
        kwargs={n: example[n] for n in names},
        input_names=list(names),
        output_names=output_names,
        dynamic_shapes={n: {0: batch, 1: seq} for n in names},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return onnx.load(str(onnx_path))


def save_with_metadata(graph: Any, meta: dict[str, str], onnx_path: Path) -> None:
    """Replace the graph's metadata with ``meta`` (plus the producer) and write it to ``onnx_path``."""
    import onnx

    del graph.metadata_props[:]
    for key, value in {**meta, "producer": "finetune-flows"}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(onnx_path))


def export_onnx(model_dir: Path, onnx_path: Path, max_length: int, tokenizer_hash: str, opset: int = 18) -> Path:
    """Export the checkpoint at ``model_dir`` to one ONNX file with its labels in the metadata."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), use_safetensors=True, attn_implementation="eager"
    ).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{k: v for k, v in inputs.items() if v is not None}).logits

    graph = trace_to_onnx(LogitsOnly().eval(), tokenizer, names, onnx_path, opset, output_names=["logits"])
    meta = {
        "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        "max_length": str(max_length),
        "tokenizer_hash": tokenizer_hash,
    }
    save_with_metadata(graph, meta, onnx_path)
    logger.info("export: wrote %s (%.1f MB)", onnx_path, onnx_path.stat().st_size / 1e6)
    return onnx_path


def check_parity(
    onnx_path: Path, model_dir: Path, texts: list[str], tolerance: float = 1e-4, min_texts: int = 256
) -> ExportResult:
    """Compare ONNX (serving path) with PyTorch on ``texts`` at several batch shapes."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from finetune_flows.tasks.serving.classifier import OnnxTextClassifier

    if len(texts) < min_texts:
        raise ParityError(f"parity needs at least {min_texts} eval texts, got {len(texts)}")
    scorer = OnnxTextClassifier(onnx_path, model_dir / "tokenizer.json")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    worst, agree, start = 0.0, True, 0
    shapes: list[tuple[int, int]] = []
    with torch.inference_mode():
        while start < len(texts):
            size = PARITY_BATCH_SIZES[len(shapes) % len(PARITY_BATCH_SIZES)]
            chunk = texts[start : start + size]
            start += size
            batch = scorer.encode(chunk)
            rows, width = batch["input_ids"].shape
            shapes.append((rows, width))
            onnx_logits = scorer.session.run(["logits"], batch)[0]
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
            worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
            agree = agree and bool((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).all())
    result = ExportResult(
        onnx_path=str(onnx_path),
        parity_texts=len(texts),
        parity_shapes=[list(shape) for shape in sorted(set(shapes))],
        max_abs_diff=worst,
        labels_agree=agree,
    )
    if worst > tolerance or not agree:
        raise ParityError(
            f"ONNX parity failed for {onnx_path}: max |logit difference| {worst:.3g} (allowed {tolerance:g}), "
            f"predicted labels {'agree' if agree else 'DIFFER'} on {len(texts)} texts; nothing was published"
        )
    logger.info("export: parity ok on %d texts, %d shapes, max |diff| %.2g", len(texts), len(shapes), worst)
    return result


def parity_texts(dataset_dir: Path, count: int) -> list[str]:
    """``count`` real texts for the parity gate: eval texts first, topped up from train if eval is small."""
    import pandas as pd

    texts = pd.read_parquet(dataset_dir / "eval.parquet")["text"].tolist()
    if len(texts) < count:
        texts += pd.read_parquet(dataset_dir / "train.parquet")["text"].tolist()[: count - len(texts)]
    return texts[:count]


@task(name="export-onnx")
def export_model(
    model_dir: str, data: IngestResult, tokens: TokenizeResult, config: FinetuneConfig, run: RunInfo
) -> ExportResult:
    """Export to ONNX and pass the parity gate, or fail so that nothing is published."""
    import mlflow

    onnx_path = export_onnx(
        Path(model_dir),
        Path(run.run_dir) / "onnx" / "model.onnx",
        config.model.max_length,
        tokens.tokenizer_hash,
        config.export.opset,
    )
    texts = parity_texts(Path(data.dataset_dir), config.export.parity_samples)
    mlflow.set_tracking_uri(run.tracking_uri)
    try:
        result = check_parity(onnx_path, Path(model_dir), texts, config.export.tolerance)
    except ParityError:
        with mlflow.start_run(run_id=run.run_id):
            mlflow.set_tag("onnx_parity", "failed")
        raise
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metric("onnx_max_abs_logit_diff", result.max_abs_diff)
        mlflow.set_tag("onnx_parity", "passed")
    return result


class TopicEncoderResult(BaseModel):
    """A folder with the sentence encoder (ONNX), its tokenizer and the taxonomy, parity-checked."""

    model_config = ConfigDict(frozen=True)

    folder: str
    max_abs_diff: float


@task(name="export-topic-encoder")
def export_topic_encoder(data: IngestResult, config: FinetuneConfig, run: RunInfo) -> TopicEncoderResult | None:
    """For scenarios with a topic taxonomy: the MiniLM sentence encoder as ONNX, checked like the classifier."""
    from finetune_flows.plugins import SCENARIOS

    taxonomy = SCENARIOS.get(config.scenario).taxonomy()
    if taxonomy is None:
        return None

    import shutil

    from finetune_flows.tasks.core.model_source import minilm_path
    from finetune_flows.tasks.export.encoder_export import check_encoder_parity, export_sentence_encoder
    from finetune_flows.tasks.serving.topics import TAXONOMY_FILE, load_taxonomy

    load_taxonomy(taxonomy)  # fail here, before anything is published, if the taxonomy is invalid
    source = minilm_path()
    folder = Path(run.run_dir) / "topic_encoder"
    onnx_path = export_sentence_encoder(source, folder / "encoder.onnx", opset=config.export.opset)
    shutil.copy2(source / "tokenizer.json", folder / "tokenizer.json")
    shutil.copy2(taxonomy, folder / TAXONOMY_FILE)
    texts = parity_texts(Path(data.dataset_dir), config.export.parity_samples)
    worst = check_encoder_parity(onnx_path, source, texts, config.export.tolerance)
    return TopicEncoderResult(folder=str(folder), max_abs_diff=worst)
