"""The publishing core (``tasks.publishing``) on a temporary MLflow store with a tiny real pyfunc: one version
per idempotency key, typed promotion outcomes, and a registry that fails at any step (inside the create
call, after it, while reading the champion, or a process dying mid-way) leaves no version without its
tags and the champion alias where it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE, ErrorCode

import finetune_flows.tasks.publishing.registration as registration
from finetune_flows.plugins import PromotionError
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.publishing.promotion import NotComparable, Outcome, Rescore
from finetune_flows.tasks.publishing.registration import RegisterResult, ServedModel, publish_version, version_link

pytestmark = pytest.mark.usefixtures("prefect_harness")

MODEL_CODE = """
from pathlib import Path

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class ConstantScorer(PythonModel):
    def load_context(self, context):
        self.value = float(Path(context.artifacts["constant"]).read_text())

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"score": [self.value] * len(model_input)})


set_model(ConstantScorer())
"""
TEXTS = ["a gorgeous , witty film", "a dull , lifeless mess"]
PAIRS = {"query": ["Liked recently: Rocket mission 1"] * 2, "item": ["Rocket mission 5", "Pasta at home"]}
EVIDENCE = {"scenario", "eval_hash", "primary_metric", "challenger.accuracy", "registration", "registration_attempt"}


@pytest.fixture
def client(state_dir: Path) -> MlflowClient:
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    mlflow.set_experiment("publishing")  # not an experiment id an earlier test's store had set
    return MlflowClient()


@pytest.fixture
def served(tmp_path: Path) -> Callable[..., ServedModel]:
    """A models-from-code pyfunc that scores every row with the constant in its artifact file."""
    code, constant = tmp_path / "constant_model.py", tmp_path / "constant.txt"
    code.write_text(MODEL_CODE, encoding="utf-8")
    constant.write_text("0.5", encoding="utf-8")

    def make(example: list[str] | dict[str, list[str]] = TEXTS) -> ServedModel:
        return ServedModel(python_model=str(code), artifacts={"constant": str(constant)}, input_example=example)

    return make


def publish(
    model: ServedModel, metric: float, key: str | None = None, eval_hash: str = "eval-1", rescore: Rescore | None = None
) -> RegisterResult:
    with mlflow.start_run() as run:
        pass
    return publish_version(
        run.info.run_id, "m", model, metric=metric, primary_metric="accuracy", eval_hash=eval_hash,
        tags={"scenario": "test"}, rescore=rescore, idempotency_key=key,
    )  # fmt: skip


def versions(client: MlflowClient) -> dict[str, dict[str, str]]:
    """version -> tags; and every version that exists carries its evidence tags (no half-registered version)."""
    found = {str(v.version): dict(v.tags) for v in client.search_model_versions("name='m'")}
    for version, tags in found.items():
        assert set(tags) >= EVIDENCE, (version, tags)
    return dict(sorted(found.items()))


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model("m").aliases.items()}


def champion(client: MlflowClient) -> str | None:
    return aliases(client).get("champion")


def store_error(message: str, code: int = TEMPORARILY_UNAVAILABLE) -> MlflowException:
    return MlflowException(message, error_code=ErrorCode.Name(code))


@pytest.mark.parametrize("example", [TEXTS, PAIRS], ids=["texts", "pairs"])
def test_one_idempotency_key_published_twice_gives_one_version(client, served, monkeypatch, example) -> None:
    model = served(example)
    first = publish(model, 0.7, key="slot-1")
    second = publish(model, 0.9, key="slot-1")
    assert (first.version, first.reused, first.outcome) == ("1", False, Outcome.PROMOTED_FIRST)
    assert (second.version, second.reused, second.outcome) == ("1", True, Outcome.REUSED)
    assert second.aliases == ["challenger", "champion"] and second.challenger_metric == pytest.approx(0.7)
    assert list(versions(client)) == ["1"]
    assert versions(client)["1"]["registration"] == "complete" and versions(client)["1"]["idempotency_key"] == "slot-1"

    # A duplicate that got past the check before the lock (the key appeared while it logged its model)
    # is caught by the check inside the lock.
    real, calls = registration.version_with_key, []

    def appeared_late(client_: MlflowClient, name: str, key: str) -> object:
        calls.append(key)
        return None if len(calls) == 1 else real(client_, name, key)

    monkeypatch.setattr(registration, "version_with_key", appeared_late)
    third = publish(model, 0.9, key="slot-1")
    assert (third.version, third.reused, len(calls)) == ("1", True, 2) and list(versions(client)) == ["1"]

    # The served model was logged with a signature from its real input, and takes that input.
    loaded = mlflow.pyfunc.load_model("models:/m@champion")
    frame = pd.DataFrame(example) if isinstance(example, dict) else example
    assert loaded.predict(frame)["score"].tolist() == [0.5, 0.5]
    expected = ["query", "item"] if isinstance(example, dict) else [None]
    assert [c.name for c in loaded.metadata.get_input_schema().inputs] == expected


def test_typed_outcomes_first_worse_better_and_not_comparable(client, served) -> None:
    model = served()
    first = publish(model, 0.7)
    assert (first.outcome, first.decision, first.promoted) == (
        Outcome.PROMOTED_FIRST,
        "promoted: no champion yet",
        True,
    )
    worse = publish(model, 0.6)
    assert (worse.outcome, worse.aliases, champion(client)) == (Outcome.KEPT_NOT_BETTER, ["challenger"], "1")
    assert worse.decision == "kept champion: 0.6000 <= champion 0.7000 + margin 0"
    better = publish(model, 0.8)
    assert (better.outcome, better.champion_version, champion(client)) == (Outcome.PROMOTED_BETTER, "1", "3")

    # Another eval set: the champion is re-scored there; a rescore that cannot compare keeps the champion.
    cannot = publish(model, 0.99, eval_hash="eval-2", rescore=lambda v: NotComparable(reason=f"v{v} has other labels"))
    assert (cannot.outcome, cannot.promoted, champion(client)) == (Outcome.KEPT_NOT_COMPARABLE, False, "3")
    assert cannot.decision == "kept champion: v3 is not comparable (v3 has other labels)"
    assert versions(client)["4"]["promotion.outcome"] == "kept_not_comparable"
    no_rescore = publish(model, 0.99, eval_hash="eval-2")
    assert no_rescore.outcome == Outcome.KEPT_NOT_COMPARABLE and champion(client) == "3"
    rescored = publish(model, 0.5, eval_hash="eval-2", rescore=lambda v: 0.25)
    assert (rescored.outcome, rescored.champion_metric, champion(client)) == (Outcome.PROMOTED_BETTER, 0.25, "6")


@pytest.mark.parametrize("creates", [True, False], ids=["after-creating", "before-creating"])
def test_a_store_failing_inside_create_model_version_rolls_back(client, served, monkeypatch, creates) -> None:
    publish(served(), 0.5)
    real = MlflowClient.create_model_version

    def failing(self: MlflowClient, *args: object, **kwargs: object) -> object:
        if creates:
            real(self, *args, **kwargs)  # the store wrote the version, then the answer was lost
        raise store_error("connection reset by peer")

    monkeypatch.setattr(MlflowClient, "create_model_version", failing)
    deleted = "2" if creates else "none"
    with pytest.raises(
        PromotionError,
        match=rf"rolled back \(deleted version\(s\): {deleted}; champion stays 1\): model registry step "
        r"'create the version with its tags' failed for model 'm': MlflowException: connection reset",
    ):
        publish(served(), 0.9, key="slot-1")
    assert list(versions(client)) == ["1"] and aliases(client) == {"champion": "1", "challenger": "1"}
    monkeypatch.undo()
    retried = publish(served(), 0.9, key="slot-1")  # the key was never taken; a deleted number is not reused
    assert (retried.version, retried.reused) == ("3" if creates else "2", False)


def test_a_version_left_pending_is_ignored_then_deleted_by_the_next_publish(client, served, monkeypatch) -> None:
    publish(served(), 0.5)
    real = MlflowClient.create_model_version

    def created_then_lost(self: MlflowClient, *args: object, **kwargs: object) -> object:
        real(self, *args, **kwargs)
        raise store_error("connection reset by peer")

    def store_down(self: MlflowClient, *args: object) -> None:
        raise store_error("store unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "create_model_version", created_then_lost)
        patch.setattr(MlflowClient, "delete_model_version", store_down)
        with pytest.raises(PromotionError, match=r"undoing it failed too .*store unavailable.*next publish of m"):
            publish(served(), 0.9, key="slot-1")
    # The orphan has all its tags, says pending, holds no alias and is no idempotency match.
    assert versions(client)["2"]["registration"] == "pending" and champion(client) == "1"
    again = publish(served(), 0.9, key="slot-1")
    assert (again.version, again.reused, again.outcome) == ("3", False, Outcome.PROMOTED_BETTER)
    assert list(versions(client)) == ["1", "3"] and champion(client) == "3"


def test_a_publish_killed_after_moving_the_champion_is_undone_by_the_next_one(client, served, monkeypatch) -> None:
    publish(served(), 0.5)
    real = MlflowClient.set_model_version_tag

    def killed_before_complete(self: MlflowClient, name: str, version: str, key: str, value: str) -> None:
        if (key, value) == ("registration", "complete"):
            raise SystemExit("killed")  # not an Exception: no rollback runs, as when the process dies
        real(self, name, version, key, value)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", killed_before_complete)
        with pytest.raises(SystemExit):
            publish(served(), 0.9)
    assert champion(client) == "2" and versions(client)["2"]["registration"] == "pending"
    kept = publish(served(), 0.4)  # compared with v1 again, which the sweep made champion again
    assert (kept.outcome, kept.champion_version, champion(client)) == (Outcome.KEPT_NOT_BETTER, "1", "1")
    assert list(versions(client)) == ["1", "3"]


FAILING_STEPS = {  # (client method, which call fails, the step the error names)
    "champion alias": ("set_registered_model_alias", lambda a: a[1] == "champion", r"move alias champion to v2"),
    "evidence tag": ("set_model_version_tag", lambda a: a[2] == "promotion.decision", r"tag v2 with the promotion"),
    "complete tag": ("set_model_version_tag", lambda a: a[3] == "complete", r"tag v2 registration=complete"),
}


@pytest.mark.parametrize("step", list(FAILING_STEPS))
def test_a_failure_after_registering_deletes_the_version_and_keeps_the_champion(
    client, served, monkeypatch, step
) -> None:
    publish(served(), 0.5)
    method, fails, message = FAILING_STEPS[step]
    real = getattr(MlflowClient, method)

    def failing(self: MlflowClient, *args: str) -> object:
        if fails(args):
            raise store_error("database is locked", INTERNAL_ERROR)
        return real(self, *args)

    monkeypatch.setattr(MlflowClient, method, failing)
    with pytest.raises(
        PromotionError, match=rf"deleted version\(s\): 2; champion stays 1\): model registry step '{message}.*locked"
    ):
        publish(served(), 0.9)
    assert list(versions(client)) == ["1"] and aliases(client) == {"champion": "1", "challenger": "1"}


def test_a_registry_error_reading_the_champion_is_not_no_champion(client, served, monkeypatch) -> None:
    publish(served(), 0.5)

    def locked(self: MlflowClient, name: str) -> object:
        raise store_error("database is locked", INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "get_registered_model", locked)
    with pytest.raises(PromotionError, match=r"step 'read the champion' failed for model 'm': .*database is locked"):
        publish(served(), 0.9)
    monkeypatch.undo()
    assert list(versions(client)) == ["1"] and champion(client) == "1"


def test_a_missing_model_means_no_champion(client, served) -> None:
    assert publish(served(), 0.1).outcome == Outcome.PROMOTED_FIRST and champion(client) == "1"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://user:secret@mlflow.example:5000/", "http://***@mlflow.example:5000/#/models/m/versions/3"),
        ("https://token@host/prefix?auth=x", "https://***@host/prefix/#/models/m/versions/3"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000/#/models/m/versions/3"),
    ],
)
def test_version_link_never_shows_credentials(uri, shown) -> None:
    link = version_link(uri, "m", "3")
    assert link == f"[m v3]({shown})" and "secret" not in link and "token" not in link


def test_a_local_store_link_hides_database_credentials() -> None:
    link = version_link("postgresql://admin:pw@db:5432/mlflow", "m", "3")
    assert "--backend-store-uri postgresql://***@db:5432/mlflow" in link and "pw" not in link


def test_a_served_model_that_cannot_predict_its_example_is_not_registered(client, served, tmp_path) -> None:
    broken = tmp_path / "broken_model.py"
    broken.write_text(MODEL_CODE.replace("return pd.DataFrame", "raise KeyError('text'); return pd.DataFrame"))
    model = served().model_copy(update={"python_model": str(broken)})
    with pytest.raises(PromotionError, match=r"broken_model\.py did not predict on its input example"):
        publish(model, 0.5)
    assert client.search_registered_models() == []
