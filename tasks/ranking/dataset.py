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
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import SCENARIOS, ConfigError
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import file_sha256, records
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.interactions import read_interactions
from finetune_flows.tasks.ranking.split import SplitOptions, leave_one_out

logger = logging.getLogger(__name__)

_VERSION = "1"
SPLITS = ("validation", "test")
PROBLEM_COLUMNS = ("file", "row", "column", "value", "problem")


class RankingData(BaseModel):
    """Where the ranking dataset is and what went into it."""

    model_config = ConfigDict(frozen=True)

    dataset_dir: str
    data_hash: str
    layout: str
    users: int
    items: int
    interactions: int
    training_pairs_count: int
    evaluated_users: int
    skipped_users: int
    problems: int
    cached: bool = False

    def frame(self, name: str) -> pd.DataFrame:
        """One of items, train, pairs, validation, test."""
        return pd.read_parquet(Path(self.dataset_dir) / f"{name}.parquet")

    def training_pairs(self) -> pd.DataFrame:
        """pairs joined with the liked item's text (column item_text)."""
        texts = self.frame("items").set_index("item")["text"]
        pairs = self.frame("pairs")
        return pairs.assign(item_text=pairs["item"].map(texts).to_numpy())


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
    split.train.to_parquet(tmp / "train.parquet", index=False)
    split.pairs.to_parquet(tmp / "pairs.parquet", index=False)
    split.validation.to_parquet(tmp / "validation.parquet", index=False)
    split.test.to_parquet(tmp / "test.parquet", index=False)
    split.skipped_users.to_csv(tmp / "skipped_users.csv", index=False)
    pd.DataFrame([p.model_dump() for p in log.problems], columns=list(PROBLEM_COLUMNS)).to_csv(
        tmp / "problems.csv", index=False
    )
    result = RankingData(
        dataset_dir=str(out),
        data_hash=data_hash,
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
        raise ConfigError(f"scenario {scenario!r} bundles no sample; set data.path")
    return sample.train


@task(name="prepare-interactions")
def prepare_interactions(config: RecommenderConfig) -> RankingData:
    """Read the interaction folder, report bad rows and skipped users, and build the split."""
    folder = interaction_folder(config.data.path, config.scenario)
    data = prepare_folder(folder, config.split_options(), config.data.max_tags, get_settings().cache_dir)
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
