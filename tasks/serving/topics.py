"""Topics of financial texts by embedding similarity to a user-editable taxonomy, without torch.

A taxonomy (JSON, see ``plugins/scenarios/data/financial_phrasebank/topics.json``) lists topics,
each with a one-sentence description and a few example phrases. ``SentenceEncoder`` embeds text
with an ONNX sentence encoder (exported through the bi-encoder head: mean pooling over the token
embeddings with the attention mask, then L2 normalisation, inside the graph) on onnxruntime and
the ``tokenizers`` library. ``TopicAssigner`` scores a text against a topic by the highest cosine
similarity to any of the topic's reference phrases (its description and examples) and answers
the taxonomy's ``other`` topic when no topic reaches the threshold.

The scoring rule (the mean of the two best similarities, ``top_k=2``) and the shipped threshold
were chosen on the first half of a hand-labelled sample by the rule in ``bench/topic_eval.py``
(see ``docs/topic_labelling.md``). This module must never import torch.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from .encoder import SentenceEncoder
from .errors import ModelFilesError

DEFAULT_TOP_K = 2  # score = mean of the 2 best similarities to a topic's references; see bench/topic_eval.py
# The files of a topic-assigner folder (made by tasks.monitoring.topic_encoder, read by serving).
ENCODER_FILE, TOKENIZER_FILE, TAXONOMY_FILE = "encoder.onnx", "tokenizer.json", "topics.json"


class Topic(BaseModel):
    """One topic: a name, what it covers, and short example phrases in the register of the texts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Identifier reported for matching texts.")
    description: str = Field(min_length=1, description="One sentence saying what the topic covers.")
    examples: list[str] = Field(min_length=1, description="Short example phrases; each is one reference.")

    @field_validator("examples")
    @classmethod
    def _no_blank_examples(cls, examples: list[str]) -> list[str]:
        blank = [i for i, text in enumerate(examples) if not text.strip()]
        if blank:
            raise ValueError(f"examples at positions {blank} are empty")
        return examples


class Taxonomy(BaseModel):
    """The topics, the name given to texts that match none, and the similarity threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topics: list[Topic] = Field(min_length=1, description="The topics a text can be assigned.")
    other: str = Field(default="other", min_length=1, description="Topic of texts below the threshold.")
    threshold: float = Field(ge=-1.0, le=1.0, description="Least cosine similarity for a topic to be assigned.")

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        counts = Counter(topic.name for topic in self.topics)
        duplicates = sorted(name for name, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"duplicate topic names {duplicates}")
        if self.other in counts:
            raise ValueError(f"topic {self.other!r} is also the name of 'other'; rename one of them")
        return self

    @property
    def names(self) -> list[str]:
        return [topic.name for topic in self.topics]


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read and validate a taxonomy JSON file; every problem is reported at once, with the file.

    Raises ``ModelFilesError``; ``tasks.monitoring.taxonomy.load_taxonomy`` is the same check raising
    ``ConfigError``, for finetune-flows code that validates a user's taxonomy.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"taxonomy file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"taxonomy file {path} is not valid UTF-8 JSON: {exc}") from exc
    try:
        return Taxonomy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, raw) for err in exc.errors())
        raise ModelFilesError(f"taxonomy file {path} is invalid: {problems}") from exc


def _describe(err: ErrorDetails, raw: object) -> str:
    """``topics[2] ('layoffs').examples: List should have at least 1 item`` for one pydantic error."""
    where, node = "", raw
    for part in err["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and "name" in node:
                where += f" ({node['name']!r})"
        else:
            where += f".{part}" if where else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class TopicAssigner:
    """Assign each text the taxonomy topic whose reference phrases it is most similar to.

    Every topic's description and examples are embedded once, here. A text's score for a topic is
    the mean of its ``top_k`` highest cosine similarities to that topic's references (``top_k=1``:
    the maximum; the default 2 was chosen on the labelled sample). Below ``taxonomy.threshold`` the text
    gets ``taxonomy.other``.
    """

    def __init__(self, encoder: SentenceEncoder, taxonomy: Taxonomy, top_k: int = DEFAULT_TOP_K) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.encoder = encoder
        self.taxonomy = taxonomy
        self.top_k = top_k
        references = [[topic.description, *topic.examples] for topic in taxonomy.topics]
        embedded = encoder.encode([text for refs in references for text in refs])
        bounds = np.cumsum([0] + [len(refs) for refs in references])
        self.references = [embedded[a:b] for a, b in itertools.pairwise(bounds)]

    def similarities(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(texts, topics) scores: the mean of each text's ``top_k`` best similarities per topic."""
        embedded = self.encoder.encode(texts, batch_size)
        scores = np.zeros((len(texts), len(self.references)), dtype=np.float32)
        for column, refs in enumerate(self.references):
            sims = embedded @ refs.T  # unit vectors: the dot product is the cosine similarity
            k = min(self.top_k, refs.shape[0])
            scores[:, column] = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
        return scores

    def scores(self, texts: list[str], batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Each text's topic (or ``other``) and its best topic score."""
        return pick_topics(self.similarities(texts, batch_size), self.taxonomy)

    def assign(self, texts: list[str], batch_size: int = 64) -> list[str]:
        """Each text's topic, or ``taxonomy.other`` where no topic reaches the threshold."""
        return self.scores(texts, batch_size)[0]


def pick_topics(
    similarities: np.ndarray, taxonomy: Taxonomy, threshold: float | None = None
) -> tuple[list[str], np.ndarray]:
    """Best topic per row of a (texts, topics) score matrix, ``other`` below ``threshold``."""
    limit = taxonomy.threshold if threshold is None else threshold
    if similarities.shape[0] == 0:
        return [], np.zeros(0, dtype=np.float32)
    best = similarities.argmax(axis=1)
    top = similarities.max(axis=1)
    names = taxonomy.names
    return [names[b] if s >= limit else taxonomy.other for b, s in zip(best, top, strict=True)], top


def load_topic_assigner(folder: Path, threads: int = 0) -> TopicAssigner:
    """The assigner saved in ``folder``: ``encoder.onnx``, ``tokenizer.json`` and ``topics.json``; ``threads``:
    its ONNX session's intra-op threads (0: onnxruntime's default)."""
    missing = [name for name in (ENCODER_FILE, TOKENIZER_FILE, TAXONOMY_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelFilesError(
            f"topic assigner folder {folder} lacks {missing}; it is made by tasks.monitoring.topic_encoder"
        )
    encoder = SentenceEncoder(folder / ENCODER_FILE, folder / TOKENIZER_FILE, threads=threads)
    return TopicAssigner(encoder, load_taxonomy(folder / TAXONOMY_FILE))
