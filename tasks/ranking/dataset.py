"""Stage 1 of the recommender: interaction folder -> a cached leave-one-out ranking dataset.

The output folder holds items.parquet, train.parquet (interactions the baselines learn from),
pairs.parquet (training pairs), validation.parquet, test.parquet, skipped_users.csv and
problems.csv (bad input rows with file, row, column and value). It is keyed by the input files'
contents and the split options, so a rerun on the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_table_artifact

from finetune_flows.plugins import SCENARIOS, ConfigError
from finetune_flows.tasks.core.config import RankingConfig
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.stages import PreparedData, StageContext
from finetune_flows.tasks.core.tables import file_sha256, records
from finetune_flows.tasks.ranking.interactions import read_interactions
from finetune_flows.tasks.ranking.split import SplitOptions, leave_one_out

logger = logging.getLogger(__name__)

_VERSION = "2"
SPLITS = ("validation", "test")
PROBLEM_COLUMNS = ("file", "row", "column", "value", "problem")


class RankingData(PreparedData):
    """The prepared ranking dataset and what went into it.

    Besides the pipeline's ``train.parquet`` (the training pairs as ``query``/``item`` texts) and
    ``eval.parquet`` (each validation user's profile and target text), the folder holds
    ``items.parquet``, ``train_interactions.parquet`` (what the baselines learn from),
    ``pairs.parquet``, ``validation.parquet`` and ``test.parquet`` (each user's candidates).
    """

    layout: str
    users: int
    items: int
    interactions: int
    training_pairs_count: int
    evaluated_users: int
    skipped_users: int
    problems: int

    def frame(self, name: str) -> pd.DataFrame:
        """One of items, train_interactions, pairs, validation, test (or the pipeline's train, eval)."""
        return pd.read_parquet(Path(self.dataset_dir) / f"{name}.parquet")


def folder_hash(folder: Path) -> str:
    """sha256 over the names and contents of the folder's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def prepare_folder(folder: Path, options: SplitOptions, max_tags: int, cache_dir: Path) -> RankingData:
    """Read, validate and split ``folder``; reuse an earlier output for identical inputs."""
    data_hash = folder_hash(folder) if folder.is_dir() else ""
    key = hashlib.sha256(f"{_VERSION}|{data_hash}|{max_tags}|{options.model_dump_json()}".encode()).hexdigest()[:20]
    out = cache_dir / "ranking" / key
    if (out / "meta.json").is_file():
        logger.info("ranking data: reusing cached split %s", out)
        return RankingData.model_validate_json((out / "meta.json").read_text()).model_copy(update={"cached": True})
    log = read_interactions(folder, max_tags=max_tags)
    split = leave_one_out(log.ratings, log.items, options)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.items.to_parquet(tmp / "items.parquet", index=False)
    split.train.to_parquet(tmp / "train_interactions.parquet", index=False)
    split.pairs.to_parquet(tmp / "pairs.parquet", index=False)
    texts = log.items.set_index("item")["text"]
    pd.DataFrame({"query": split.pairs["profile"], "item": split.pairs["item"].map(texts).to_numpy()}).to_parquet(
        tmp / "train.parquet", index=False
    )
    pd.DataFrame(
        {"query": split.validation["profile"], "item": split.validation["target"].map(texts).to_numpy()}
    ).to_parquet(tmp / "eval.parquet", index=False)
    split.validation.to_parquet(tmp / "validation.parquet", index=False)
    split.test.to_parquet(tmp / "test.parquet", index=False)
    # Reports only (read back solely for the input-report artifact), so formula-safe.
    write_csv(split.skipped_users, tmp / "skipped_users.csv")
    write_csv(pd.DataFrame([p.model_dump() for p in log.problems], columns=list(PROBLEM_COLUMNS)), tmp / "problems.csv")
    result = RankingData(
        dataset_dir=str(out),
        data_hash=data_hash,
        eval_hash=f"{data_hash}:{key}",  # the data and the split options
        train_rows=len(split.pairs),
        eval_rows=len(split.validation),
        test_rows=len(split.test),
        summary=(
            f"{log.ratings['user'].nunique()} users ({len(split.validation)} evaluated), {len(log.items)} items, "
            f"{len(log.ratings)} interactions, {len(split.pairs)} training pairs; {len(log.problems)} bad rows and "
            f"{len(split.skipped_users)} users with too few positives skipped"
        ),
        layout=log.layout,
        users=int(log.ratings["user"].nunique()),
        items=len(log.items),
        interactions=len(log.ratings),
        training_pairs_count=len(split.pairs),
        evaluated_users=len(split.validation),
        skipped_users=len(split.skipped_users),
        problems=len(log.problems),
    )
    (tmp / "meta.json").write_text(json.dumps(result.model_dump(), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for problem in log.problems[:20]:
        logger.warning(
            "skipped row: %s (file %s, row %d, column %s, value %r)",
            problem.problem,
            problem.file,
            problem.row,
            problem.column,
            problem.value,
        )
    logger.info(
        "ranking data: %d users (%d evaluated, %d with too few positives), %d items, %d interactions, "
        "%d training pairs, %d bad rows skipped",
        result.users,
        result.evaluated_users,
        result.skipped_users,
        result.items,
        result.interactions,
        result.training_pairs_count,
        result.problems,
    )
    return result


def interaction_folder(path: str | None, scenario: str) -> Path:
    """``path``, or the scenario's bundled sample when it is empty."""
    if path:
        return Path(path).expanduser()
    sample = SCENARIOS.get(scenario).sample()
    if sample is None:
        raise ConfigError(f"scenario {scenario!r} bundles no sample; set data.train_path to an interaction folder")
    return sample.train


def split_options(ranking: RankingConfig, seed: int) -> SplitOptions:
    """The leave-one-out split's options from the config's ranking section."""
    return SplitOptions(
        positive_threshold=ranking.positive_threshold,
        min_positives=ranking.min_positives,
        negatives=ranking.negatives,
        profile_items=ranking.profile_items,
        pairs_per_user=ranking.pairs_per_user,
        seed=seed,
    )


def prepare_interactions(context: StageContext) -> RankingData:
    """The recommendation scenario's ``PREPARE`` stage: read the interaction folder (``data.train_path``), report
    bad rows and skipped users, and build the time-ordered leave-one-out split."""
    config = context.config
    folder = interaction_folder(config.data.train_path, config.scenario)
    options = split_options(config.ranking, config.training.seed)
    data = prepare_folder(folder, options, config.ranking.max_tags, get_settings().cache_dir)
    problems = pd.read_csv(Path(data.dataset_dir) / "problems.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(Path(data.dataset_dir) / "skipped_users.csv", dtype=str)
    if len(problems) or len(skipped):
        create_table_artifact(
            key=f"{config.scenario}-input-report",
            table=[
                *records(problems.head(200)),
                *(
                    {"problem": f"user {r.user}: only {r.positives} positives (not evaluated)"}
                    for r in skipped.head(200).itertuples()
                ),
            ],
            description=f"{data.problems} bad rows skipped; {data.skipped_users} users with too few positives",
        )
    return data
