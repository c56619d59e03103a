"""Slot spans and BIO tags: aligning character spans to word pieces, decoding them back, span-level scores.

Pure functions (numpy at most, no torch). The tag set of slot types ``s1, s2, ...`` is
``["O", "B-s1", "I-s1", "B-s2", "I-s2", ...]`` (``tag_names``): slot ``k`` (0-based) has tag ids
``2k + 1`` (B) and ``2k + 2`` (I).

``align_spans`` labels the tokens of one text from its character spans and the fast tokenizer's
offset mapping: the first token that overlaps a span gets ``B-``, every later token overlapping
it ``I-``, the others ``O``; special tokens and tokens without characters get ``IGNORE`` (-100,
which the loss skips). A span ending or starting inside a token takes the whole token, so it is
decoded back to the token's edges. A token already claimed by an earlier span keeps its tag, and a span
whose first token is claimed is not tagged (two spans cannot share a token).

``span_scores`` is seqeval's strict scheme on character spans: a predicted span counts only when
its slot type, start and end all equal a gold span's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from finetune_flows.tasks.serving.slots import OUTSIDE, bio_spans, decode_spans

__all__ = [
    "IGNORE",
    "OUTSIDE",
    "align_spans",
    "bio_spans",
    "decode_spans",
    "slots_of",
    "span_scores",
    "tag_names",
    "token_span_scores",
]

IGNORE = -100
"""The label of tokens the loss and the metrics skip (special tokens, padding)."""


def tag_names(slots: Sequence[str]) -> list[str]:
    """The BIO tag set of ``slots``: ``O``, then ``B-``/``I-`` per slot in the given order."""
    return [OUTSIDE, *(f"{prefix}-{slot}" for slot in slots for prefix in ("B", "I"))]


def slots_of(labels: Sequence[str]) -> list[str]:
    """The slot types of a tag set (``tag_names``' inverse)."""
    return [label[2:] for label in labels if label.startswith("B-")]


def align_spans(
    text: str,
    spans: Iterable[tuple[int, int, int]],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[bool] | None = None,
) -> list[int]:
    """Tag ids of one text's tokens from its spans ``(slot index, start, end)`` (Python ``str`` indices, end
    exclusive) and the tokens' character ``offsets``; ``special`` marks the tokenizer's special tokens."""
    tags = [IGNORE if (special is not None and special[i]) or s >= e else 0 for i, (s, e) in enumerate(offsets)]
    for slot, start, end in sorted(spans, key=lambda span: (span[1], span[2])):
        if not 0 <= start < end <= len(text):
            raise ValueError(f"span ({start}, {end}) is outside the text of {len(text)} characters: {text!r}")
        inside = [i for i, (s, e) in enumerate(offsets) if tags[i] != IGNORE and s < end and e > start]
        free = [i for i in inside if tags[i] == 0]
        if free and free[0] == inside[0]:  # the span's first token is its own: B there, I after
            tags[free[0]] = 2 * slot + 1
            for i in free[1:]:
                tags[i] = 2 * slot + 2
    return tags


def _prf(true_positives: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def span_scores(
    gold: Sequence[Iterable[tuple[Any, ...]]], predicted: Sequence[Iterable[tuple[Any, ...]]], slots: Sequence[str]
) -> dict[str, float]:
    """Span precision, recall and F1 per slot type (``precision_<slot>``, ``recall_<slot>``, ``f1_<slot>``,
    ``support_<slot>``) and over all spans (``span_precision``, ``span_recall``, ``span_f1``, micro-averaged),
    plus ``span_macro_f1`` over the slot types with gold spans.

    ``gold[i]`` and ``predicted[i]`` are the spans of text ``i``: tuples whose first item is the slot type and
    whose remaining items locate the span (``(slot, start, end)`` or ``(slot, text, start, end)``); a predicted
    span is right when an identical gold tuple exists in the same text (each gold span matched once)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold rows but {len(predicted)} predicted rows")
    hits: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    for gold_row, pred_row in zip(gold, predicted, strict=True):
        g, p = Counter(map(tuple, gold_row)), Counter(map(tuple, pred_row))
        for span, count in g.items():
            n_gold[str(span[0])] += count
        for span, count in p.items():
            n_pred[str(span[0])] += count
            hits[str(span[0])] += min(count, g.get(span, 0))
    metrics: dict[str, float] = {}
    f1s = []
    for slot in slots:
        precision, recall, f1 = _prf(hits[slot], n_pred[slot], n_gold[slot])
        metrics.update({f"precision_{slot}": precision, f"recall_{slot}": recall, f"f1_{slot}": f1})
        metrics[f"support_{slot}"] = float(n_gold[slot])
        if n_gold[slot]:
            f1s.append(f1)
    precision, recall, f1 = _prf(sum(hits.values()), sum(n_pred.values()), sum(n_gold.values()))
    metrics.update({"span_precision": precision, "span_recall": recall, "span_f1": f1})
    metrics["span_macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return metrics


def token_span_scores(predictions: Any, label_ids: Any, labels: Sequence[str]) -> dict[str, float]:
    """``span_scores`` on token ranges, from a token classifier's logits (batch, tokens, tags) and the gold tag
    ids (``IGNORE`` where no token or a special token is): what training measures, without character offsets."""
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    label_ids = np.asarray(label_ids)
    gold_rows, pred_rows = [], []
    for pred_row, gold_row in zip(predicted, label_ids, strict=True):
        keep = gold_row != IGNORE
        gold_rows.append(bio_spans([labels[int(t)] for t in gold_row[keep]]))
        pred_rows.append(bio_spans([labels[int(t)] for t in pred_row[keep]]))
    return span_scores(gold_rows, pred_rows, slots_of(labels))
