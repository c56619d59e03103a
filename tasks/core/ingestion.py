"""Stage 1, ingest: labelled text files -> a validated dataset on disk with a content hash.

Files are read by ``tasks.core.tables`` and their rows checked by ``tasks.core.data_checks`` (strict UTF-8;
errors name file, row, column and value).
Raw labels go through ``data.label_map`` first, then the scenario's own label names. Exact
duplicates leave the training set; a test split (optional) and an eval split are held out
stratified and seeded when no file is given for them (test first, then eval from the rest, as
in the FinBERT protocol), then an optional selection split from what is left; held-out texts that
also occur in training are removed; labels get a sorted, deterministic id mapping. The output
folder is keyed by the inputs' content and format and the label map, so a second run with the same
inputs reuses it.

Caps (``data.max_file_mb``, ``max_rows``, ``max_text_bytes``) are checked while the files are read; a training
set whose largest class has more than ``data.max_imbalance_ratio`` times the rows of its smallest is logged as a
warning and tagged ``class_imbalance`` on the run and version. The flows run ingest as the task ``ingest_data``
of ``data_preparation``, which also checks the data's size for the ONNX parity gate.

Splits: ``train`` (fitting), ``select`` (optional: checkpoint choice and early stopping, so eval
stays held out), ``eval`` (checkpoint choice when there is no select split, promotion) and ``test``
(reported only, never used to choose anything).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import DataError
from finetune_flows.plugins.specs import Scenario
from finetune_flows.tasks.core.config import format_label_map
from finetune_flows.tasks.core.data_checks import class_imbalance, clean_rows, resolve_columns
from finetune_flows.tasks.core.out_of_scope import OUT_OF_SCOPE, OUT_OF_SCOPE_FILE, describe, held_out_labels, set_aside
from finetune_flows.tasks.core.splits import describe_splits, frame_hash, stratified_split
from finetune_flows.tasks.core.stages import PreparedData
from finetune_flows.tasks.core.tables import file_sha256, read_table

logger = logging.getLogger(__name__)

_INGEST_VERSION = "3"


class IngestOptions(BaseModel):
    """What ingest needs besides the files (a flat view of the config's data section)."""

    model_config = ConfigDict(frozen=True)

    text_column: str | None = None
    label_column: str | None = None
    eval_fraction: float = 0.1
    test_fraction: float = 0.0
    select_fraction: float = 0.0
    max_train_rows: int | None = None
    seed: int = 42
    label_map: dict[str, str] | None = None
    """Raw label value -> the scenario's label name, applied before the scenario's own names."""
    max_file_mb: float = 2048.0
    max_rows: int = 5_000_000
    max_text_bytes: int = 100_000
    max_imbalance_ratio: float = 20.0
    held_out_labels: int = 0
    out_of_scope_label: str | None = None


class IngestResult(PreparedData):
    """The prepared dataset of labelled text, and what ingest did to the files."""

    test_hash: str | None = None
    duplicates_removed: int
    eval_overlap_removed: int
    eval_is_split: bool
    text_column: str
    label_column: str
    train_file: str
    """The training file read, as an absolute, resolved path."""
    eval_file: str | None
    test_file: str | None = None
    train_sha256: str = ""
    eval_sha256: str | None = None
    test_sha256: str | None = None
    select_rows: int = 0
    """Rows of the selection split (carved from train; chooses the checkpoint); 0: none."""
    label_map: str | None = None
    """The label map applied, in its canonical text form."""
    splits: str = ""
    """Which rows train, select, evaluate and test, and where each came from."""
    class_imbalance: str | None = None
    """``"597:3 (199x) positive/negative"`` when the training classes are more imbalanced than allowed; else None."""
    out_of_scope_rows: int = 0
    """Eval and test rows set aside as out of scope (``tasks.core.out_of_scope``), in ``out_of_scope.parquet``."""
    held_out_labels: list[str] = []
    """Labels left out of training whose eval and test rows are out of scope (``data.held_out_labels``)."""

    def provenance(self) -> dict[str, str]:
        """Run and version tags naming the files read (absolute paths, sha256) and the label map."""
        tags = {"data.train_file": self.train_file, "data.train_sha256": self.train_sha256}
        for split, file, sha in (
            ("eval", self.eval_file, self.eval_sha256),
            ("test", self.test_file, self.test_sha256),
        ):
            if file and sha:
                tags.update({f"data.{split}_file": file, f"data.{split}_sha256": sha})
        if self.label_map:
            tags["data.label_map"] = self.label_map
        if self.class_imbalance:
            tags["class_imbalance"] = self.class_imbalance
        return tags


def _file_key(path: Path | None, sha: str | None) -> str:
    """Format and content of an input file (the same bytes as .csv and as .tsv are different data)."""
    if path is None:
        return "-"
    return "".join(path.suffixes).lower() + ":" + (sha or str(path))


def _sha(path: Path | None) -> str | None:
    return file_sha256(path) if path is not None and path.is_file() else None


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().resolve()) if path is not None else None


def read_labelled(path: Path, scenario: Scenario, options: IngestOptions) -> tuple[pd.DataFrame, str, str]:
    """Validated rows of ``path`` (columns ``text`` and ``label``, the scenario's label names) and the file's (text,
    label) column names: the scenario's formats and layouts, ``options``' columns, label map and caps."""
    frame = read_table(path, scenario, max_file_mb=options.max_file_mb, max_rows=options.max_rows)
    text_col, label_col = resolve_columns(frame, path, scenario, options)
    label_map = dict(options.label_map or {})
    if options.out_of_scope_label:
        label_map[options.out_of_scope_label] = OUT_OF_SCOPE
    rows = clean_rows(frame, path, text_col, label_col, scenario, label_map, options.max_text_bytes)
    return rows, text_col, label_col


def _warn_imbalance(result: IngestResult, max_ratio: float) -> None:
    if result.class_imbalance:
        logger.warning(
            "ingest: the training classes are imbalanced: %s rows (largest/smallest class) in %s, more than "
            "data.max_imbalance_ratio %g; accuracy will flatter the model: consider training.class_weights=balanced "
            "and judging it by macro-F1",
            result.class_imbalance,
            result.train_file,
            max_ratio,
        )


def ingest_files(
    train_file: Path,
    eval_file: Path | None,
    scenario: Scenario,
    options: IngestOptions,
    cache_dir: Path,
    test_file: Path | None = None,
) -> IngestResult:
    """Validate, deduplicate, split and save; reuse an earlier output for identical inputs."""
    shas = {"train": _sha(train_file), "eval": _sha(eval_file), "test": _sha(test_file)}
    key_parts = [
        _INGEST_VERSION,
        _file_key(train_file, shas["train"]),
        _file_key(eval_file, shas["eval"]),
        _file_key(test_file, shas["test"]),
        scenario.name,
        json.dumps(scenario.label_names, sort_keys=True),
        options.model_dump_json(),
    ]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    out = cache_dir / "ingest" / key
    files = {"train_file": _absolute(train_file), "eval_file": _absolute(eval_file), "test_file": _absolute(test_file)}
    if (out / "meta.json").is_file():
        result = IngestResult.model_validate_json((out / "meta.json").read_text()).model_copy(
            update={"cached": True, **files}
        )
        logger.info("ingest: reusing cached dataset %s (data hash %s; %s)", out, result.data_hash[:12], result.splits)
        _warn_imbalance(result, options.max_imbalance_ratio)
        return result

    train, text_col, label_col = read_labelled(train_file, scenario, options)
    before = len(train)
    train = train.drop_duplicates(subset=["text", "label"], keep="first")
    duplicates = before - len(train)

    # Held-out splits: from their own file, else stratified out of the training rows (test first).
    held: dict[str, tuple[pd.DataFrame, Path, str]] = {}
    sources = {"train": train_file.name}
    for split, file, fraction in (
        ("test", test_file, options.test_fraction),
        ("eval", eval_file, options.eval_fraction),
        ("select", None, options.select_fraction),
    ):
        if file is not None:
            part, _, part_label = read_labelled(file, scenario, options)
            held[split] = (part, file, part_label)
            sources[split] = file.name
        elif fraction > 0:
            keep, out_pos = stratified_split(train["label"], fraction, options.seed)
            held[split] = (train.iloc[out_pos], train_file, label_col)
            train = train.iloc[keep]
            sources[split] = f"{fraction:.0%} of {'train' if split == 'select' else train_file.name}, stratified"

    try:
        held_out = held_out_labels(train["label"], options.held_out_labels, options.seed)
    except ValueError as exc:
        raise DataError(f"{exc}: a classifier needs at least two", file=train_file, column=label_col) from exc
    train, kept, out_of_scope = set_aside(train, {s: h[0] for s, h in held.items()}, held_out)
    held = {split: (kept[split], file, part_label) for split, (_, file, part_label) in held.items()}

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
    if not out_of_scope.empty:
        out_of_scope.to_parquet(out / OUT_OF_SCOPE_FILE, index=False)
    test = parts.get("test")
    rows = {split: len(part) for split, part in parts.items()}
    splits = "; ".join(filter(None, [describe_splits(rows, sources), describe(out_of_scope, held_out)]))
    select_text = f"{rows['select']} select / " if rows.get("select") else ""
    result = IngestResult(
        dataset_dir=str(out),
        data_hash=frame_hash(pd.concat(list(parts.values()))),
        eval_hash=frame_hash(parts["eval"]),
        test_hash=frame_hash(test) if test is not None else None,
        labels=classes,
        train_rows=len(train),
        eval_rows=len(parts["eval"]),
        test_rows=len(test) if test is not None else 0,
        duplicates_removed=duplicates,
        eval_overlap_removed=sum(removed.values()),
        eval_is_split=eval_file is None,
        text_column=text_col,
        label_column=label_col,
        train_sha256=shas["train"] or "",
        eval_sha256=shas["eval"],
        test_sha256=shas["test"],
        select_rows=rows.get("select", 0),
        label_map=format_label_map(options.label_map) if options.label_map else None,
        splits=splits,
        class_imbalance=class_imbalance(train["label"], options.max_imbalance_ratio),
        out_of_scope_rows=len(out_of_scope),
        held_out_labels=held_out,
        summary=(
            f"{len(train)} train / {select_text}{len(parts['eval'])} eval / "
            f"{len(test) if test is not None else 0} test rows, labels {', '.join(classes)}"
        ),
        **files,
    )
    (out / "meta.json").write_text(result.model_dump_json(indent=2))
    logger.info(
        "ingest: %d train / %d select / %d eval / %d test rows (%s), labels %s, %d duplicates removed, "
        "%d held-out texts also in train removed",
        result.train_rows,
        result.select_rows,
        result.eval_rows,
        result.test_rows,
        splits,
        classes,
        duplicates,
        result.eval_overlap_removed,
    )
    _warn_imbalance(result, options.max_imbalance_ratio)
    return result
