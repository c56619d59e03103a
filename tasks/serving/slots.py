"""Serving a slot tagger: text in, the slot spans it finds out, on onnxruntime without torch.

The exported graph (head ``token-classification``) gives BIO tag logits per token; ``id2label`` in
its metadata names the tags (``O``, ``B-<slot>``, ``I-<slot>``). ``decode_spans`` turns one text's
tags back into character spans with the tokenizer's offsets: a ``B-`` tag starts a span, an ``I-``
tag of the same slot continues it, and an ``I-`` tag without a ``B-`` before it starts a span too
(BIO repair); ``O`` and special tokens end it. Offsets are Python ``str`` indices into the original
text (what ``tokenizers`` reports), so ``text[start:end]`` is the span's text.

The served pyfunc answers one row per text with a ``slots`` column: a JSON list of ``{"slot",
"text", "start", "end", "score"}`` (score: the mean probability of the span's token tags).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # MLflow is a core dependency, but the scorer itself must not need it.
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

from .classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
from .errors import ModelFilesError
from .runtime import open_session
from .text_inputs import load_tokenizer, onnx_threads, texts_from

OUTSIDE = "O"
SLOTS_COLUMN = "slots"

TokenSpan = tuple[str, int, int]
"""(slot, first token, one past the last token)."""
CharSpan = tuple[str, str, int, int]
"""(slot, text, start, end): ``text == original[start:end]``."""


def bio_spans(tags: Sequence[str]) -> list[TokenSpan]:
    """The spans a BIO tag sequence marks, as token ranges; ``I-x`` without ``B-x`` before it starts a span."""
    spans: list[TokenSpan] = []
    slot, first = "", -1
    for position, tag in enumerate([*tags, OUTSIDE]):
        prefix, _, name = tag.partition("-")
        if slot and not (prefix == "I" and name == slot):
            spans.append((slot, first, position))
            slot = ""
        if prefix in ("B", "I") and name and not slot:
            slot, first = name, position
    return spans


def token_spans(
    tags: Sequence[int], labels: Sequence[str], offsets: Sequence[tuple[int, int]], special: Sequence[bool] | None
) -> list[TokenSpan]:
    """``bio_spans`` of the tag ids ``tags`` (names in ``labels``); special and empty-offset tokens count as ``O``."""
    names = [
        OUTSIDE if (special is not None and special[i]) or offsets[i][0] >= offsets[i][1] else labels[int(tag)]
        for i, tag in enumerate(tags)
    ]
    return bio_spans(names)


def decode_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    tags: Sequence[int],
    labels: Sequence[str],
    special: Sequence[bool] | None = None,
) -> list[CharSpan]:
    """The slot spans of one text: (slot, text, start, end) from its tokens' tag ids and character offsets."""
    return [
        (slot, text[offsets[first][0] : offsets[last - 1][1]], offsets[first][0], offsets[last - 1][1])
        for slot, first, last in token_spans(tags, labels, offsets, special)
    ]


class OnnxSlotTagger:
    """Tokenize with the model's own ``tokenizer.json``, run the token-classification graph, decode the spans."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, threads: int = 0) -> None:
        self.session = open_session(onnx_path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "id2label" not in meta or "max_length" not in meta:
            raise ModelFilesError(f"{onnx_path} lacks the id2label or max_length metadata of a slot tagger")
        id2label = json.loads(meta["id2label"])
        self.labels: list[str] = [id2label[key] for key in sorted(id2label, key=int)]
        self.max_length = int(meta["max_length"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = load_tokenizer(tokenizer_path, self.max_length)

    @property
    def slots(self) -> list[str]:
        """The slot types the model tags, in tag order."""
        return [label[2:] for label in self.labels if label.startswith("B-")]

    def spans(self, texts: list[str], batch_size: int = 64) -> list[list[dict[str, Any]]]:
        """For each text, its spans as ``{"slot", "text", "start", "end", "score"}`` dicts, in text order."""
        found: list[list[dict[str, Any]]] = [[] for _ in texts]
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = [int(i) for i in order[start : start + batch_size]]
            encodings = self.tokenizer.encode_batch([texts[i] for i in idx])
            width = max(len(e.ids) for e in encodings)
            batch = {name: np.zeros((len(idx), width), dtype=np.int64) for name in self.input_names}
            for row, enc in enumerate(encodings):
                batch["input_ids"][row, : len(enc.ids)] = enc.ids
                batch["attention_mask"][row, : len(enc.ids)] = enc.attention_mask
                if "token_type_ids" in batch:
                    batch["token_type_ids"][row, : len(enc.ids)] = enc.type_ids
            logits = self.session.run(["logits"], batch)[0].astype(np.float64)
            exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = exp / exp.sum(axis=-1, keepdims=True)
            for row, (i, enc) in enumerate(zip(idx, encodings, strict=True)):
                n = len(enc.ids)
                tags, best = probs[row, :n].argmax(axis=-1), probs[row, :n].max(axis=-1)
                special = [bool(s) for s in enc.special_tokens_mask]
                for slot, first, last in token_spans(tags.tolist(), self.labels, enc.offsets, special):
                    begin, end = enc.offsets[first][0], enc.offsets[last - 1][1]
                    found[i].append(
                        {
                            "slot": slot,
                            "text": texts[i][begin:end],
                            "start": int(begin),
                            "end": int(end),
                            "score": round(float(best[first:last].mean()), 6),
                        }
                    )
        return found

    def predict(self, texts: list[str], batch_size: int = 64) -> pd.DataFrame:
        """One row per text: ``slots``, a JSON list of its spans (character offsets into the text)."""
        return pd.DataFrame({SLOTS_COLUMN: [json.dumps(s, ensure_ascii=False) for s in self.spans(texts, batch_size)]})


class SlotTaggerPyfunc(PythonModel):
    """MLflow pyfunc: raw text in; a ``slots`` column (JSON list of slot, text, start, end, score) out."""

    def load_context(self, context: Any) -> None:
        self.scorer = OnnxSlotTagger(
            context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT], threads=onnx_threads(context)
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.scorer.predict(texts_from(model_input))
