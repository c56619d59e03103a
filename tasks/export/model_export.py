"""Stage export, for any head: its ``export_module`` to one ONNX file, then the parity gate.

The head says what is exported (``export_module``, ``export_output``, ``export_metadata``); the
one core in ``tasks.export.onnx_graph`` traces it and compares the graph, run as serving runs it,
with that same module on real texts of the prepared dataset. A failed gate raises ``ParityError``
and nothing downstream is published.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task

from finetune_flows.plugins import HEADS, ParityError
from finetune_flows.tasks.core import model_source
from finetune_flows.tasks.core.config import ExportConfig
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.export.onnx_graph import ExportResult, check_parity, export_graph
from finetune_flows.tasks.serving.encoder import DEFAULT_MAX_LENGTH

logger = logging.getLogger(__name__)

MIN_PARITY_TEXTS = 256
"""The fewest texts the gate of a fine-tuned model accepts."""
SENTENCE_ENCODER_HEAD = "bi-encoder"
"""The head whose export module (encoder, mean pooling, L2 norm) exports a plain sentence encoder."""


def export_head(
    model_dir: Path, head_name: str, onnx_path: Path, max_length: int, tokenizer_hash: str, opset: int = 18
) -> Path:
    """Export head ``head_name``'s model at ``model_dir`` to ``onnx_path`` with the head's metadata.

    Besides the head's own keys the metadata carries ``max_length`` and ``tokenizer_hash``.
    """
    head = HEADS.get(head_name)
    meta = {**head.export_metadata(model_dir), "max_length": str(max_length), "tokenizer_hash": tokenizer_hash}
    return export_graph(head.export_module(model_dir), model_dir, onnx_path, head.export_output, meta, opset)


def check_head_parity(
    onnx_path: Path,
    model_dir: Path,
    head_name: str,
    texts: list[str],
    tolerance: float = 1e-4,
    min_texts: int = MIN_PARITY_TEXTS,
) -> ExportResult:
    """The parity gate of ``onnx_path`` against head ``head_name``'s export module for ``model_dir``.

    The module is built now and computes with the head's code as it is now: a head whose
    forward (for the bi-encoder, its pooling) changed since the export fails the gate.
    """
    head = HEADS.get(head_name)
    module = head.export_module(model_dir)
    return check_parity(
        onnx_path, model_dir / "tokenizer.json", module, head.export_output, texts, tolerance, min_texts
    )


def parity_texts(dataset_dir: Path, count: int, columns: tuple[str, ...] = ("text",)) -> list[str]:
    """``count`` real texts for the parity gate: eval rows first, topped up from train if eval is small.

    With several text ``columns`` (a pair head's query and item) each row gives its texts in turn.
    """
    import pandas as pd

    texts: list[str] = []
    for split in ("eval", "train"):
        frame = pd.read_parquet(dataset_dir / f"{split}.parquet", columns=list(columns))
        texts += frame.to_numpy().ravel().tolist()[: count - len(texts)]
    return texts


@task(name="export-onnx")
def export_model(
    model_dir: str,
    head: str,
    dataset_dir: str,
    export: ExportConfig,
    max_length: int,
    tokenizer_hash: str,
    run: RunInfo,
) -> ExportResult:
    """Export to ONNX and pass the parity gate, or fail so that nothing is published."""
    import mlflow

    folder = Path(model_dir)
    onnx_path = export_head(
        folder, head, Path(run.run_dir) / "onnx" / "model.onnx", max_length, tokenizer_hash, export.opset
    )
    texts = parity_texts(Path(dataset_dir), export.parity_samples, HEADS.get(head).text_columns)
    mlflow.set_tracking_uri(run.tracking_uri())
    try:
        result = check_head_parity(onnx_path, folder, head, texts, export.tolerance)
    except ParityError:
        with mlflow.start_run(run_id=run.run_id):
            mlflow.set_tag("onnx_parity", "failed")
        raise
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metric("onnx_max_abs_diff", result.max_abs_diff)
        mlflow.set_tag("onnx_parity", "passed")
    return result


def export_sentence_encoder(
    model_dir: Path, onnx_path: Path, opset: int = 18, max_length: int = DEFAULT_MAX_LENGTH
) -> Path:
    """A sentence encoder (such as all-MiniLM-L6-v2) with mean pooling and L2 norm inside one ONNX file.

    Exported as the bi-encoder head's export module, so ``check_head_parity`` with that head checks it.
    """
    tokenizer_hash = model_source.tokenizer_hash(model_dir)
    return export_head(model_dir, SENTENCE_ENCODER_HEAD, onnx_path, max_length, tokenizer_hash, opset)
