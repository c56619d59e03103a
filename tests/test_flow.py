"""The whole ``finetune`` flow with a tiny model built from a config, under Prefect's test
harness and a temporary MLflow SQLite store; plus what must not happen when a stage fails."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from finetune_flows.flows.finetune import finetune
from finetune_flows.plugins import DataError, ParityError, PromotionError
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.model_source import resolve_model_source, tokenizer_hash
from tests.conftest import NEGATIVE, POSITIVE, write_tsv

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """288 train rows and 48 eval rows (disjoint texts): enough for the 256-text parity gate."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    suffixes = [
        "indeed",
        "overall",
        "really",
        "truly",
        "honestly",
        "frankly",
        "clearly",
        "simply",
        "surely",
        "plainly",
        "certainly",
        "obviously",
    ]
    train = [(f"{t} {s}", lab) for s in suffixes for t, lab in rows]
    evaluation = [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows]
    return write_tsv(tmp_path / "train.tsv", train), write_tsv(tmp_path / "dev.tsv", evaluation)


def config_for(model_dir: Path, files: tuple[Path, Path], **training: object) -> FinetuneConfig:
    overrides = {
        "model.source": str(model_dir),
        "model.max_length": 32,
        "data.train_path": str(files[0]),
        "data.eval_path": str(files[1]),
        "training.eval_every_steps": 5,
        "training.batch_size": 16,
        "training.learning_rate": 5e-3,
        **{f"training.{k}": v for k, v in training.items()},
    }
    return FinetuneConfig.for_scenario("sentiment", overrides)


def versions(name: str = "sentiment") -> list[str]:
    client = mlflow.MlflowClient()
    try:
        return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def champion(name: str = "sentiment") -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_flow_registers_exports_and_gates_promotion(state_dir, tiny_model_dir, files, tmp_path) -> None:
    first = finetune(config_for(tiny_model_dir, files, max_steps=1))
    assert (first.version, first.aliases) == ("1", ["challenger", "champion"])
    assert Path(first.onnx_path).is_file()
    assert not first.reused_ingest and not first.reused_tokens

    client = mlflow.MlflowClient()
    v1 = client.get_model_version("sentiment", "1")
    assert v1.tags["promotion.decision"] == "promoted: no champion yet"
    assert len(v1.tags["data_hash"]) == 64 and v1.tags["onnx_max_abs_diff"]
    run = client.get_run(first.run_id)
    assert run.data.metrics["final_accuracy"] == pytest.approx(first.metrics["accuracy"])
    logged = {a.path for a in client.list_artifacts(first.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/reliability_diagram.png"} <= logged

    # The export ladder judged every variant; the version serves the one it chose, never a failing one.
    ladder_file = mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="onnx_ladder/ladder.json")
    ladder = json.loads(Path(ladder_file).read_text())
    rows = {row["variant"]: row for row in ladder["rows"]}
    assert {"fp32", "fused"} <= set(rows) and any(v.startswith("int8-dynamic") for v in rows)
    assert v1.tags["export.served_variant"] == first.served_variant and rows[first.served_variant]["served"]
    assert rows[first.served_variant]["gate"] == "pass"
    served_dir = Path(mlflow.artifacts.download_artifacts("models:/sentiment/1")) / "artifacts"
    assert (served_dir / Path(first.onnx_path).name).read_bytes() == Path(first.onnx_path).read_bytes()

    model = mlflow.pyfunc.load_model("models:/sentiment@champion")
    scored = model.predict(["a gorgeous , witty film", "a dull , lifeless mess"])
    assert set(scored["label"]) <= {"negative", "positive"}
    assert (scored["prob_negative"] + scored["prob_positive"]).round(6).eq(1.0).all()

    # Same inputs again: cached data, same seed, same metric -> a challenger, not a champion.
    again = finetune(config_for(tiny_model_dir, files, max_steps=1))
    assert again.reused_ingest and again.reused_tokens
    assert again.version == "2" and again.aliases == ["challenger"]
    assert champion() == "1"
    assert client.get_model_version("sentiment", "2").tags["promotion.decision"].startswith("kept champion")

    # A properly trained model beats the one-step champion on the same eval set and takes over.
    better = finetune(config_for(tiny_model_dir, files, epochs=4))
    assert better.metrics["accuracy"] > first.metrics["accuracy"]
    assert better.version == "3" and champion() == "3"
    tags = client.get_model_version("sentiment", "3").tags
    assert tags["champion.version"] == "1"
    assert float(tags["champion.accuracy"]) == pytest.approx(first.metrics["accuracy"], abs=1e-6)

    # The champion is a warm-start source: its Hugging Face checkpoint travels inside the model.
    warm = resolve_model_source("models:/sentiment@champion", tmp_path / "warm")
    assert (warm / "config.json").is_file() and list(warm.glob("*.safetensors"))
    assert tokenizer_hash(warm) == tags["tokenizer_hash"]


GOOD = [("a fine film", "1"), ("a poor film", "0"), ("a superb film", "1")]
BAD_INPUTS = {
    "empty file": ("train", b"", r"file is empty \(file .*train\.tsv\)"),
    "header only": ("train", b"sentence\tlabel\n", r"header only \(file .*train\.tsv\)"),
    "missing column": (
        "train",
        b"sentence\tstars\na fine film\t1\n",
        r"missing column 'label'; columns found: \['sentence', 'stars'\]",
    ),
    "one class": ("train", b"sentence\tlabel\na\t1\nb\t1\n", r"only one class .*column 'label', value 'positive'"),
    "non-UTF-8 byte": ("train", b"sentence\tlabel\nfine\t1\ncaf\xe9 food\t0\n", r"not valid UTF-8 .*line 3"),
    "empty text": ("train", b"sentence\tlabel\na fine film\t1\n   \t0\n", r"empty text .*row 2, column 'sentence'"),
    "eval label train lacks": (
        "eval",
        b"text\tlabel\na fine film\tpositive\na mixed film\tneutral\n",
        r"unknown label .*dev\.tsv, row 2, column 'label', value 'neutral'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_creates_no_version(case, state_dir, tiny_model_dir, files, tmp_path) -> None:
    which, content, message = BAD_INPUTS[case]
    train, dev = write_tsv(tmp_path / "train.tsv", GOOD), files[1]
    if which == "train":
        train.write_bytes(content)
    else:
        dev = tmp_path / "dev.tsv"
        dev.write_bytes(content)
    with pytest.raises(DataError, match=message):
        finetune(config_for(tiny_model_dir, (train, dev), max_steps=1))
    assert versions() == []
    # The MLflow run the flow opened is FAILED and names the stage, not FINISHED.
    (run,) = mlflow.search_runs(experiment_names=["finetune-sentiment"], output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "ingest"


def test_failed_parity_publishes_nothing(state_dir, tiny_model_dir, files) -> None:
    finetune(config_for(tiny_model_dir, files, max_steps=1))
    strict = config_for(tiny_model_dir, files, max_steps=2).model_copy(
        update={"export": FinetuneConfig().export.model_copy(update={"tolerance": 1e-12})}
    )
    with pytest.raises(ParityError, match="nothing was published"):
        finetune(strict)
    assert versions() == ["1"] and champion() == "1"


def test_alias_failure_rolls_back_the_new_version(state_dir, tiny_model_dir, files, monkeypatch) -> None:
    finetune(config_for(tiny_model_dir, files, max_steps=1))

    def refuse(self, name, alias, version):
        raise MlflowException("registry unavailable")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(PromotionError, match="rolled back"):
        finetune(config_for(tiny_model_dir, files, epochs=4))
    monkeypatch.undo()
    assert versions() == ["1"] and champion() == "1"
