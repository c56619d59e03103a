"""The one ONNX core of every head: trace a head's export module, name its output, write metadata, check parity.

``export_graph`` traces an eval-mode ``torch.nn.Module`` (a head's ``export_module``) with
``torch.onnx.export`` (dynamo) and dynamic batch and sequence axes, names the graph's single
output and writes one ONNX file with the given metadata.

``check_parity`` is the gate before anything is published: real texts go in chunks of
``PARITY_BATCH_SIZES`` through the graph, exactly as serving runs it (the scorer of
``tasks.serving`` tokenizes and its onnxruntime session runs), and through the module on the same
token ids. It passes only if max |difference| <= tolerance (NaN fails) and, for logits, every
predicted label agrees; otherwise it raises ``ParityError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import ConfigError, ParityError

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

# Batch sizes of the parity check: a single text, an odd size, and full batches.
PARITY_BATCH_SIZES = (1, 7, 32, 64)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
LOGITS, EMBEDDING = "logits", "embedding"
_DIFFERENCE = {LOGITS: "logit", EMBEDDING: "embedding"}


class ExportResult(BaseModel):
    """The checked ONNX file and the evidence of the parity gate."""

    model_config = ConfigDict(frozen=True)

    onnx_path: str
    parity_texts: int
    parity_shapes: list[list[int]]
    max_abs_diff: float
    labels_agree: bool | None
    """Whether graph and module predict the same label for every text; None for an output without labels."""


def trace_to_onnx(module: Any, model_dir: Path, onnx_path: Path, opset: int) -> onnx.ModelProto:
    """Trace ``module`` (eval mode: no dropout) with dynamic batch and sequence axes; returns the graph.

    The inputs are those of the tokenizer in ``model_dir``; the example batch has two lengths.
    """
    import onnx
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    example = tokenizer(["an example", "a longer example sentence for tracing"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        (),
        str(onnx_path),
        kwargs={n: example[n] for n in names},
        input_names=names,
        dynamic_shapes={n: {0: batch, 1: seq} for n in names},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return onnx.load(str(onnx_path))


def name_output(graph: onnx.GraphProto, name: str) -> None:
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


def save_with_metadata(graph: onnx.ModelProto, meta: dict[str, str], onnx_path: Path) -> None:
    """Replace the graph's metadata with ``meta`` (plus the producer) and write it to ``onnx_path``."""
    import onnx

    del graph.metadata_props[:]
    for key, value in {**meta, "producer": "finetune-flows"}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(onnx_path))


def export_graph(
    module: Any, model_dir: Path, onnx_path: Path, output: str, meta: dict[str, str], opset: int = 18
) -> Path:
    """Write ``module`` as one ONNX file whose single output is called ``output``, with ``meta``."""
    graph = trace_to_onnx(module, model_dir, onnx_path, opset)
    name_output(graph.graph, output)
    save_with_metadata(graph, meta, onnx_path)
    logger.info("export: wrote %s (%.1f MB)", onnx_path, onnx_path.stat().st_size / 1e6)
    return onnx_path


def serving_inputs(onnx_path: Path, tokenizer_path: Path, output: str) -> tuple[Any, Callable[[list[str]], Any]]:
    """The onnxruntime session and the batch builder of the scorer that serves ``output``."""
    from finetune_flows.tasks.serving.classifier import OnnxTextClassifier
    from finetune_flows.tasks.serving.encoder import SentenceEncoder

    if output == LOGITS:
        classifier = OnnxTextClassifier(onnx_path, tokenizer_path)
        return classifier.session, classifier.encode
    if output == EMBEDDING:
        encoder = SentenceEncoder(onnx_path, tokenizer_path)
        return encoder.session, encoder.tokenize
    raise ConfigError(f"no serving scorer for a graph output {output!r}; known outputs: {sorted(_DIFFERENCE)}")


def check_parity(
    onnx_path: Path,
    tokenizer_path: Path,
    module: Any,
    output: str,
    texts: list[str],
    tolerance: float = 1e-4,
    min_texts: int = 1,
) -> ExportResult:
    """Compare the graph (through the serving scorer) with ``module`` on ``texts`` at several batch shapes."""
    import torch

    needed = max(min_texts, 1)
    if len(texts) < needed:
        raise ParityError(f"parity needs at least {needed} eval texts, got {len(texts)}")
    session, make_batch = serving_inputs(onnx_path, tokenizer_path, output)
    diffs: list[float] = []
    agree: bool | None = True if output == LOGITS else None
    shapes: list[tuple[int, int]] = []
    start = 0
    with torch.inference_mode():
        while start < len(texts):
            chunk = texts[start : start + PARITY_BATCH_SIZES[len(shapes) % len(PARITY_BATCH_SIZES)]]
            start += len(chunk)
            batch = make_batch(chunk)
            rows, width = batch["input_ids"].shape
            shapes.append((rows, width))
            graph_out = session.run([output], batch)[0]
            module_out = module(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
            if graph_out.shape != module_out.shape:
                raise ParityError(
                    f"ONNX parity failed for {onnx_path}: the graph's {output} have shape {graph_out.shape}, "
                    f"the model's {module_out.shape} on a batch of {rows}; nothing was published"
                )
            diffs.append(float(np.abs(graph_out - module_out).max()))
            if agree is not None:
                agree = agree and bool((graph_out.argmax(-1) == module_out.argmax(-1)).all())
    worst = float(np.max(diffs))  # np.max, not max(): a NaN must not be skipped
    result = ExportResult(
        onnx_path=str(onnx_path),
        parity_texts=len(texts),
        parity_shapes=[list(shape) for shape in sorted(set(shapes))],
        max_abs_diff=worst,
        labels_agree=agree,
    )
    if not worst <= tolerance or agree is False:  # "not <=" also catches NaN
        labels = "" if agree is None else f", predicted labels {'agree' if agree else 'DIFFER'}"
        raise ParityError(
            f"ONNX parity failed for {onnx_path}: max |{_DIFFERENCE.get(output, output)} difference| {worst:.3g} "
            f"(allowed {tolerance:g}){labels} on {len(texts)} texts; nothing was published"
        )
    logger.info("export: parity ok on %d texts, %d shapes, max |diff| %.2g", len(texts), len(shapes), worst)
    return result
