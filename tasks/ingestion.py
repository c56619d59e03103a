"""Stage 1, ingest: labelled text files -> a validated dataset on disk with a content hash.

Reads CSV, TSV, JSONL and Parquet (each optionally gzipped) as strict UTF-8; every problem is a
``DataError`` naming file, row, column and value. Exact duplicates leave the training set, eval
texts that also occur in training leave the eval set, a stratified seeded split is made when no
eval file is given, and labels get a sorted, deterministic id mapping. The output folder is
keyed by the inputs' content, so a second run with the same inputs reuses it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from plugins import SCENARIOS, DataError
from plugins.specs import Scenario
from tasks.config import FinetuneConfig
from tasks.settings import get_settings

logger = logging.getLogger(__name__)

_INGEST_VERSION = "1"


class IngestOptions(BaseModel):
    """What ingest needs besides the files (a flat view of the config's data section)."""

    model_config = ConfigDict(frozen=True)

    text_column: str | None = None
    label_column: str | None = None
    eval_fraction: float = 0.1
    max_train_rows: int | None = None
    seed: int = 42


class IngestResult(BaseModel):
    """Where the dataset is and what went into it; passed on to the next stages."""

    model_config = ConfigDict(frozen=True)

    dataset_dir: str
    data_hash: str
    eval_hash: str
    labels: list[str]
    train_rows: int
    eval_rows: int
    duplicates_removed: int
    eval_overlap_removed: int
    eval_is_split: bool
    text_column: str
    label_column: str
    train_file: str
    eval_file: str | None
    cached: bool = False

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


# -- reading ---------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start : exc.end]
        raise DataError(
            f"not valid UTF-8 (byte {bad!r} at offset {exc.start})",
            file=path,
            line=line,
            value=raw[raw.rfind(b"\n", 0, exc.start) + 1 : exc.end].decode("utf-8", "replace"),
            hint="Re-save the file as UTF-8",
        ) from exc


def read_table(path: Path, scenario: Scenario | None = None) -> pd.DataFrame:
    """Read one file into a DataFrame of strings; the scenario may read its own formats."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if scenario is not None:
        custom = scenario.read_file(path)
        if custom is not None:
            return custom
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) > 1 else suffixes[-1] if suffixes else ""
    raw = path.read_bytes()
    if compressed:
        raw = gzip.decompress(raw)
    if not raw.strip():
        raise DataError("file is empty", file=path, hint="Give a file with a header and data rows")
    if kind == ".parquet":
        frame = pd.read_parquet(io.BytesIO(raw))
        return frame.astype({c: "string" for c in frame.columns}).fillna("")
    text = _decode(path, raw)
    try:
        if kind == ".tsv":  # GLUE-style TSV: quotes are ordinary characters
            return pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
        if kind in {".csv", ".txt"}:
            return pd.read_csv(io.StringIO(text), sep=",", dtype=str, keep_default_na=False)
        if kind in {".jsonl", ".ndjson", ".json"}:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"invalid JSON: {exc.msg}", file=path, line=number, value=line) from exc
                    if not isinstance(record, dict):
                        raise DataError("not a JSON object", file=path, line=number, value=line)
                    rows.append(record)
            # object dtype keeps 1 as "1" (not "1.0") when a key is missing; null/missing -> "".
            return pd.DataFrame(rows, dtype=object).fillna("").astype(str)
    except pd.errors.ParserError as exc:
        raise DataError(f"cannot parse: {exc}", file=path) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", file=path) from exc
    raise DataError(
        f"unsupported file type {kind!r}",
        file=path,
        hint="Use .csv, .tsv, .jsonl or .parquet (optionally .gz)",
    )


def resolve_columns(frame: pd.DataFrame, path: Path, scenario: Scenario, options: IngestOptions) -> tuple[str, str]:
    """The (text, label) columns: as configured, else the first scenario layout that fits."""
    found = list(frame.columns)
    if options.text_column or options.label_column:
        wanted = [options.text_column or "text", options.label_column or "label"]
    else:
        for layout in scenario.layouts:
            if layout.text_column in found and layout.label_column in found:
                return layout.text_column, layout.label_column
        wanted = [scenario.layouts[0].text_column, scenario.layouts[0].label_column]
        known = ", ".join(f"{lay.name}: ({lay.text_column}, {lay.label_column})" for lay in scenario.layouts)
        missing = next(c for c in wanted if c not in found) if any(c not in found for c in wanted) else wanted[0]
        raise DataError(
            f"missing column {missing!r}; columns found: {found}; scenario {scenario.name!r} knows {known}",
            file=path,
            column=missing,
            hint="Set data.text_column and data.label_column",
        )
    for column in wanted:
        if column not in found:
            raise DataError(f"missing column {column!r}; columns found: {found}", file=path, column=column)
    return wanted[0], wanted[1]


def clean_rows(frame: pd.DataFrame, path: Path, text_col: str, label_col: str, scenario: Scenario) -> pd.DataFrame:
    """Validate every row; return columns ``text`` and ``label`` (the label's name)."""
    if frame.empty:
        raise DataError("no data rows: the file has a header only", file=path)
    texts = frame[text_col].astype(str)
    labels = frame[label_col].astype(str).str.strip()
    for row, (text, label) in enumerate(zip(texts, labels, strict=True), start=1):
        if not text.strip():
            raise DataError("empty text", file=path, row=row, column=text_col, value=text)
        if not label:
            raise DataError("empty label", file=path, row=row, column=label_col, value=label)
        if scenario.label_names and label not in scenario.label_names:
            raise DataError(
                f"unknown label for scenario {scenario.name!r}; known: {sorted(set(scenario.label_names))}",
                file=path,
                row=row,
                column=label_col,
                value=label,
            )
    if scenario.label_names:
        labels = labels.map(scenario.label_names)
    return pd.DataFrame({"text": texts.to_numpy(), "label": labels.to_numpy(), "row": np.arange(1, len(frame) + 1)})


# -- shaping -----------------------------------------------------------------------------------
def stratified_split(labels: pd.Series, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of (train, eval): each class contributes ``fraction`` of its rows to eval, seeded."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    eval_idx: list[int] = []
    for label in sorted(labels.unique()):
        positions = np.flatnonzero(labels.to_numpy() == label)
        rng.shuffle(positions)
        n_eval = round(len(positions) * fraction) if len(positions) > 1 else 0
        eval_idx.extend(positions[: max(n_eval, 1 if len(positions) > 1 else 0)])
        train_idx.extend(positions[max(n_eval, 1 if len(positions) > 1 else 0) :])
    return np.sort(np.array(train_idx, dtype=int)), np.sort(np.array(eval_idx, dtype=int))


def _frame_hash(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        digest.update(text.encode("utf-8") + b"\x1f" + label.encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def ingest_files(
    train_file: Path,
    eval_file: Path | None,
    scenario: Scenario,
    options: IngestOptions,
    cache_dir: Path,
) -> IngestResult:
    """Validate, deduplicate, split and save; reuse an earlier output for identical inputs."""
    key_parts = [
        _INGEST_VERSION,
        # Content and format: the same bytes read as .csv and as .tsv are different datasets.
        "".join(train_file.suffixes).lower(),
        file_sha256(train_file) if train_file.is_file() else str(train_file),
        "".join(eval_file.suffixes).lower() if eval_file else "",
        file_sha256(eval_file) if eval_file and eval_file.is_file() else str(eval_file),
        scenario.name,
        json.dumps(scenario.label_names, sort_keys=True),
        options.model_dump_json(),
    ]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    out = cache_dir / "ingest" / key
    if (out / "meta.json").is_file():
        result = IngestResult.model_validate_json((out / "meta.json").read_text()).model_copy(
            update={"cached": True, "train_file": str(train_file), "eval_file": str(eval_file) if eval_file else None}
        )
        logger.info("ingest: reusing cached dataset %s (data hash %s)", out, result.data_hash[:12])
        return result

    frame = read_table(train_file, scenario)
    text_col, label_col = resolve_columns(frame, train_file, scenario, options)
    train = clean_rows(frame, train_file, text_col, label_col, scenario)

    before = len(train)
    train = train.drop_duplicates(subset=["text", "label"], keep="first")
    duplicates = before - len(train)

    if eval_file is None:
        train_pos, eval_pos = stratified_split(train["label"], options.eval_fraction, options.seed)
        train, evaluation = train.iloc[train_pos], train.iloc[eval_pos]
        label_col_eval = label_col
    else:
        eval_frame = read_table(eval_file, scenario)
        eval_text, eval_label = resolve_columns(eval_frame, eval_file, scenario, options)
        evaluation = clean_rows(eval_frame, eval_file, eval_text, eval_label, scenario)
        label_col_eval = eval_label

    if options.max_train_rows is not None and len(train) > options.max_train_rows:
        train = train.sample(n=options.max_train_rows, random_state=options.seed).sort_index()

    classes = sorted(train["label"].unique())
    if len(classes) < 2:
        raise DataError(
            "only one class in the training data; a classifier needs at least two",
            file=train_file,
            column=label_col,
            value=classes[0],
        )
    unseen = evaluation[~evaluation["label"].isin(classes)]
    if not unseen.empty:
        first = unseen.iloc[0]
        raise DataError(
            f"label in the eval data that the training data lacks (training labels: {classes})",
            file=eval_file or train_file,
            row=int(first["row"]),
            column=label_col_eval,
            value=first["label"],
        )

    overlap = evaluation["text"].isin(set(train["text"]))
    evaluation = evaluation[~overlap]
    if evaluation.empty:
        raise DataError("no eval rows left after removing texts that also occur in training", file=eval_file)

    label2id = {label: index for index, label in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", evaluation)):
        part.assign(label_id=part["label"].map(label2id)).reset_index(drop=True).to_parquet(
            out / f"{name}.parquet", index=False
        )
    result = IngestResult(
        dataset_dir=str(out),
        data_hash=_frame_hash(pd.concat([train, evaluation])),
        eval_hash=_frame_hash(evaluation),
        labels=classes,
        train_rows=len(train),
        eval_rows=len(evaluation),
        duplicates_removed=duplicates,
        eval_overlap_removed=int(overlap.sum()),
        eval_is_split=eval_file is None,
        text_column=text_col,
        label_column=label_col,
        train_file=str(train_file),
        eval_file=str(eval_file) if eval_file else None,
    )
    (out / "meta.json").write_text(result.model_dump_json(indent=2))
    logger.info(
        "ingest: %d train / %d eval rows, labels %s, %d duplicates removed, %d eval texts also in train removed",
        result.train_rows,
        result.eval_rows,
        classes,
        duplicates,
        result.eval_overlap_removed,
    )
    return result


def data_files(config: FinetuneConfig, scenario: Scenario) -> tuple[Path, Path | None]:
    """(train, eval) files: as configured, else the scenario's bundled sample."""
    if config.data.train_path:
        return Path(config.data.train_path), Path(config.data.eval_path) if config.data.eval_path else None
    sample = scenario.sample()
    if sample is None:
        raise DataError(f"scenario {scenario.name!r} bundles no sample data: set data.train_path")
    return sample.train, Path(config.data.eval_path) if config.data.eval_path else sample.eval


@task(name="ingest")
def ingest_data(config: FinetuneConfig) -> IngestResult:
    """Validate and split the labelled files into a content-hashed dataset (reused when unchanged)."""
    scenario = SCENARIOS.get(config.scenario)
    train_file, eval_file = data_files(config, scenario)
    options = IngestOptions(
        text_column=config.data.text_column,
        label_column=config.data.label_column,
        eval_fraction=config.data.eval_fraction,
        max_train_rows=config.data.max_train_rows,
        seed=config.training.seed,
    )
    result = ingest_files(train_file, eval_file, scenario, options, get_settings().cache_dir)
    create_markdown_artifact(
        key=f"{config.scenario}-ingest",
        description="Ingested dataset",
        markdown=(
            f"**{result.train_rows}** train / **{result.eval_rows}** eval rows from `{train_file}`"
            f"{' (eval split from train)' if result.eval_is_split else f' and `{eval_file}`'}; labels "
            f"{', '.join(result.labels)}; {result.duplicates_removed} duplicates removed; "
            f"{result.eval_overlap_removed} eval texts also in train removed; data hash `{result.data_hash[:12]}`"
            f"{'; reused from cache' if result.cached else ''}."
        ),
    )
    return result
