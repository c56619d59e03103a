"""The ``slots`` scenario's ``PREPARE`` stage: NLU++ JSON (a file or a folder of folds) -> train/eval/test parquet.

Input (``data.train_path``; empty: the bundled NLU++ sample):

- a JSON file: a list of ``{"text", "slots": {slot: {"span": [start, end], "text", ...}}, ...}`` (NLU++'s
  layout; a row without ``slots`` has none);
- a folder of NLU++ folds (``fold0.json`` ... ``fold19.json``), or a folder whose sub-folders (domains) hold
  them, joined by fold number (NLU++'s "all" domain setup).

Protocol: with two or more folds, the last ``max(1, folds // 10)`` fold numbers are the test split (on the
20 folds of a domain: fold18 and fold19, one of the paper's "large" train/test pairs; on the bundled
4-fold sample: fold3) and the rest train. A test file or folder (``data.test_path``) replaces that
choice; without folds ``data.test_fraction`` of the rows are held out. Eval is ``data.eval_path``, else a
seeded ``data.eval_fraction`` of the training rows; ``data.select_fraction`` carves a selection split
from train that chooses the checkpoint. Texts are not de-duplicated across splits (as in the paper).

Spans are Python ``str`` indices (end exclusive). A span outside its text, empty, or whose ``text``
differs from the text at its offsets is a ``DataError`` naming file, row, column and value. Two
overlapping spans in one text cannot both be BIO-tagged: the longer is kept (the earlier on a tie)
and the other is reported as a problem row (file, row, column, value) in the log and in a Prefect
table artifact. NLU++ banking has none; hotels has two ("this afternoon" as date over "afternoon"
as time_period; "only today" as date_period over "today" as date).

The prepared folder (``spans``: JSON ``[[slot, start, end], ...]``; ``span_ids``: the same with the
slot's index in ``labels``; ``source``: file and row) is keyed by the input files and the options, so a
rerun on the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.plugins.readers import decode_utf8
from finetune_flows.tasks.classification.multilabel_sources import find_folds
from finetune_flows.tasks.classification.spans import tag_names
from finetune_flows.tasks.core.config import DataConfig
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData, StageContext
from finetune_flows.tasks.core.tables import DEFAULT_MAX_FILE_MB, MB, file_sha256, records

logger = logging.getLogger(__name__)

_VERSION = "1"
COLUMNS = ("text", "spans", "span_ids", "source")


class SlotRow(BaseModel):
    """One text and its slot spans ``(slot, start, end)``, and where it was read."""

    model_config = ConfigDict(frozen=True)

    text: str
    spans: list[tuple[str, int, int]]
    source: str


class Problem(BaseModel):
    """A span left out, and why."""

    model_config = ConfigDict(frozen=True)

    file: str
    row: int
    column: str
    value: str
    problem: str


class SlotData(PreparedData):
    """The prepared slot dataset: ``labels`` are the BIO tags (``O``, ``B-<slot>``, ``I-<slot>`` ...)."""

    slots: list[str]
    spans: dict[str, int]
    """Gold spans per split."""
    files: list[str]
    test_files: list[str]
    problems: int


def fold_files(folder: Path) -> dict[int, list[Path]]:
    """NLU++ fold files by fold number: the folder's own ``foldN.json``, or those of its domain folders
    (``multilabel_sources.find_folds``, joined by fold number)."""
    found = find_folds(folder)
    if found is None:
        raise DataError(
            "no NLU++ fold files (foldN.json) in the folder or its sub-folders",
            file=folder,
            hint="Give a folder such as nlupp/data/banking, or one JSON file",
        )
    return {number: list(paths) for number, paths in found.folds.items()}


def _span(path: Path, row: int, text: str, slot: str, value: Any) -> tuple[str, int, int]:
    """One slot's ``(slot, start, end)``, checked against its text."""
    column = f"slots.{slot}.span"
    span = value.get("span") if isinstance(value, dict) else None
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span)):
        raise DataError("a slot needs a span [start, end] of two integers", file=path, row=row, column=column,
                        value=span if span is not None else value)  # fmt: skip
    start, end = span
    if not 0 <= start < end <= len(text):
        raise DataError(
            f"span outside the text of {len(text)} characters (or empty)", file=path, row=row, column=column,
            value=span, hint=f"The text is {text!r}; spans are character (Python str) indices, end exclusive",
        )  # fmt: skip
    written = value.get("text")
    if written is not None and written != text[start:end]:
        raise DataError(
            f"the span's text {written!r} differs from the text at its offsets, {text[start:end]!r}",
            file=path, row=row, column=f"slots.{slot}.text", value=written,
        )  # fmt: skip
    return slot, start, end


def without_overlaps(
    path: Path, row: int, spans: list[tuple[str, int, int]]
) -> tuple[list[tuple[str, int, int]], list[Problem]]:
    """The spans with no two overlapping: longer first (earlier on a tie); each one dropped is a problem."""
    kept: list[tuple[str, int, int]] = []
    problems = []
    for span in sorted(spans, key=lambda s: (-(s[2] - s[1]), s[1], s[0])):
        clash = next((k for k in kept if span[1] < k[2] and k[1] < span[2]), None)
        if clash is None:
            kept.append(span)
        else:
            problems.append(
                Problem(
                    file=str(path),
                    row=row,
                    column=f"slots.{span[0]}.span",
                    value=f"[{span[1]}, {span[2]}]",
                    problem=f"overlaps the longer span of {clash[0]} [{clash[1]}, {clash[2]}]: left out",
                )
            )
    return sorted(kept, key=lambda s: (s[1], s[2])), problems


def read_nlupp(path: Path, max_file_mb: float = DEFAULT_MAX_FILE_MB) -> tuple[list[SlotRow], list[Problem]]:
    """The texts and slot spans of one NLU++ JSON file, checked; overlapping spans resolved (``without_overlaps``)."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size > max_file_mb * MB:
        raise DataError(f"file of {path.stat().st_size:,} bytes is larger than data.max_file_mb ({max_file_mb:g} MB)",
                        file=path)  # fmt: skip
    try:
        records = json.loads(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from exc
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of examples, found {type(records).__name__}", file=path)
    rows, problems = [], []
    for row, record in enumerate(records, start=1):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError("an example needs a non-empty text", file=path, row=row, column="text",
                            value=text if isinstance(record, dict) else record)  # fmt: skip
        slots = record.get("slots") or {}
        if not isinstance(slots, dict):
            raise DataError("slots must be an object {slot: {span, text, value}}", file=path, row=row, column="slots",
                            value=slots)  # fmt: skip
        spans, dropped = without_overlaps(path, row, [_span(path, row, text, slot, v) for slot, v in slots.items()])
        rows.append(SlotRow(text=text, spans=spans, source=f"{path.parent.name}/{path.name}:{row}"))
        problems += dropped
    return rows, problems


def read_source(
    path: Path, max_file_mb: float = DEFAULT_MAX_FILE_MB
) -> tuple[list[SlotRow], list[Problem], list[Path]]:
    """Rows of a JSON file, or of every fold of a folder; and the files read."""
    files = [f for fold in fold_files(path).values() for f in fold] if path.is_dir() else [path]
    rows: list[SlotRow] = []
    problems: list[Problem] = []
    for file in files:
        more, found = read_nlupp(file, max_file_mb)
        rows, problems = rows + more, problems + found
    return rows, problems, files


def hold_out(rows: list[SlotRow], fraction: float, seed: int) -> tuple[list[SlotRow], list[SlotRow]]:
    """(kept, held out): a seeded ``fraction`` of ``rows`` (at least one row when the fraction is above 0)."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = set(order[: max(1, round(fraction * len(rows)))])
    return [r for i, r in enumerate(rows) if i not in cut], [r for i, r in enumerate(rows) if i in cut]


def split_rows(
    train_path: Path, data: DataConfig, seed: int
) -> tuple[dict[str, list[SlotRow]], list[Problem], list[Path], list[Path]]:
    """Splits (train, eval, test and select when they have rows), the problems, files read and test files (see
    the module docstring for the protocol)."""
    problems: list[Problem] = []
    test: list[SlotRow] = []
    test_files: list[Path] = []
    if data.test_path:
        test, problems, test_files = read_source(Path(data.test_path), data.max_file_mb)
    if train_path.is_dir() and not data.test_path:
        folds = fold_files(train_path)
        held = list(folds)[-max(1, len(folds) // 10) :] if len(folds) > 1 else []
        test_files = [f for n in held for f in folds[n]]
        train_files = [f for n in folds if n not in held for f in folds[n]]
        train: list[SlotRow] = []
        for file in train_files:
            rows, found = read_nlupp(file, data.max_file_mb)
            train, problems = train + rows, problems + found
        for file in test_files:
            rows, found = read_nlupp(file, data.max_file_mb)
            test, problems = test + rows, problems + found
    else:
        train, found, train_files = read_source(train_path, data.max_file_mb)
        problems += found
        if not data.test_path:
            train, test = hold_out(train, data.test_fraction, seed)
    if data.eval_path:
        evaluation, found, eval_files = read_source(Path(data.eval_path), data.max_file_mb)
        problems += found
        train_files += eval_files
    else:
        train, evaluation = hold_out(train, data.eval_fraction, seed + 1)
    train, select = hold_out(train, data.select_fraction, seed + 2)
    splits = {"train": train, "eval": evaluation, "test": test, "select": select}
    return {k: v for k, v in splits.items() if v or k in ("train", "eval")}, problems, train_files, test_files


def prepare_slots_data(train_path: Path, data: DataConfig, seed: int, cache_dir: Path) -> SlotData:
    """Read, check and split the NLU++ data at ``train_path``; reuse an earlier output for identical inputs."""
    splits, problems, train_files, test_files = split_rows(train_path, data, seed)
    all_files = sorted({*train_files, *test_files})
    digest = hashlib.sha256()
    for path in all_files:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    data_hash = digest.hexdigest()
    options = json.dumps([_VERSION, seed, data.eval_fraction, data.test_fraction, data.select_fraction,
                          [p.name for p in test_files], bool(data.eval_path)])  # fmt: skip
    key = hashlib.sha256(f"{data_hash}|{options}".encode()).hexdigest()[:20]
    out = cache_dir / "slots" / key
    if (out / "meta.json").is_file():
        logger.info("slots data: reusing cached split %s", out)
        return SlotData.model_validate_json((out / "meta.json").read_text()).model_copy(update={"cached": True})
    if not splits["train"] or not splits["eval"]:
        raise DataError(f"no rows left for {'train' if not splits['train'] else 'eval'}", file=train_path)
    slots = sorted({span[0] for rows in splits.values() for row in rows for span in row.spans})
    if not slots:
        raise DataError("no slot spans in the data: nothing to learn", file=train_path)
    index = {slot: i for i, slot in enumerate(slots)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, rows in splits.items():
        pd.DataFrame(
            {
                "text": [r.text for r in rows],
                "spans": [json.dumps([list(s) for s in r.spans], ensure_ascii=False) for r in rows],
                "span_ids": [json.dumps([[index[s[0]], s[1], s[2]] for s in r.spans]) for r in rows],
                "source": [r.source for r in rows],
            },
            columns=list(COLUMNS),
        ).to_parquet(tmp / f"{split}.parquet", index=False)
    pd.DataFrame([p.model_dump() for p in problems], columns=list(Problem.model_fields)).to_csv(
        tmp / "problems.csv", index=False
    )
    counts = {split: sum(len(r.spans) for r in rows) for split, rows in splits.items()}
    test_names = ", ".join(f"{p.parent.name}/{p.name}" for p in test_files)
    test_note = f", test {test_names or 'held out'}" if "test" in splits else ""
    result = SlotData(
        dataset_dir=str(out),
        data_hash=data_hash,
        eval_hash=f"{data_hash}:{key}",
        labels=tag_names(slots),
        train_rows=len(splits["train"]),
        eval_rows=len(splits["eval"]),
        test_rows=len(splits.get("test", [])),
        summary=(
            f"{sum(map(len, splits.values()))} texts from {len(all_files)} files, {len(slots)} slot types: "
            + ", ".join(f"{split} {len(rows)} texts / {counts[split]} spans" for split, rows in splits.items())
            + f"{test_note}; {len(problems)} overlapping spans left out"
        ),
        slots=slots,
        spans=counts,
        files=[str(p) for p in all_files],
        test_files=[str(p) for p in test_files],
        problems=len(problems),
    )
    (tmp / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for problem in problems[:20]:
        logger.warning("span left out: %s (file %s, row %d, column %s, value %s)", problem.problem, problem.file,
                       problem.row, problem.column, problem.value)  # fmt: skip
    logger.info("slots data: %s", result.summary)
    return result


def slots_source(data: DataConfig, scenario: str) -> Path:
    """``data.train_path``, or the scenario's bundled sample when it is empty."""
    if data.train_path:
        return Path(data.train_path).expanduser()
    sample = SCENARIOS.get(scenario).sample()
    if sample is None:
        raise DataError(f"scenario {scenario!r} bundles no sample; set data.train_path to NLU++ JSON")
    return sample.train


def prepare_slots(context: StageContext) -> SlotData:
    """The ``slots`` scenario's ``PREPARE`` stage: NLU++ JSON -> the prepared train/eval(/test/select) splits,
    with the spans left out (overlaps) as a Prefect table artifact."""
    config = context.config
    result = prepare_slots_data(
        slots_source(config.data, config.scenario), config.data, config.training.seed, get_settings().cache_dir
    )
    problems = pd.read_csv(Path(result.dataset_dir) / "problems.csv", dtype=str, keep_default_na=False)
    if len(problems):
        create_table_artifact(
            key=f"{config.scenario}-input-report",
            table=records(problems.head(200)),
            description=f"{result.problems} overlapping spans left out (the longer span of each pair is kept)",
        )
    return result
