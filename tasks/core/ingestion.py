"""Stage 1, ingest: labelled text files -> a validated dataset on disk with a content hash.

Files are read by ``tasks.core.tables`` (strict UTF-8; errors name file, row, column and value).
Exact duplicates leave the training set; a test split (optional) and an eval split are held out
stratified and seeded when no file is given for them (test first, then eval from the rest, as
in the FinBERT protocol); held-out texts that also occur in training are removed; labels get a
sorted, deterministic id mapping. The output folder is keyed by the inputs' content and format,
so a second run with the same inputs reuses it.

Splits: ``train`` (fitting), ``eval`` (early stopping, model selection, promotion) and ``test``
(reported only, never used to choose anything).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.plugins.specs import Scenario
from finetune_flows.tasks.core.config import DataConfig, FinetuneConfig
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData, StageContext, prepare_with_stage
from finetune_flows.tasks.core.tables import clean_rows, file_sha256, read_table, resolve_columns
from finetune_flows.tasks.core.tracking import RunInfo

logger = logging.getLogger(__name__)

_INGEST_VERSION = "1"


class IngestOptions(BaseModel):
    """What ingest needs besides the files (a flat view of the config's data section)."""

    model_config = ConfigDict(frozen=True)

    text_column: str | None = None
    label_column: str | None = None
    eval_fraction: float = 0.1
    test_fraction: float = 0.0
    max_train_rows: int | None = None
    seed: int = 42


class IngestResult(PreparedData):
    """The prepared dataset of labelled text, and what ingest did to the files."""

    test_hash: str | None = None
    duplicates_removed: int
    eval_overlap_removed: int
    eval_is_split: bool
    text_column: str
    label_column: str
    train_file: str
    eval_file: str | None


def stratified_split(labels: pd.Series, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of (kept, held out): each class gives ``fraction`` of its rows (at least one), seeded."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for label in sorted(labels.unique()):
        positions = np.flatnonzero(labels.to_numpy() == label)
        rng.shuffle(positions)
        n_held = max(round(len(positions) * fraction), 1) if len(positions) > 1 else 0
        held.extend(positions[:n_held])
        keep.extend(positions[n_held:])
    return np.sort(np.array(keep, dtype=int)), np.sort(np.array(held, dtype=int))


def _frame_hash(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        digest.update(text.encode("utf-8") + b"\x1f" + label.encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def _file_key(path: Path | None) -> str:
    """Format and content of an input file (the same bytes as .csv and as .tsv are different data)."""
    if path is None:
        return "-"
    return "".join(path.suffixes).lower() + ":" + (file_sha256(path) if path.is_file() else str(path))


def _read_labelled(path: Path, scenario: Scenario, options: IngestOptions) -> tuple[pd.DataFrame, str, str]:
    """Validated rows of ``path`` and its (text, label) column names."""
    frame = read_table(path, scenario)
    text_col, label_col = resolve_columns(frame, path, scenario, options)
    return clean_rows(frame, path, text_col, label_col, scenario), text_col, label_col


def ingest_files(
    train_file: Path,
    eval_file: Path | None,
    scenario: Scenario,
    options: IngestOptions,
    cache_dir: Path,
    test_file: Path | None = None,
) -> IngestResult:
    """Validate, deduplicate, split and save; reuse an earlier output for identical inputs."""
    key_parts = [
        _INGEST_VERSION,
        _file_key(train_file),
        _file_key(eval_file),
        _file_key(test_file),
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

    train, text_col, label_col = _read_labelled(train_file, scenario, options)
    before = len(train)
    train = train.drop_duplicates(subset=["text", "label"], keep="first")
    duplicates = before - len(train)

    # Held-out splits: from their own file, else stratified out of the training rows (test first).
    held: dict[str, tuple[pd.DataFrame, Path, str]] = {}
    for split, file, fraction in (
        ("test", test_file, options.test_fraction),
        ("eval", eval_file, options.eval_fraction),
    ):
        if file is not None:
            part, _, part_label = _read_labelled(file, scenario, options)
            held[split] = (part, file, part_label)
        elif fraction > 0:
            keep, out_pos = stratified_split(train["label"], fraction, options.seed)
            held[split] = (train.iloc[out_pos], train_file, label_col)
            train = train.iloc[keep]

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
    parts: dict[str, pd.DataFrame] = {"train": train}
    removed: dict[str, int] = {}
    train_texts = set(train["text"])
    for split, (part, file, part_label) in held.items():
        unseen = part[~part["label"].isin(classes)]
        if not unseen.empty:
            first = unseen.iloc[0]
            raise DataError(
                f"label in the {split} data that the training data lacks (training labels: {classes})",
                file=file,
                row=int(first["row"]),
                column=part_label,
                value=first["label"],
            )
        overlap = part["text"].isin(train_texts)
        removed[split] = int(overlap.sum())
        parts[split] = part[~overlap]
        if parts[split].empty:
            raise DataError(f"no {split} rows left after removing texts that also occur in training", file=file)

    label2id = {label: index for index, label in enumerate(classes)}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.assign(label_id=part["label"].map(label2id)).reset_index(drop=True).to_parquet(
            out / f"{name}.parquet", index=False
        )
    test = parts.get("test")
    result = IngestResult(
        dataset_dir=str(out),
        data_hash=_frame_hash(pd.concat(list(parts.values()))),
        eval_hash=_frame_hash(parts["eval"]),
        test_hash=_frame_hash(test) if test is not None else None,
        labels=classes,
        train_rows=len(train),
        eval_rows=len(parts["eval"]),
        test_rows=len(test) if test is not None else 0,
        duplicates_removed=duplicates,
        eval_overlap_removed=sum(removed.values()),
        eval_is_split=eval_file is None,
        text_column=text_col,
        label_column=label_col,
        train_file=str(train_file),
        eval_file=str(eval_file) if eval_file else None,
        summary=(
            f"{len(train)} train / {len(parts['eval'])} eval / {len(test) if test is not None else 0} test rows, "
            f"labels {', '.join(classes)}"
        ),
    )
    (out / "meta.json").write_text(result.model_dump_json(indent=2))
    logger.info(
        "ingest: %d train / %d eval / %d test rows, labels %s, %d duplicates removed, "
        "%d held-out texts also in train removed",
        result.train_rows,
        result.eval_rows,
        result.test_rows,
        classes,
        duplicates,
        result.eval_overlap_removed,
    )
    return result


def data_files(data: DataConfig, scenario: Scenario) -> tuple[Path, Path | None, Path | None]:
    """(train, eval, test) files: as configured, else the scenario's bundled sample."""
    test = Path(data.test_path) if data.test_path else None
    if data.train_path:
        return Path(data.train_path), Path(data.eval_path) if data.eval_path else None, test
    sample = scenario.sample()
    if sample is None:
        raise DataError(f"scenario {scenario.name!r} bundles no sample data: set data.train_path")
    return sample.train, Path(data.eval_path) if data.eval_path else sample.eval, test


@task(name="ingest")
def ingest_data(scenario_name: str, data: DataConfig, seed: int) -> IngestResult:
    """Validate and split the labelled files into a content-hashed dataset (reused when unchanged)."""
    scenario = SCENARIOS.get(scenario_name)
    train_file, eval_file, test_file = data_files(data, scenario)
    options = IngestOptions(
        text_column=data.text_column,
        label_column=data.label_column,
        eval_fraction=data.eval_fraction,
        test_fraction=data.test_fraction,
        max_train_rows=data.max_train_rows,
        seed=seed,
    )
    result = ingest_files(train_file, eval_file, scenario, options, get_settings().cache_dir, test_file)
    create_markdown_artifact(
        key=f"{scenario_name}-ingest",
        description="Ingested dataset",
        markdown=(
            f"**{result.train_rows}** train / **{result.eval_rows}** eval / **{result.test_rows}** test rows "
            f"from `{train_file}`{' (eval split from train)' if result.eval_is_split else f' and `{eval_file}`'}; "
            f"labels {', '.join(result.labels)}; {result.duplicates_removed} duplicates removed; "
            f"{result.eval_overlap_removed} held-out texts also in train removed; data hash "
            f"`{result.data_hash[:12]}`{'; reused from cache' if result.cached else ''}."
        ),
    )
    return result


def prepare_data(config: FinetuneConfig, run: RunInfo) -> PreparedData:
    """The scenario's own ``PREPARE`` stage where it declares one, else the generic labelled-text ingest."""
    prepared = prepare_with_stage(StageContext(config=config, run=run))
    return prepared if prepared is not None else ingest_data(config.scenario, config.data, config.training.seed)
