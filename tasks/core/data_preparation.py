"""Stage 1 as the flows run it: the scenario's own ``PREPARE`` stage, or ingest of the configured files.

``ingest_data`` is the Prefect task of ``ingestion.ingest_files``, its files and options taken from
the run's data section (``data_files``, ``ingest_options``; the label map read and checked by
``label_map_of``). Before anything tokenizes, ``prepare_data`` checks that the prepared data holds
enough texts for the ONNX parity gate that follows training (``check_parity_size``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from finetune_flows.plugins import HEADS, SCENARIOS, DataError
from finetune_flows.plugins.specs import Scenario
from finetune_flows.tasks.core.config import DataConfig, FinetuneConfig, label_map_problem, parse_label_map
from finetune_flows.tasks.core.failures import STAGE_ATTRIBUTE
from finetune_flows.tasks.core.ingestion import IngestOptions, IngestResult, ingest_files
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData, StageContext, prepare_with_stage
from finetune_flows.tasks.core.tables import read_label_map
from finetune_flows.tasks.core.tracking import RunInfo, tag_run


def data_files(data: DataConfig, scenario: Scenario) -> tuple[Path, Path | None, Path | None]:
    """(train, eval, test) files: as configured, else the scenario's bundled sample."""
    test = Path(data.test_path) if data.test_path else None
    if data.train_path:
        return Path(data.train_path), Path(data.eval_path) if data.eval_path else None, test
    sample = scenario.sample()
    if sample is None:
        raise DataError(f"scenario {scenario.name!r} bundles no sample data: set data.train_path")
    return sample.train, Path(data.eval_path) if data.eval_path else sample.eval, test


def label_map_of(data: DataConfig, scenario_name: str) -> dict[str, str] | None:
    """The configured label map (text or file form), its targets checked against the scenario's labels."""
    if data.label_map:
        return parse_label_map(data.label_map)  # the config checked its targets
    if not data.label_map_path:
        return None
    path = Path(data.label_map_path)
    pairs = read_label_map(path)
    problem = label_map_problem(pairs, scenario_name)
    if problem:
        raise DataError(f"data.label_map_path: {problem}", file=path)
    return pairs


def ingest_options(data: DataConfig, scenario_name: str, seed: int) -> IngestOptions:
    """The ingest options of a run's data section (label map read and checked)."""
    return IngestOptions(
        text_column=data.text_column,
        label_column=data.label_column,
        eval_fraction=data.eval_fraction,
        test_fraction=data.test_fraction,
        select_fraction=data.select_fraction,
        max_train_rows=data.max_train_rows,
        seed=seed,
        label_map=label_map_of(data, scenario_name),
        max_file_mb=data.max_file_mb,
        max_rows=data.max_rows,
        max_text_bytes=data.max_text_bytes,
        max_imbalance_ratio=data.max_imbalance_ratio,
        held_out_labels=data.held_out_labels,
        out_of_scope_label=data.out_of_scope_label,
    )


@task(name="ingest")
def ingest_data(scenario_name: str, data: DataConfig, seed: int) -> IngestResult:
    """Validate and split the labelled files into a content-hashed dataset (reused when unchanged)."""
    scenario = SCENARIOS.get(scenario_name)
    train_file, eval_file, test_file = data_files(data, scenario)
    options = ingest_options(data, scenario_name, seed)
    result = ingest_files(train_file, eval_file, scenario, options, get_settings().cache_dir, test_file)
    create_markdown_artifact(
        key=f"{scenario_name}-ingest",
        description="Ingested dataset",
        markdown=(
            f"**{result.train_rows}** train / **{result.select_rows}** select / **{result.eval_rows}** eval / "
            f"**{result.test_rows}** test rows: {result.splits}; "
            f"labels {', '.join(result.labels)}; {result.duplicates_removed} duplicates removed; "
            f"{result.eval_overlap_removed} held-out texts also in train removed; data hash "
            f"`{result.data_hash[:12]}`{'; reused from cache' if result.cached else ''}."
        ),
    )
    return result


def prepare_data(config: FinetuneConfig, run: RunInfo) -> PreparedData:
    """The scenario's own ``PREPARE`` stage where it declares one, else the generic labelled-text ingest (whose
    files, hashes and label map are tagged on the run)."""
    prepared = prepare_with_stage(StageContext(config=config, run=run))
    if prepared is not None:
        check_parity_size(prepared, config.head_name)
        return prepared
    result = ingest_data(config.scenario, config.data, config.training.seed)
    if isinstance(result, IngestResult):  # (narrows Prefect's task return type for mypy)
        tag_run(run, result.provenance())
    try:
        check_parity_size(result, config.head_name)
    except DataError as exc:
        setattr(exc, STAGE_ATTRIBUTE, "ingest")  # the failed run names the stage whose output is too small
        raise
    return result


def check_parity_size(data: PreparedData, head_name: str) -> None:
    """The prepared data holds the texts the ONNX parity gate after training needs (``MIN_PARITY_TEXTS``), or a
    ``DataError`` now, before anything tokenizes or trains.

    The gate takes its texts as ``parity_texts`` does: eval rows first, topped up from train, one text per text
    column of the head."""
    import pyarrow.parquet as pq

    from finetune_flows.tasks.export.model_export import MIN_PARITY_TEXTS

    folder = Path(data.dataset_dir)
    rows = {split: pq.read_metadata(folder / f"{split}.parquet").num_rows for split in ("eval", "train")}
    per_row = len(HEADS.get(head_name).text_columns)
    texts = (rows["eval"] + rows["train"]) * per_row
    if texts >= MIN_PARITY_TEXTS:
        return
    file: str | Path = folder
    where = ""
    if isinstance(data, IngestResult):
        file = data.train_file if data.eval_is_split or not data.eval_file else data.eval_file
        where = f" (the split held out of {Path(data.train_file).name})" if data.eval_is_split else ""
    per = f" x {per_row} texts per row ({', '.join(HEADS.get(head_name).text_columns)})" if per_row > 1 else ""
    raise DataError(
        f"too few rows for the ONNX parity gate after training: {rows['eval']} eval rows{where} + {rows['train']} "
        f"train rows{per} = {texts} texts, and the gate needs at least {MIN_PARITY_TEXTS}; the run would train "
        "and then fail",
        file=file,
        hint=(
            f"Give at least {MIN_PARITY_TEXTS} rows in the training and eval files together (the gate's minimum is "
            f"fixed: export.parity_samples cannot go below {MIN_PARITY_TEXTS})"
        ),
    )
