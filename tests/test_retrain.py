"""Flow ``retrain`` on the tiny model: warm start from the champion, promotion only on improvement
on the frozen eval file, one version per schedule slot; and the promotion lock, which keeps the
champion alias on the better version when two promotions run at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest

import finetune_flows.tasks.publishing.promotion as promotion
from finetune_flows.flows.finetune import finetune
from finetune_flows.flows.retrain import retrain
from finetune_flows.tasks.core.config import FinetuneConfig, RetrainConfig
from finetune_flows.tasks.core.retraining import plan_retrain
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.publishing.promotion import Candidate, promote_locked, promote_version
from tests.conftest import NEGATIVE, POSITIVE, write_tsv

pytestmark = pytest.mark.usefixtures("prefect_harness")

SUFFIXES = ["indeed", "overall", "really", "truly", "honestly", "frankly"]
MORE = ["clearly", "simply", "surely", "plainly", "certainly", "obviously"]


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data folder with two files in two layouts, frozen eval file, all training rows in one file):
    288 train rows, 48 eval rows (the parity gate needs 256 texts)."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    data = tmp_path / "incoming"
    data.mkdir()
    write_tsv(data / "part1.tsv", [(f"{t} {s}", lab) for s in SUFFIXES for t, lab in rows])
    named = {"1": "positive", "0": "negative"}
    part2 = "text,label\n" + "".join(f'"{t} {s}",{named[lab]}\n' for s in MORE for t, lab in rows)
    (data / "part2.csv").write_text(part2, encoding="utf-8")
    frozen_rows = [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows]
    frozen = write_tsv(tmp_path / "frozen_dev.tsv", frozen_rows)
    everything = write_tsv(tmp_path / "all.tsv", [(f"{t} {s}", lab) for s in SUFFIXES + MORE for t, lab in rows])
    return data, frozen, everything


def retrain_config(folder: tuple[Path, ...], slot: str, **training: object) -> RetrainConfig:
    return RetrainConfig.model_validate(
        {
            "scenario": "sentiment",
            "data_folder": str(folder[0]),
            "data": {"eval_path": str(folder[1])},
            "model": {"max_length": 32},
            "slot": slot,
            "training": {"eval_every_steps": 5, "batch_size": 16, "learning_rate": 5e-3, **training},
        }
    )


def versions() -> list[str]:
    return sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions("name='sentiment'"))


def champion() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias("sentiment", "champion").version)


@pytest.mark.slow  # 93 s; the default suite keeps retrain's failed-stage and concurrent-promotion tests
def test_retrain_promotes_only_a_better_challenger_once_per_slot(state_dir, tiny_model_dir, folder) -> None:
    # A weak champion (one step from the tiny model) to warm-start from.
    weak = FinetuneConfig.for_scenario(
        "sentiment",
        {
            "model.source": str(tiny_model_dir), "model.max_length": 32, "training.max_steps": 1,
            "data.train_path": str(folder[2]), "data.eval_path": str(folder[1]),
        },
    )  # fmt: skip
    assert finetune(weak).version == "1"
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    client = mlflow.MlflowClient()

    # A properly trained challenger from the champion: better on the frozen eval file -> promoted.
    better = retrain(retrain_config(folder, "2026-11-23T03:00:00+00:00", epochs=4))
    assert (better.version, better.reused) == ("2", False) and champion() == "2"
    assert better.warm_start == "models:/sentiment/1" and len(better.files) == 2
    tags = client.get_model_version("sentiment", "2").tags
    assert tags["model_source"] == "models:/sentiment/1" and tags["idempotency_key"] == better.key
    assert tags["promotion.decision"].startswith("promoted") and tags["champion.version"] == "1"
    assert float(tags["challenger.accuracy"]) > float(tags["champion.accuracy"])

    # The same slot and data again: the version of the first run, nothing trained or registered.
    again = retrain(retrain_config(folder, "2026-11-23T03:00:00+00:00", epochs=4))
    assert (again.version, again.reused) == ("2", True) and versions() == ["1", "2"]
    # ... and also when a duplicate got past that first check: the key is checked again inside the lock.
    plan = plan_retrain.fn(retrain_config(folder, "2026-11-23T03:00:00+00:00", epochs=4))
    duplicate = finetune(plan.finetune)
    assert (duplicate.version, duplicate.reused_version) == ("2", True) and versions() == ["1", "2"]

    # A new slot whose training wrecks the warm-started model: worse on the frozen eval file -> kept.
    wrecking = retrain_config(folder, "2026-11-24T03:00:00+00:00", max_steps=6, learning_rate=1.0, warmup_ratio=0.0)
    worse = retrain(wrecking)
    assert worse.version == "3" and worse.aliases == ["challenger"] and champion() == "2"
    tags = client.get_model_version("sentiment", "3").tags
    assert tags["model_source"] == "models:/sentiment/2" and tags["promotion.decision"].startswith("kept champion")
    assert float(tags["challenger.accuracy"]) < float(tags["champion.accuracy"])
    assert tags["champion.accuracy"] == client.get_model_version("sentiment", "2").tags["challenger.accuracy"]


def test_a_failed_stage_is_named_in_the_run_state(state_dir, folder, tmp_path) -> None:
    config = retrain_config((tmp_path / "missing", folder[1]), "slot")
    state = retrain(config, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("stage plan-retrain failed: DataError: data folder not found")


def fake_versions(n: int) -> None:
    """``n`` registered versions of model ``race`` without real artifacts (the gate reads tags only)."""
    client = mlflow.MlflowClient()
    client.create_registered_model("race")
    for _ in range(n):
        client.create_model_version("race", source="file:///nonexistent", tags={"eval_hash": "h"})


def candidate(version: str, metric: float) -> Candidate:
    return Candidate(model_name="race", version=version, primary_metric="accuracy", metric=metric, eval_hash="h")


@pytest.mark.parametrize("locked", [True, False])
def test_two_promotions_at_once_leave_the_champion_on_the_better_version(state_dir, monkeypatch, locked) -> None:
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    fake_versions(3)
    client = mlflow.MlflowClient()
    promote_locked(client, candidate("1", 0.50))  # v1 is champion at 0.50
    for version, metric in (("1", 0.50), ("2", 0.70), ("3", 0.90)):
        client.set_model_version_tag("race", version, "challenger.accuracy", f"{metric:.6f}")

    # Both read the champion (v1), then v3 writes first and v2 last: without a lock v2 would win.
    read = promotion.read_champion
    delay = {"2": 1.0, "3": 0.2}

    def slow_read(client, cand, rescore=None):
        found = read(client, cand, rescore)
        time.sleep(delay[cand.version])
        return found

    monkeypatch.setattr(promotion, "read_champion", slow_read)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def promote(version: str, metric: float) -> None:
        try:
            start.wait()
            if locked:
                promote_version(candidate(version, metric))
            else:
                promote_locked(mlflow.MlflowClient(), candidate(version, metric))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=a) for a in (("2", 0.70), ("3", 0.90))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    winner = str(client.get_model_version_by_alias("race", "champion").version)
    if locked:
        assert winner == "3"
    else:
        assert winner == "2"  # the race the lock prevents (shows this test can fail)
