"""The ``intents-multilabel`` scenario's PREPARE stage: multi-label examples -> a cached prepared dataset.

Reads ``data.train_path`` (empty: the bundled NLU++ sample) with ``multilabel_sources``:

- an NLU++ folder (domain folder, or ``data/`` with both domains): a fixed fold protocol. Without
  ``data.test_path`` the last tenth of the folds (at least one) is the test split: on the full
  20 folds, folds 18 and 19, one of the paper's "large" setups (train on 18 folds, test on 2);
  with ``data.test_path`` every fold trains;
- an NLU++ fold file or a table with ``;``-separated labels: without ``data.test_path``, a seeded
  ``data.test_fraction`` of the rows is the test split (none by default).

Eval is ``data.eval_path``, else a seeded ``data.eval_fraction`` of the training rows; a
``data.select_fraction`` of the rest chooses the checkpoint when set; ``data.max_train_rows`` samples
what trains; ``data.label_map`` renames labels (raw -> name) before anything is checked. The label
set is the NLU++ ontology's for the folder's domains (general intents too) when an
``ontology.json`` is found beside the data, else the labels of the training input; a label outside
it anywhere is a ``DataError`` naming file, row, column and value.

The folder (cache key: input file contents and these options) holds ``train/eval[/select][/test]
.parquet`` with ``text``, ``labels`` (``;``-joined), ``label_ids``, ``multi_hot`` (a float per label,
what the multi-label head trains on), ``file`` and ``row``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from finetune_flows.plugins import SCENARIOS, ConfigError, DataError
from finetune_flows.tasks.classification.multilabel_sources import (
    LABEL_SEPARATOR,
    Limits,
    check_names,
    find_folds,
    is_nlupp_json,
    ontology_intents,
    read_examples,
    read_folds,
)
from finetune_flows.tasks.core.config import ClassWeighting, FinetuneConfig
from finetune_flows.tasks.core.data_preparation import label_map_of
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData, StageContext
from finetune_flows.tasks.core.tables import file_sha256

logger = logging.getLogger(__name__)

_VERSION = "1"
SPLITS = ("train", "select", "eval", "test")


class MultiLabelData(PreparedData):
    """The prepared multi-label dataset and where its splits and labels came from."""

    layout: str
    """"nlupp-folds", "nlupp-json" or "table"."""
    label_source: str
    """Where the label set comes from: the ontology (with its path) or the training data."""
    test_folds: list[int] = []
    """NLU++ folds held out as the test split (fold protocol only)."""
    select_rows: int = 0


def carve(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, held out): a seeded random ``fraction`` of the rows (at least one) held out, both in input order."""
    if fraction <= 0 or len(frame) < 2:
        return frame, frame.iloc[:0]
    held = np.random.default_rng(seed).permutation(len(frame))[: max(1, round(len(frame) * fraction))]
    mask = np.zeros(len(frame), dtype=bool)
    mask[held] = True
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)


def held_out_folds(numbers: list[int]) -> list[int]:
    """The fold protocol's test folds: the last tenth of the folds by number, at least one (18, 19 of 20)."""
    return numbers[-max(1, len(numbers) // 10) :] if len(numbers) > 1 else []


def check_known(frame: pd.DataFrame, labels: list[str], where: str) -> None:
    """Every label of every row is in ``labels``, else a ``DataError`` naming the first row that is not."""
    known = set(labels)
    for names, file, row, column in frame[["labels", "file", "row", "column"]].itertuples(index=False):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise DataError(
                f"unknown label: not among the {len(labels)} labels of {where}",
                file=file, row=int(row), column=column, value=unknown[0],
                hint=f"Known labels: {', '.join(labels)}",
            )  # fmt: skip


def renamed(frame: pd.DataFrame, label_map: dict[str, str]) -> pd.DataFrame:
    """``frame`` with every label name ``label_map`` lists replaced by its target (``data.label_map``)."""
    if not label_map or frame.empty:
        return frame
    names = [
        check_names([label_map.get(name, name) for name in labels], Path(file), int(row), column)
        for labels, file, row, column in zip(frame["labels"], frame["file"], frame["row"], frame["column"], strict=True)
    ]
    return frame.assign(labels=names)


def with_targets(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """``frame`` with ``labels`` joined in label order, ``label_ids`` and the float ``multi_hot`` targets."""
    index = {label: i for i, label in enumerate(labels)}
    ids = [sorted(index[name] for name in names) for names in frame["labels"]]
    hot = np.zeros((len(frame), len(labels)), dtype=np.float32)
    for row, row_ids in enumerate(ids):
        hot[row, row_ids] = 1.0
    return pd.DataFrame(
        {
            "text": frame["text"].astype(str).to_numpy(),
            "labels": [LABEL_SEPARATOR.join(labels[i] for i in row_ids) for row_ids in ids],
            "label_ids": ids,
            "multi_hot": list(hot),
            "file": frame["file"].astype(str).to_numpy(),
            "row": frame["row"].astype(np.int64).to_numpy(),
        }
    )


def split_hash(frame: pd.DataFrame, labels: list[str]) -> str:
    """sha256 over the label set and the (text, labels) rows: the identity of an eval split."""
    digest = hashlib.sha256(json.dumps(labels).encode())
    for text, names in zip(frame["text"], frame["labels"], strict=True):
        digest.update(text.encode("utf-8") + b"\x1f" + names.encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def check_config(config: FinetuneConfig) -> None:
    """Training options that assume one label per text are refused before anything reads or trains."""
    if config.training.class_weights is ClassWeighting.BALANCED:
        raise ConfigError("training.class_weights=balanced weights one class per text; a multi-label head has none")
    if config.training.label_smoothing > 0:
        raise ConfigError("training.label_smoothing smooths one class per text; set it to 0 for a multi-label head")


def prepare_multilabel_data(config: FinetuneConfig, cache_dir: Path) -> MultiLabelData:
    """Read, check and split the configured inputs (see the module doc); reuse an earlier output for identical
    inputs and options."""
    data, seed = config.data, config.training.seed
    scenario = SCENARIOS.get(config.scenario)
    if data.train_path:
        train_path = Path(data.train_path).expanduser()
    else:
        sample = scenario.sample()
        if sample is None:
            raise DataError(f"scenario {config.scenario!r} bundles no sample data: set data.train_path")
        train_path = sample.train
    eval_path = Path(data.eval_path).expanduser() if data.eval_path else None
    test_path = Path(data.test_path).expanduser() if data.test_path else None
    limits = Limits(data.max_file_mb, data.max_rows, data.max_text_bytes)
    if not train_path.exists():
        raise DataError("file not found", file=train_path)

    folds = find_folds(train_path) if train_path.is_dir() else None
    test_numbers = held_out_folds(list(folds.folds)) if folds and test_path is None else []
    files = sorted(
        {*(p for f in (folds.folds.values() if folds else []) for p in f)}
        | {p for p in (train_path, eval_path, test_path) if p is not None and p.is_file()}
    )
    label_map = label_map_of(data, config.scenario) or {}
    options = data.model_dump(include={"eval_fraction", "test_fraction", "select_fraction", "max_train_rows",
                                       "text_column", "label_column"})  # fmt: skip
    options["label_map"] = label_map
    identity = [_VERSION, config.scenario, str(seed), json.dumps(options, sort_keys=True), str(test_numbers)]
    identity += [f"{p.name}:{file_sha256(p)}" for p in files]
    for folder in (p for p in (eval_path, test_path) if p is not None and p.is_dir()):
        identity += [f"{folder.name}/{p.name}:{file_sha256(p)}" for p in sorted(folder.rglob("*.json"))]
    data_hash = hashlib.sha256("\n".join(identity).encode()).hexdigest()
    out = cache_dir / "multilabel" / data_hash[:20]
    if (out / "meta.json").is_file():
        logger.info("multi-label data: reusing cached split %s", out)
        return MultiLabelData.model_validate_json((out / "meta.json").read_text()).model_copy(update={"cached": True})

    if folds is not None:
        layout = "nlupp-folds"
        source = read_folds(folds, [n for n in folds.folds if n not in test_numbers], limits)
        test = read_folds(folds, test_numbers, limits) if test_numbers else None
        found = ontology_intents(folds.root, folds.domains)
    else:
        source = read_examples(train_path, scenario, data, limits)
        layout = "nlupp-json" if is_nlupp_json(train_path) else "table"
        test = None
        found = ontology_intents(train_path.parent, (train_path.parent.name,)) if layout == "nlupp-json" else None
    source = renamed(source, label_map)
    if test_path is not None:
        test = read_examples(test_path, scenario, data, limits)
    elif test is None and data.test_fraction > 0:
        source, test = carve(source, data.test_fraction, seed + 1)
    test = renamed(test, label_map) if test is not None else None
    evaluation = renamed(read_examples(eval_path, scenario, data, limits), label_map) if eval_path else None
    if evaluation is None:
        source, evaluation = carve(source, data.eval_fraction, seed)
    train, select = carve(source, data.select_fraction, seed + 2)
    if data.max_train_rows is not None and len(train) > data.max_train_rows:
        train = train.sample(n=data.max_train_rows, random_state=seed).sort_index().reset_index(drop=True)

    if found is not None:
        labels, ontology = found
        label_source, where = f"the NLU++ ontology {ontology}", f"the ontology {ontology}"
    else:
        labels = sorted({name for names in [*train["labels"], *select["labels"]] for name in names})
        label_source, where = "the training data", "the training data"
    if not labels:
        raise DataError("no labels: no training text has a label", file=train_path)
    splits = {"train": train, "select": select, "eval": evaluation, "test": test}
    for frame in splits.values():
        if frame is not None:
            check_known(frame, labels, where)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = {}
    for split, frame in splits.items():
        if frame is not None and (len(frame) or split in ("train", "eval")):
            with_targets(frame, labels).to_parquet(tmp / f"{split}.parquet", index=False)
            rows[split] = len(frame)
    prepared = with_targets(evaluation, labels)
    test_note = (
        f"test folds {', '.join(map(str, test_numbers))}" if test_numbers else str(test_path or "a seeded split")
    )
    result = MultiLabelData(
        dataset_dir=str(out),
        data_hash=data_hash,
        eval_hash=split_hash(prepared, labels),
        labels=labels,
        train_rows=rows["train"],
        eval_rows=rows["eval"],
        test_rows=rows.get("test", 0),
        select_rows=rows.get("select", 0),
        summary=(
            f"{layout} {train_path}: train {rows['train']} rows, "
            + (f"select {rows['select']} rows, " if rows.get("select") else "")
            + f"eval {rows['eval']} rows ({eval_path or f'{data.eval_fraction:g} of the training input'}), "
            + (f"test {rows['test']} rows ({test_note})" if rows.get("test") else "no test split")
            + f"; {len(labels)} labels from {label_source}"
        ),
        layout=layout,
        label_source=label_source,
        test_folds=test_numbers,
    )
    (tmp / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("multi-label data: %s", result.summary)
    return result


def prepare_multilabel(context: StageContext) -> MultiLabelData:
    """The ``intents-multilabel`` scenario's ``PREPARE`` stage (see the module doc)."""
    check_config(context.config)
    return prepare_multilabel_data(context.config, get_settings().cache_dir)
