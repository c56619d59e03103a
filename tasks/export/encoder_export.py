"""Export a sentence encoder (such as all-MiniLM-L6-v2) to ONNX with its pooling inside the graph.

The graph takes the tokenizer's inputs and returns ``embedding``: mean pooling over the token
embeddings weighted by the attention mask, then L2 normalisation, which is how the
sentence-transformers model all-MiniLM-L6-v2 makes its sentence embeddings. ``tasks.serving.topics``
scores with it on onnxruntime, without torch. ``check_encoder_parity`` compares the graph, run
through ``tasks.serving.topics.SentenceEncoder``, with the PyTorch model and the same pooling.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import ConfigError, ParityError
from finetune_flows.tasks.core.model_source import tokenizer_hash
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.export.model_export import PARITY_BATCH_SIZES, save_with_metadata, trace_to_onnx
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.dataset import RankingData
from finetune_flows.tasks.serving.encoder import DEFAULT_MAX_LENGTH, EMBEDDING_OUTPUT, SentenceEncoder

if TYPE_CHECKING:
    import onnx
    import torch

logger = logging.getLogger(__name__)


def mean_pool_normalise(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token embeddings where the mask is 1, then scale each row to unit length."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The clamp keeps an all-padding row finite, as sentence-transformers' Pooling does.
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _check_pooling(model_dir: Path) -> None:
    """Refuse a sentence-transformers folder whose pooling is not the mean pooling exported here."""
    config = model_dir / "1_Pooling" / "config.json"
    if config.is_file() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens", False):
        raise ConfigError(f"{model_dir} does not use mean pooling ({config}); only mean pooling is exported")


def _name_output(graph: onnx.GraphProto, name: str) -> None:
    """Name the graph's single output ``name``, renaming first any inner value that already has it.

    Not ``output_names=[name]``: the dynamo exporter names values after their operators, so the
    word-embedding lookup is already called "embedding", and a clashing output name yields an
    invalid graph ("Duplicate definition of name"; pytorch/pytorch#158094).
    """
    (output,) = graph.output
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    if name in taken and output.name != name:
        spare = next(f"{name}_{i}" for i in range(len(taken) + 1) if f"{name}_{i}" not in taken)
        _rename(graph, name, spare)
    _rename(graph, output.name, name)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


def export_sentence_encoder(
    model_dir: Path, onnx_path: Path, opset: int = 18, max_length: int = DEFAULT_MAX_LENGTH
) -> Path:
    """Write ``model_dir``'s encoder with mean pooling and L2 normalisation as one ONNX file."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    _check_pooling(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True, attn_implementation="eager").eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class PooledEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            hidden = self.model(**{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
            return mean_pool_normalise(hidden, attention_mask)

    graph = trace_to_onnx(PooledEmbedding().eval(), tokenizer, names, onnx_path, opset)
    _name_output(graph.graph, EMBEDDING_OUTPUT)
    meta = {
        "max_length": str(max_length),
        "pooling": "mean",
        "normalize": "l2",
        "embedding_dim": str(model.config.hidden_size),
        "tokenizer_hash": tokenizer_hash(model_dir),
    }
    save_with_metadata(graph, meta, onnx_path)
    logger.info("encoder export: wrote %s (%.1f MB)", onnx_path, onnx_path.stat().st_size / 1e6)
    return onnx_path


def check_encoder_parity(onnx_path: Path, model_dir: Path, texts: list[str], tolerance: float = 1e-4) -> float:
    """Max |embedding difference| between the graph (through ``SentenceEncoder``) and PyTorch.

    Texts go in chunks of several batch sizes; both sides get the encoder's own token ids.
    Raises ``ParityError`` above ``tolerance``; returns the difference otherwise.
    """
    import torch
    from transformers import AutoModel

    if not texts:
        raise ParityError("encoder parity needs at least one text, got none")
    encoder = SentenceEncoder(onnx_path, model_dir / "tokenizer.json")
    model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True).eval()
    worst, start, chunks = 0.0, 0, 0
    with torch.inference_mode():
        while start < len(texts):
            chunk = texts[start : start + PARITY_BATCH_SIZES[chunks % len(PARITY_BATCH_SIZES)]]
            start, chunks = start + len(chunk), chunks + 1
            onnx_rows = encoder.encode(chunk, batch_size=len(chunk))
            batch = {k: torch.from_numpy(v) for k, v in encoder.tokenize(chunk).items()}
            hidden = model(**batch).last_hidden_state
            torch_rows = mean_pool_normalise(hidden, batch["attention_mask"]).numpy()
            worst = max(worst, float(np.abs(onnx_rows - torch_rows).max()))
    if not worst <= tolerance:  # also catches NaN
        raise ParityError(
            f"encoder parity failed for {onnx_path}: max |embedding difference| {worst:.3g} "
            f"(allowed {tolerance:g}) against {model_dir} on {len(texts)} texts; re-export the encoder"
        )
    logger.info("encoder export: parity ok on %d texts in %d batches, max |diff| %.2g", len(texts), chunks, worst)
    return worst


class EncoderExportResult(BaseModel):
    """The exported, parity-checked encoder of a bi-encoder."""

    model_config = ConfigDict(frozen=True)

    onnx_path: str
    max_abs_diff: float
    parity_texts: int


@task(name="export-pair-encoder")
def export_pair_encoder(
    model_dir: str, data: RankingData, config: RecommenderConfig, run: RunInfo
) -> EncoderExportResult:
    """Export the fine-tuned encoder with its pooling and check it against PyTorch on profiles and items."""
    folder = Path(model_dir)
    onnx_path = export_sentence_encoder(
        folder, Path(run.run_dir) / "encoder.onnx", opset=config.export.opset, max_length=config.model.max_length
    )
    half = config.export.parity_samples // 2
    texts = [*data.frame("validation")["profile"].head(half), *data.frame("items")["text"].head(half)]
    worst = check_encoder_parity(onnx_path, folder, texts, config.export.tolerance)
    return EncoderExportResult(onnx_path=str(onnx_path), max_abs_diff=worst, parity_texts=len(texts))
