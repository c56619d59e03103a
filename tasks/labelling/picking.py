"""Label, stage 1: the pool of unlabelled texts, the champion's calibrated uncertainty, the texts to ask about.

The pool is the newest records of the model's monitor store, or a file or folder of texts (a
``text`` column; CSV, JSONL, Parquet), less every text already labelled or skipped in the data
folder. The champion (``models:/<model_name>@<alias>``, pinned to its version) scores the pool;
with a labelled eval file the temperature is fitted on it first (``selection.py``). The texts are
embedded by the sentence encoder the version ships with its drift reference, or, for a version
without one, by TF-IDF vectors reduced to 64 dimensions, and diversified by k-means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import SCENARIOS
from finetune_flows.plugins.errors import DataError
from finetune_flows.tasks.batch.partitions import plan_partitions, read_partition
from finetune_flows.tasks.batch.runner import resolve_version
from finetune_flows.tasks.core.ingestion import IngestOptions, read_labelled
from finetune_flows.tasks.core.overrides import parse_label_map
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import read_table
from finetune_flows.tasks.labelling.label_files import labelled_texts
from finetune_flows.tasks.labelling.selection import diversified, entropy, fit_temperature, scaled
from finetune_flows.tasks.monitoring.drift_reference import fetch_reference
from finetune_flows.tasks.monitoring.record_store import connect
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)


class LabelConfig(BaseModel):
    """Ask people to label the texts the champion is least sure of, in the Prefect UI, then request retraining."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(default="finance-monitoring", min_length=1, max_length=200, description="Registered model.")
    alias: str = Field(default="champion", pattern=r"^[\w-]{1,100}$", description="Alias of the version that picks.")
    data_folder: str = Field(
        min_length=1, max_length=1000, description="The scenario's data folder: label files go here; retrain reads it."
    )
    source: str | None = Field(
        default=None, max_length=1000,
        description="A CSV/JSONL/Parquet file or folder of texts (column text). Empty: the model's monitor store.",
    )  # fmt: skip
    store_dir: str | None = Field(
        default=None, max_length=1000, description="Monitor store folder. Empty: <state>/monitor/<model_name>."
    )
    eval_path: str | None = Field(
        default=None, max_length=1000,
        description="A labelled eval file (text, label) to calibrate the model's confidence on. Empty: uncalibrated.",
    )  # fmt: skip
    texts: int = Field(default=30, ge=1, le=1000, description="Texts to label in this run.")
    batch_size: int = Field(default=10, ge=1, le=50, description="Texts per form.")
    recent: int = Field(default=5000, ge=10, le=1_000_000, description="Newest texts of the pool considered.")
    retrain_after: int = Field(
        default=50, ge=0, le=1_000_000, description="Request retraining once this many new labels arrived (0: never)."
    )
    timeout_minutes: int = Field(default=1440, ge=1, le=43200, description="How long a form waits for its answers.")
    seed: int = Field(default=0, ge=0, description="Seed of the k-means that diversifies the picks.")

    def store_db(self) -> Path:
        """The monitor store's SQLite file."""
        folder = Path(self.store_dir) if self.store_dir else get_settings().state / "monitor" / self.model_name
        return folder / "records.sqlite"


class Candidates(BaseModel):
    """The texts to ask about (a Parquet file, most uncertain first) and what picked them."""

    model_config = ConfigDict(frozen=True)

    path: str
    count: int
    pool: int
    model_version: str
    labels: list[str]
    temperature: float


def pool_from_store(db: Path, recent: int) -> list[str]:
    """The distinct texts of the ``recent`` newest records of a monitor store."""
    if not db.is_file():
        raise DataError("no monitor store to pick texts from", file=db, hint="Run monitor first, or set source")
    with closing(connect(db)) as con:
        rows = con.execute("SELECT text FROM records ORDER BY ts_us DESC LIMIT ?", (recent,)).fetchall()
    return list(dict.fromkeys(r[0] for r in rows))


def pool_from_files(source: Path, recent: int) -> list[str]:
    """The distinct texts of a file or folder (checked record by record, as ``score`` checks them)."""
    texts = [t for part in plan_partitions(source) for t in read_partition(part)["text"].astype(str)]
    return list(dict.fromkeys(texts))[-recent:]


def class_probabilities(predicted: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(labels, probabilities) from a classifier's ``prob_<label>`` columns."""
    columns = [c for c in predicted.columns if c.startswith("prob_")]
    if not columns:
        raise DataError(
            f"the model's output has no prob_<label> columns (columns: {list(predicted.columns)})",
            hint="label picks texts with a classifier that returns its class probabilities",
        )
    return [c.removeprefix("prob_") for c in columns], predicted[columns].to_numpy(dtype=np.float64)


def eval_rows(eval_path: Path, tags: Mapping[str, str]) -> pd.DataFrame:
    """The ``text`` and ``label`` rows of a labelled eval file, read as the version's scenario reads its data files
    (its formats, such as PhraseBank's ``.txt``, its column layouts and the version's label map); a version that
    names no scenario reads a CSV/JSONL/Parquet file with ``text`` and ``label`` columns."""
    name = tags.get("scenario")
    if name:
        label_map = parse_label_map(tags["data.label_map"]) if tags.get("data.label_map") else None
        return read_labelled(eval_path, SCENARIOS.get(name), IngestOptions(label_map=label_map))[0]
    frame = read_table(eval_path)
    for column in ("text", "label"):
        if column not in frame.columns:
            raise DataError(f"missing column {column!r}; columns found: {list(frame.columns)}", file=eval_path,
                            column=column)  # fmt: skip
    return frame[["text", "label"]]


def temperature_on(model: object, eval_path: Path, labels: list[str], tags: Mapping[str, str]) -> float:
    """The temperature fitted on a labelled eval file (read by ``eval_rows``) by the model's log-likelihood."""
    frame = eval_rows(eval_path, tags)
    for row, value in enumerate(frame["label"], start=1):
        if value not in labels:
            raise DataError(f"label not among the model's {labels}", file=eval_path, row=row, column="label",
                            value=value)  # fmt: skip
    _, probabilities = class_probabilities(model.predict(pd.DataFrame({"text": frame["text"]})))  # type: ignore[attr-defined]
    return fit_temperature(probabilities, np.array([labels.index(v) for v in frame["label"]]))


def vectors(texts: list[str], encoder: SentenceEncoder | None) -> np.ndarray:
    """Sentence embeddings of ``texts``; TF-IDF reduced to 64 dimensions when there is no encoder."""
    if encoder is not None:
        return encoder.encode(texts)
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(min_df=1).fit_transform(texts)
    width = min(64, tfidf.shape[1] - 1, len(texts) - 1)
    return TruncatedSVD(width, random_state=0).fit_transform(tfidf) if width >= 2 else tfidf.toarray()


@task(name="pick-texts")
def pick_texts(config: LabelConfig, work: str) -> Candidates:
    """The ``texts`` most uncertain, diversified texts of the pool that nobody labelled or skipped yet."""
    import mlflow

    folder = Path(config.data_folder)
    done = labelled_texts(folder)
    raw = (
        pool_from_files(Path(config.source), config.recent)
        if config.source
        else pool_from_store(config.store_db(), config.recent)
    )
    pool = [t for t in raw if t not in done]
    version = resolve_version(config.model_name, config.alias)
    model = mlflow.pyfunc.load_model(f"models:/{config.model_name}/{version}")
    labels, probabilities = class_probabilities(model.predict(pd.DataFrame({"text": pool})))
    tags = mlflow.MlflowClient().get_model_version(config.model_name, version).tags
    temperature = temperature_on(model, Path(config.eval_path), labels, tags) if config.eval_path else 1.0
    uncertainty = entropy(scaled(probabilities, temperature))
    found = fetch_reference(config.model_name, version, get_settings().state / "label" / config.model_name)
    encoder = SentenceEncoder(found[2] / ENCODER_FILE, found[2] / TOKENIZER_FILE) if found else None
    picked = diversified(uncertainty, vectors(pool, encoder), config.texts, config.seed) if pool else []
    frame = pd.DataFrame({"text": [pool[i] for i in picked], "uncertainty": uncertainty[picked]})
    target = Path(work) / "candidates.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(target, index=False)
    logger.info(
        "picked %d of %d unlabelled texts with models:/%s/%s (temperature %.2f, %s)",
        len(frame), len(pool), config.model_name, version, temperature,
        "sentence embeddings" if encoder else "TF-IDF vectors",
    )  # fmt: skip
    return Candidates(
        path=str(target), count=len(frame), pool=len(pool), model_version=version, labels=labels,
        temperature=temperature,
    )  # fmt: skip
