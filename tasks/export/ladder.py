"""The export ladder: faster variants of the parity-checked fp32 graph, each timed here and gated on real texts.

Candidates (``tasks.export.variants``): the fp32 graph, its ORT-fused form, dynamic int8 (one per
weight layout the CPU calls for) and static int8 calibrated on the eval texts. Each is

- timed on this machine's CPU through the serving scorer (tokenization included), in texts/s at batch
  1 and at batch 64;
- compared with the fp32 graph on the eval texts: for logits, the share of texts whose prediction (the
  head's ``predict``; every token of a text for per-token heads) is the same; for embeddings, the mean
  cosine;
- scored with the head's own evaluation (``Evaluator.score_graph``): its loss of the primary metric
  against the fp32 graph's.

A variant passes when agreement (or cosine) and metric loss are within ``ExportConfig``'s bounds.
When full dynamic int8 fails, the weights that change the outputs most (each quantised alone, the
mean |output change| on the first eval texts) are kept in fp32 one by one until it passes or half are
kept: the accuracy-aware fallback of mixed precision. The fastest passing variant at batch 64 is
served; a failing one never is. fp32 always passes, so there is always one to serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.export.onnx_graph import EMBEDDING, serving_inputs

logger = logging.getLogger(__name__)

SPEED_BATCH, SINGLE = 64, 1
SENSITIVITY_TEXTS = 128


class Gate(BaseModel):
    """Bounds a variant must meet against the fp32 graph."""

    model_config = ConfigDict(frozen=True)

    min_agreement: float = 0.99
    min_cosine: float = 0.99
    max_metric_loss: float = 0.003


class Rung(BaseModel):
    """One candidate: how fast, how close to fp32, and whether it may be served."""

    model_config = ConfigDict(frozen=True)

    variant: str
    path: str
    texts_per_s_batch1: float
    texts_per_s_batch64: float
    agreement: float
    """Share of eval texts predicted as the fp32 graph predicts them; for embeddings the mean cosine."""
    worst_cosine: float | None = None
    metric: float
    metric_loss: float
    """fp32's primary metric minus this variant's (positive: worse)."""
    kept_fp32: int = 0
    """Weight MatMuls left in fp32 by the fallback."""
    size_mb: float
    passed: bool
    note: str = ""


class Outputs:
    """A graph's raw outputs on fixed batches of texts (the same batches for every variant)."""

    def __init__(self, path: Path, tokenizer: Path, output: str, batches: list[list[str]]) -> None:
        session, make_batch = serving_inputs(path, tokenizer, output)
        self.arrays: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for chunk in batches:
            inputs = make_batch(chunk)
            self.arrays.append(session.run([output], inputs)[0])
            self.masks.append(inputs["attention_mask"].astype(bool))


def agreement(reference: Outputs, candidate: Outputs, output: str, head: str) -> tuple[float, float | None]:
    """(agreement, worst cosine): embeddings compare by cosine, logits by the head's predictions per text."""
    if output == EMBEDDING:
        cosines = np.concatenate(
            [
                (r * c).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1) + 1e-12)
                for r, c in zip(reference.arrays, candidate.arrays, strict=True)
            ]
        )
        return float(cosines.mean()), float(cosines.min())
    predict = HEADS.get(head).predict
    same: list[np.ndarray] = []
    for r, c, mask in zip(reference.arrays, candidate.arrays, reference.masks, strict=True):
        left, right = predict(r)[0], predict(c)[0]
        equal = left == right
        if equal.ndim == 2 and equal.shape == mask.shape:  # per-token predictions: padding does not count
            equal = equal | ~mask
        same.append(equal.reshape(len(equal), -1).all(axis=1))
    return float(np.concatenate(same).mean()), None


def throughput(path: Path, tokenizer: Path, output: str, texts: list[str], batch_size: int, repeats: int = 3) -> float:
    """Texts/s of the serving path (tokenize + run) in batches of ``batch_size`` texts sorted by length; the best of
    ``repeats`` passes over ``texts`` after a warm-up batch."""
    session, make_batch = serving_inputs(path, tokenizer, output)
    ordered = sorted(texts, key=len)
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    session.run([output], make_batch(chunks[0]))  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for chunk in chunks:
            session.run([output], make_batch(chunk))
        best = max(best, len(ordered) / (time.perf_counter() - start))
    return best


class Judge:
    """Times a candidate, compares it with fp32 and applies the gate."""

    def __init__(
        self,
        reference: Path,
        tokenizer: Path,
        output: str,
        head: str,
        texts: list[str],
        score: Callable[[str], float],
        gate: Gate,
        repeats: int = 3,
    ) -> None:
        self.tokenizer, self.output, self.head, self.texts = tokenizer, output, head, texts
        self.score, self.gate, self.repeats = score, gate, repeats
        self.batches = [texts[i : i + SPEED_BATCH] for i in range(0, len(texts), SPEED_BATCH)]
        self.reference = Outputs(reference, tokenizer, output, self.batches)
        self.reference_metric = score(str(reference))

    def check(self, path: Path) -> tuple[float, float | None, float, bool]:
        """(agreement, worst cosine, metric, passed) of the graph at ``path``."""
        candidate = Outputs(path, self.tokenizer, self.output, self.batches)
        agree, worst = agreement(self.reference, candidate, self.output, self.head)
        metric = self.score(str(path))
        bound = self.gate.min_cosine if self.output == EMBEDDING else self.gate.min_agreement
        passed = agree >= bound and self.reference_metric - metric <= self.gate.max_metric_loss
        return agree, worst, metric, passed

    def rung(
        self,
        variant: str,
        path: Path,
        kept_fp32: int = 0,
        note: str = "",
        checked: tuple[float, float | None, float, bool] | None = None,
    ) -> Rung:
        """The full row for ``path``: gate (``checked`` when already known) and timings."""
        agree, worst, metric, passed = checked or self.check(path)
        timing = self.texts[: SPEED_BATCH * 4]
        speed = [
            throughput(path, self.tokenizer, self.output, texts, size, self.repeats)
            for texts, size in ((timing[:32], SINGLE), (timing, SPEED_BATCH))
        ]
        return Rung(
            variant=variant,
            path=str(path),
            texts_per_s_batch1=speed[0],
            texts_per_s_batch64=speed[1],
            agreement=agree,
            worst_cosine=worst,
            metric=metric,
            metric_loss=self.reference_metric - metric,
            kept_fp32=kept_fp32,
            size_mb=path.stat().st_size / 1e6,
            passed=passed,
            note=note,
        )

    def sensitivity(self, build: Callable[[list[str], Path], Path], nodes: list[str], scratch: Path) -> list[str]:
        """``nodes`` ordered by how much quantising each alone moves the outputs on the first eval texts."""
        texts = self.texts[:SENSITIVITY_TEXTS]
        batches = [texts[i : i + SPEED_BATCH] for i in range(0, len(texts), SPEED_BATCH)]
        reference = self.reference.arrays[: len(batches)]
        change: dict[str, float] = {}
        for node in nodes:
            single = Outputs(build([node], scratch), self.tokenizer, self.output, batches)
            change[node] = float(np.mean([np.abs(r - c).mean() for r, c in zip(reference, single.arrays, strict=True)]))
        return sorted(nodes, key=lambda n: -change[n])


def best_rung(rows: list[Rung]) -> Rung:
    """The fastest passing variant at batch 64."""
    return max((row for row in rows if row.passed), key=lambda row: row.texts_per_s_batch64)


def ladder_table(rows: list[Rung], served: str) -> list[dict[str, Any]]:
    """Rows for a table artifact and the ladder.json file."""
    return [
        {
            "variant": row.variant,
            "served": row.variant == served,
            "texts/s b1": round(row.texts_per_s_batch1, 1),
            "texts/s b64": round(row.texts_per_s_batch64, 1),
            "agreement": round(row.agreement, 4),
            "metric loss (pt)": round(100 * row.metric_loss, 2),
            "fp32 weights kept": row.kept_fp32,
            "MB": round(row.size_mb, 1),
            "gate": "pass" if row.passed else "FAIL",
            "note": row.note,
        }
        for row in rows
    ]
