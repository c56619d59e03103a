"""The unlabelled text of a ``pretrain`` run: read from its source, validated, deduplicated, split, cached.

Sources (``CorpusKind``): a text column of any table file (``read_table``, so the same size caps and
``DataError`` messages as fine-tuning); the labelled texts of a scenario with their labels dropped
(only its training split: the rows ``finetune-flows run <scenario>`` trains on with its defaults, split by the
same ingest, so no eval or test text of the fine-tune is ever pre-trained on; a scenario with its own
data preparation gives its training file); the texts the monitor stored. Every text is
checked like a labelled one: an empty text, a control character or a text over ``max_text_bytes``
is a ``DataError`` naming file, row, column and value. Distinct texts only; a seeded share is held
back to measure the MLM loss before and after training. The result is cached by content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.tasks.core.data_checks import CONTROL_CHARACTERS, VALUE_PREFIX
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import MB, read_table
from finetune_flows.tasks.pretraining.config import CorpusConfig, CorpusKind, PretrainConfig

logger = logging.getLogger(__name__)

_CORPUS_VERSION = "1"
STORE_FILE = "records.sqlite"


class CorpusResult(BaseModel):
    """Where the training and held-back texts are (``train.parquet``, ``held_back.parquet``, column ``text``)."""

    model_config = ConfigDict(frozen=True)

    corpus_dir: str
    data_hash: str
    """Identity of the texts and the split: the tokenization cache is keyed by it."""
    held_back_hash: str
    """Identity of the held-back texts: versions measured on the same ones are comparable."""
    train_rows: int
    held_back_rows: int
    duplicates: int
    summary: str
    cached: bool = False


def check_texts(texts: pd.Series, path: Path, column: str, max_text_bytes: int, unit: str = "row") -> pd.Series:
    """``texts`` as strings, or a ``DataError`` naming file, row (from 1; ``unit="line"``: the line), column and
    value of the first bad one: empty, holding a control character, or over ``max_text_bytes`` UTF-8 bytes."""
    values = texts.astype(str)

    def fail(position: int, problem: str, value: str, hint: str | None = None) -> DataError:
        if unit == "line":  # the series keeps the file's line positions (blank lines left out)
            return DataError(problem, file=path, line=int(texts.index[position]) + 1, value=value, hint=hint)
        return DataError(problem, file=path, row=int(position) + 1, column=column, value=value, hint=hint)

    empty = texts.isna().to_numpy() | (values.str.strip() == "").to_numpy()
    if empty.any():
        position = int(empty.argmax())
        raise fail(position, "empty text", values.iloc[position])
    control = values.str.contains(CONTROL_CHARACTERS, regex=True).to_numpy()
    if control.any():
        value = values.iloc[int(control.argmax())]
        found = CONTROL_CHARACTERS.search(value)
        where = f"{found.group()!r} at position {found.start()}" if found else ""
        hint = "Remove NUL and other control characters (tab, newline and carriage return are allowed)"
        raise fail(int(control.argmax()), f"control character {where}", value, hint)
    for found_at in np.flatnonzero((values.str.len() > max_text_bytes // 4).to_numpy()):
        position = int(found_at)
        text = values.iloc[position]
        if (size := len(text.encode("utf-8", "surrogatepass"))) > max_text_bytes:
            problem = f"text of {size:,} UTF-8 bytes, more than corpus.max_text_bytes ({max_text_bytes:,})"
            raise fail(position, problem, text[:VALUE_PREFIX] + "...", "Shorten or drop it, or raise the limit")
    return values


def texts_of_lines(path: Path, corpus: CorpusConfig) -> pd.Series:
    """The non-blank lines of a plain text file (``.txt``, UTF-8), each one text; errors name the line."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size > corpus.max_file_mb * MB:
        raise DataError(f"file larger than corpus.max_file_mb ({corpus.max_file_mb:g} MB)", file=path)
    lines = pd.Series(decode_utf8(path, path.read_bytes()).splitlines(), dtype=object)
    if len(lines) > corpus.max_rows:
        raise DataError(f"{len(lines):,} lines, more than corpus.max_rows ({corpus.max_rows:,})", file=path)
    kept = lines[lines.str.strip() != ""]  # blank lines separate paragraphs
    if kept.empty:
        raise DataError("file is empty", file=path, hint="Give one text per line")
    return check_texts(kept, path, "line", corpus.max_text_bytes, unit="line")


def texts_of_file(path: Path, column: str | None, corpus: CorpusConfig, scenario_name: str | None = None) -> pd.Series:
    """The validated texts of one table file: ``column`` (default ``text``; for a scenario, its layouts' text
    column); a missing column is a ``DataError`` listing the columns found."""
    scenario = SCENARIOS.get(scenario_name) if scenario_name else None
    frame = read_table(path, scenario, max_file_mb=corpus.max_file_mb, max_rows=corpus.max_rows)
    found = [str(c) for c in frame.columns]
    if column is None and scenario is not None:
        column = next((lay.text_column for lay in scenario.layouts if lay.text_column in found), None)
        column = column or scenario.layouts[0].text_column
    column = column or "text"
    if column not in found:
        raise DataError(
            f"missing column {column!r}; columns found: {found}", file=path, column=column,
            hint="Set corpus.text_column",
        )  # fmt: skip
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    return check_texts(frame[column], path, column, corpus.max_text_bytes)


def monitor_store(corpus: CorpusConfig) -> Path:
    """The monitor's record store the corpus reads: ``corpus.path`` (a folder or the file), else the default one."""
    base = Path(corpus.path) if corpus.path else get_settings().state / "monitor" / corpus.monitor_model
    return base / STORE_FILE if base.is_dir() or not base.suffix else base


def texts_of_monitor(corpus: CorpusConfig) -> pd.Series:
    """Every text the monitor stored, oldest first (read-only; a missing store is a ``DataError``)."""
    db_path = monitor_store(corpus)
    if not db_path.is_file():
        raise DataError(
            "no monitor record store", file=db_path,
            hint="Run `finetune-flows monitor` first, or set corpus.path / corpus.monitor_model",
        )  # fmt: skip
    with closing(sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)) as con:
        frame = pd.read_sql_query("SELECT text FROM records ORDER BY ts_us", con)
    if frame.empty:
        raise DataError("the monitor record store holds no texts", file=db_path)
    return check_texts(frame["text"], db_path, "text", corpus.max_text_bytes)


def read_texts(config: PretrainConfig) -> tuple[list[str], list[Path]]:
    """The texts of the configured source, in order, and the files they came from."""
    corpus = config.corpus
    if corpus.kind is CorpusKind.FILE:
        if not corpus.path:
            raise DataError("corpus.kind=file needs a file", hint="Set corpus.path to a CSV/TSV/JSONL/Parquet file")
        path = Path(corpus.path).expanduser()
        if path.suffix.lower() == ".txt" and not corpus.text_column:
            return texts_of_lines(path, corpus).tolist(), [path]
        return texts_of_file(path, corpus.text_column, corpus).tolist(), [path]
    if corpus.kind is CorpusKind.MONITOR:
        return texts_of_monitor(corpus).tolist(), [monitor_store(corpus)]
    return scenario_training_texts(config)


def scenario_training_texts(config: PretrainConfig) -> tuple[list[str], list[Path]]:
    """The texts of the training split of ``finetune-flows run <scenario>`` with the scenario's defaults (and
    ``corpus.path`` as its training file when given): eval and test rows never reach pre-training."""
    from finetune_flows.plugins.specs import StageHook
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.data_preparation import data_files, ingest_options
    from finetune_flows.tasks.core.ingestion import ingest_files

    corpus, scenario = config.corpus, SCENARIOS.get(config.scenario)
    overrides = {"data.train_path": str(Path(corpus.path).expanduser())} if corpus.path else {}
    finetune = FinetuneConfig.for_scenario(config.scenario, overrides)
    train, eval_file, test = data_files(finetune.data, scenario)
    if any(stage.hook is StageHook.PREPARE for stage in scenario.extra_stages):  # its own splits: the training file
        return texts_of_file(train, corpus.text_column, corpus, config.scenario).tolist(), [train]
    options = ingest_options(finetune.data, config.scenario, finetune.training.seed)
    ingested = ingest_files(train, eval_file, scenario, options, get_settings().cache_dir, test)
    texts = pd.read_parquet(Path(ingested.dataset_dir) / "train.parquet")["text"].astype(str).tolist()
    logger.info("corpus: the training split of scenario %s (%s)", config.scenario, ingested.splits)
    return texts, [train]


def split_texts(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held back): a seeded ``fraction`` of the texts (at least one) held back; the rest trains."""
    if len(texts) < 2:
        raise DataError(f"{len(texts)} distinct text(s): masked-LM training needs at least 2 (one is held back)")
    held = max(1, round(len(texts) * fraction))
    order = np.random.default_rng(seed).permutation(len(texts))
    held_idx = set(order[:held].tolist())
    return [t for i, t in enumerate(texts) if i not in held_idx], [t for i, t in enumerate(texts) if i in held_idx]


def build_corpus(config: PretrainConfig, cache_dir: Path) -> CorpusResult:
    """Read, validate, deduplicate and split the corpus into ``cache_dir/corpus/<key>``; reuse identical ones."""
    texts, files = read_texts(config)
    distinct = list(dict.fromkeys(texts))
    content = hashlib.sha256("\0".join(distinct).encode("utf-8", "surrogatepass")).hexdigest()
    split_key = f"{config.corpus.held_back_fraction}|{config.training.seed}"
    key = hashlib.sha256(f"{_CORPUS_VERSION}|{content}|{split_key}".encode()).hexdigest()[:20]
    out = cache_dir / "corpus" / key
    if (out / "meta.json").is_file():
        logger.info("corpus: reusing %s", out)
        return CorpusResult.model_validate_json((out / "meta.json").read_text()).model_copy(update={"cached": True})
    train, held = split_texts(distinct, config.corpus.held_back_fraction, config.training.seed)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": train}).to_parquet(out / "train.parquet", index=False)
    pd.DataFrame({"text": held}).to_parquet(out / "held_back.parquet", index=False)
    sources = ", ".join(f.name for f in files)
    result = CorpusResult(
        corpus_dir=str(out),
        data_hash=key,
        held_back_hash=hashlib.sha256("\0".join(held).encode("utf-8", "surrogatepass")).hexdigest()[:20],
        train_rows=len(train),
        held_back_rows=len(held),
        duplicates=len(texts) - len(distinct),
        summary=f"{len(train)} train / {len(held)} held-back texts from {config.corpus.kind.value} ({sources}); "
        f"{len(texts) - len(distinct)} duplicates dropped",
    )
    (out / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    logger.info("corpus: %s", result.summary)
    return result


@task(name="read-corpus")
def read_corpus(config: PretrainConfig) -> CorpusResult:
    """The run's unlabelled texts, validated, deduplicated and split into train and held back (cached)."""
    return build_corpus(config, get_settings().cache_dir)
