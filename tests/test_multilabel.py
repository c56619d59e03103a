"""Head ``multi-label`` and scenario ``intents-multilabel`` (NLU++): per-label threshold fitting, the metric
arithmetic, NLU++ folds/files and labels tables read into the prepared dataset (fold protocol, ontology labels,
errors naming file/row/column/value), the one-vs-rest baseline, the served scorer's thresholds, and one
`finetune-flows run` on the bundled sample registering a version that ships its thresholds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import HEADS, SCENARIOS, ConfigError, DataError
from finetune_flows.tasks.classification.multilabel import MultiLabelEvaluator, decisions_of
from finetune_flows.tasks.classification.multilabel_baseline import tfidf_multilabel_baseline
from finetune_flows.tasks.classification.multilabel_data import MultiLabelData, check_config, prepare_multilabel_data
from finetune_flows.tasks.classification.multilabel_metrics import best_threshold, multilabel_metrics, tune_thresholds
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.evaluating import EvalRequest
from finetune_flows.tasks.core.model_source import TOKENIZER_FILES
from finetune_flows.tasks.serving.errors import ModelFilesError
from finetune_flows.tasks.serving.multilabel import read_thresholds
from tests.conftest import run_cli, services_environment

SCENARIO = "intents-multilabel"
SAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "scenarios" / "data" / "nlupp_sample"


# -- thresholds and metrics -----------------------------------------------------------------------


def test_the_threshold_maximises_the_labels_f1_between_two_probabilities() -> None:
    probs = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    truth = np.array([1, 1, 0, 1, 0, 0])
    # top-k F1 = 2 tp / (k + 3): k=1 0.5, k=2 0.8, k=3 0.667, k=4 0.857, k=5 0.75, k=6 0.667 -> cut between 0.4, 0.3
    assert best_threshold(probs, truth) == pytest.approx(0.35)


def test_equal_probabilities_stay_on_one_side_and_ties_in_f1_go_to_the_cut_nearest_one_half() -> None:
    # Cutting between the two 0.6 texts would be F1 1.0, but they cannot be told apart: 0.4 (F1 0.667) wins.
    assert best_threshold(np.array([0.6, 0.6, 0.2]), np.array([1, 0, 0])) == pytest.approx(0.4)
    # One positive ranked first and one last: k=1 (cut 0.45) and k=4 (cut 0.04) both give F1 2/3; 0.45 is nearer 0.5.
    assert best_threshold(np.array([0.8, 0.1, 0.05, 0.04]), np.array([1, 0, 0, 1])) == pytest.approx(0.45)


def test_a_label_never_positive_in_eval_keeps_one_half() -> None:
    probs = np.array([[0.9, 0.2], [0.1, 0.7], [0.3, 0.6]])
    truth = np.array([[1, 0], [0, 0], [0, 0]])
    assert tune_thresholds(probs, truth).tolist() == [pytest.approx(0.6), 0.5]


def test_micro_macro_f1_and_subset_accuracy_by_hand() -> None:
    labels = ["a", "b", "c", "d"]
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    predicted = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]])
    metrics = multilabel_metrics(truth, predicted, labels)
    # tp 3 (a, a, b), fp 2 (b in row 2, c in row 3), fn 1 (b in row 3): micro-F1 = 6 / (6 + 2 + 1)
    assert metrics["micro_f1"] == pytest.approx(6 / 9)
    assert metrics["micro_precision"] == pytest.approx(3 / 5) and metrics["micro_recall"] == pytest.approx(3 / 4)
    assert metrics["f1_a"] == 1.0 and metrics["f1_b"] == pytest.approx(0.5) and metrics["f1_c"] == 0.0
    assert "f1_d" not in metrics and metrics["support_d"] == 0.0  # neither present nor predicted: left out
    assert metrics["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert metrics["subset_accuracy"] == pytest.approx(1 / 3)
    assert metrics["hamming_loss"] == pytest.approx(3 / 12)


def test_the_head_trains_on_float_multi_hot_targets_and_predicts_by_sigmoid(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    head = HEADS.get("multi-label")
    features = head.tokenize(
        AutoTokenizer.from_pretrained(str(tiny_model_dir)),
        {"text": ["cancel my transfer", "hi"], "multi_hot": [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]},
        16,
    )
    assert features["labels"] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]] and features["truncated"] == [False, False]
    model = head.build_model(str(tiny_model_dir), {0: "cancel", 1: "greet", 2: "transfer"})
    assert model.problem_type == "multi_label_classification" and model.classifier.out_features == 3
    predicted, probs = head.predict(np.array([[1000.0, -1000.0, 0.0]]))  # no overflow at either end
    assert predicted.tolist() == [[1, 0, 1]] and probs.tolist() == [[1.0, 0.0, 0.5]]


def test_a_saved_model_warm_starts_identically_and_its_graph_passes_the_parity_gate(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoTokenizer

    from finetune_flows.tasks.export.model_export import check_head_parity, export_head

    head = HEADS.get("multi-label")
    id2label = {0: "cancel", 1: "greet", 2: "transfer"}
    torch.manual_seed(1)
    model = head.build_model(str(tiny_model_dir), id2label).eval()
    with torch.no_grad():  # a layer unlike a fresh one, so that a warm start that ignored it would differ
        model.classifier.weight.copy_(torch.randn_like(model.classifier.weight))
    saved = tmp_path / "model"
    head.save_trained(model, tiny_model_dir, saved)
    for name in TOKENIZER_FILES:  # as training does
        if (tiny_model_dir / name).is_file():
            (saved / name).write_bytes((tiny_model_dir / name).read_bytes())

    texts = ["cancel my transfer please", "hi", "hello, can you send money to Bob and block my card"]
    batch = AutoTokenizer.from_pretrained(str(saved))(texts, padding=True, return_tensors="pt")
    again = head.build_model(str(saved), id2label).eval()
    fresh = head.build_model(str(saved), {0: "greet", 1: "cancel", 2: "transfer"}).eval()  # other labels: new layer
    with torch.no_grad():
        logits = model(**batch)["logits"]
        assert torch.equal(again(**batch)["logits"], logits)
        assert not torch.allclose(fresh(**batch)["logits"], logits)
        exported = head.export_module(saved)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        loss = model(**batch, labels=targets)["loss"]
    assert torch.allclose(exported, logits, atol=1e-5)  # eager attention, same numbers
    assert float(loss) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)))

    onnx_path = export_head(saved, "multi-label", tmp_path / "model.onnx", 32, "hash")
    result = check_head_parity(onnx_path, saved, "multi-label", texts * 4, min_texts=12)
    assert result.max_abs_diff < 1e-4 and result.parity_texts == 12


# -- reading NLU++ and tables ---------------------------------------------------------------------


def nlupp_folder(root: Path, folds: int = 20, extra: dict[int, list[dict[str, object]]] | None = None) -> Path:
    """An NLU++-shaped ``root/banking`` with ``folds`` fold files of 14 examples each and an ontology beside it."""
    ontology = {"intents": {name: {"domain": [domain]} for name, domain in
                            (("greet", "general"), ("transfer", "banking"), ("card", "banking"), ("room", "hotels"))},
                "slots": {}}  # fmt: skip
    root.mkdir(parents=True)
    (root / "ontology.json").write_text(json.dumps(ontology), encoding="utf-8")
    (root / "banking").mkdir()
    for n in range(folds):
        examples: list[dict[str, object]] = [
            *({"text": f"hello there {n} {i}", "intents": ["greet"]} for i in range(4)),
            *({"text": f"send money to Bob {n} {i}", "intents": ["transfer"]} for i in range(4)),
            *({"text": f"hi, my card is lost {n} {i}", "intents": ["greet", "card"]} for i in range(4)),
            *({"text": f"ok {n} {i}"} for i in range(2)),  # no intents at all
        ]
        (root / "banking" / f"fold{n}.json").write_text(json.dumps(examples + (extra or {}).get(n, [])))
    return root / "banking"


def prepare(tmp_path: Path, **data: object) -> MultiLabelData:
    overrides = {f"data.{key}": value for key, value in data.items()}
    return prepare_multilabel_data(FinetuneConfig.for_scenario(SCENARIO, overrides), tmp_path / "cache")


def test_an_nlupp_folder_tests_on_its_last_two_folds_with_the_ontologys_labels(tmp_path: Path) -> None:
    folder = nlupp_folder(tmp_path / "nlupp")
    data = prepare(tmp_path, train_path=str(folder))
    assert data.test_folds == [18, 19] and data.test_rows == 2 * 14
    assert data.labels == ["card", "greet", "transfer"]  # banking + general; not the hotels intent
    assert data.train_rows + data.eval_rows == 18 * 14 and data.eval_rows == round(18 * 14 * 0.1)
    test = pd.read_parquet(Path(data.dataset_dir) / "test.parquet")
    assert set(test["file"].map(lambda f: Path(f).name)) == {"fold18.json", "fold19.json"}
    row = test[test["text"] == "hi, my card is lost 18 0"].iloc[0]
    assert row["labels"] == "card;greet" and list(row["label_ids"]) == [0, 1] and list(row["multi_hot"]) == [1, 1, 0]
    assert list(test[test["text"] == "ok 18 0"].iloc[0]["multi_hot"]) == [0, 0, 0]  # no intents: all zeros
    again = prepare(tmp_path, train_path=str(folder))
    assert again.cached and again.eval_hash == data.eval_hash


def test_an_intent_outside_the_domain_fails_naming_file_row_column_and_value(tmp_path: Path) -> None:
    folder = nlupp_folder(tmp_path / "nlupp", extra={3: [{"text": "a room please", "intents": ["room"]}]})
    fold = re.escape(str(folder / "fold3.json"))
    with pytest.raises(DataError, match=rf"unknown label: not among the 3 labels of the ontology .* \(file "
                       rf"{fold}, row 15, column 'intents', value 'room'\)"):  # fmt: skip
        prepare(tmp_path, train_path=str(folder))


def test_a_fold_that_is_not_a_list_of_examples_fails_naming_the_row(tmp_path: Path) -> None:
    folder = nlupp_folder(tmp_path / "nlupp", extra={0: [{"text": "", "intents": ["greet"]}]})
    with pytest.raises(DataError, match=r"empty or missing text \(file .*fold0.json, row 15, column 'text'"):
        prepare(tmp_path, train_path=str(folder))
    (folder / "fold0.json").write_text('[{"text": "hi", "intents": "greet"}]')
    with pytest.raises(DataError, match=r"intents must be a list of names \(file .*, row 1, column 'intents'"):
        prepare(tmp_path, train_path=str(folder))


def labels_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["text", "labels"]).to_csv(path, index=False)
    return path


def test_a_labels_table_reads_semicolon_separated_names_and_empty_cells(tmp_path: Path) -> None:
    rows = [(f"cancel my transfer {i}", "cancel; transfer") for i in range(20)]
    rows += [(f"thanks {i}", "") for i in range(10)] + [(f"my card {i}", "card") for i in range(10)]
    data = prepare(tmp_path, train_path=str(labels_csv(tmp_path / "train.csv", rows)), test_fraction=0.2)
    assert data.labels == ["cancel", "card", "transfer"]  # the training data's labels
    assert (data.train_rows, data.eval_rows, data.test_rows) == (29, 3, 8)  # 40 rows: 20% test, 10% of the rest eval
    frames = pd.concat(pd.read_parquet(p) for p in Path(data.dataset_dir).glob("*.parquet"))
    assert set(frames["labels"]) == {"cancel;transfer", "", "card"}


def test_the_label_map_renames_labels_before_they_are_checked(tmp_path: Path) -> None:
    rows = [(f"stop it {i}", "cancelation;Greeting") for i in range(10)] + [(f"hi {i}", "Greeting") for i in range(10)]
    train = labels_csv(tmp_path / "train.csv", rows)
    data = prepare(tmp_path, train_path=str(train), label_map="cancelation:cancel,Greeting:greet")
    assert data.labels == ["cancel", "greet"]
    with pytest.raises(DataError, match=r"invalid label name.*\(file .*, row 1, column 'labels', value 'why\?'\)"):
        prepare(tmp_path, train_path=str(train), label_map="cancelation:why?")


def test_a_label_only_the_eval_file_has_fails_naming_it(tmp_path: Path) -> None:
    train = labels_csv(tmp_path / "train.csv", [(f"my card {i}", "card") for i in range(10)])
    evaluation = labels_csv(tmp_path / "eval.csv", [("my card", "card"), ("what a mess", "card;complaint")])
    with pytest.raises(DataError, match=r"unknown label: not among the 1 labels of the training data \(file "
                       rf"{re.escape(str(evaluation))}, row 2, column 'labels', value 'complaint'\)"):  # fmt: skip
        prepare(tmp_path, train_path=str(train), eval_path=str(evaluation))


def test_a_label_name_mlflow_cannot_log_fails(tmp_path: Path) -> None:
    train = labels_csv(tmp_path / "train.csv", [("my card", "card"), ("why?", "why?;card")])
    with pytest.raises(DataError, match=r"invalid label name.*\(file .*, row 2, column 'labels', value 'why\?'\)"):
        prepare(tmp_path, train_path=str(train))


def test_single_label_training_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="class_weights=balanced"):
        check_config(FinetuneConfig.for_scenario(SCENARIO, {"training.class_weights": "balanced"}))
    with pytest.raises(ConfigError, match="label_smoothing"):
        check_config(FinetuneConfig.for_scenario(SCENARIO, {"training.label_smoothing": 0.1}))


def test_the_bundled_sample_is_attributed_and_small() -> None:
    scenario = SCENARIOS.get(SCENARIO)
    sample = scenario.sample()
    assert sample is not None and sample.train == SAMPLE / "banking"
    assert "Casanueva et al. 2022" in sample.attribution and "CC BY 4.0" in sample.attribution
    assert "Attribution 4.0 International" in (SAMPLE / "LICENSE").read_text(encoding="utf-8")
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 150_000
    assert scenario.head == "multi-label" and scenario.primary_metric == "micro_f1"


# -- the baseline and the served thresholds -------------------------------------------------------


def test_the_one_vs_rest_baseline_separates_separable_labels(tmp_path: Path) -> None:
    words = {0: "refund money", 1: "card blocked", 2: "transfer abroad"}
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 90), ("eval", 30), ("test", 30)):
        hot = (rng.random((n, 4)) < 0.4).astype(np.float32)
        hot[:, 3] = 0.0  # a label nobody has: no classifier, no warning, never predicted
        texts = [" ".join(["hello", *(words[j] for j in range(3) if row[j])]) + f" {i}" for i, row in enumerate(hot)]
        pd.DataFrame({"text": texts, "multi_hot": list(hot)}).to_parquet(folder / f"{split}.parquet")
    scores = tfidf_multilabel_baseline(folder, ["refund", "card", "transfer", "never"])
    assert scores["micro_f1"] == scores["test_micro_f1"] == scores["test_subset_accuracy"] == 1.0


def test_thresholds_of_another_label_set_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"labels": ["b", "a"], "thresholds": [0.3, 0.7]}))
    assert read_thresholds(path, ["a", "b"]).tolist() == [0.7, 0.3]  # by name, in the model's order
    with pytest.raises(ModelFilesError, match=r"thresholds for labels \['b', 'a'\], but the model predicts"):
        read_thresholds(path, ["a", "c"])


# -- one run from the command line ----------------------------------------------------------------


@pytest.mark.slow  # a full CLI run; the default suite trains, saves and parity-checks the head in process
def test_run_on_the_bundled_sample_registers_a_version_that_ships_its_thresholds(
    tiny_model_dir: Path, tmp_path: Path, prefect_harness: str
) -> None:
    state = tmp_path / "state"
    result = run_cli(
        # no --data: the bundled NLU++ sample (folds 0-2, test 3)
        services_environment(state, prefect_harness), "run", SCENARIO,
        "--set", f"model.source={tiny_model_dir}", "--set", "model.max_length=32",
        "--set", "training.learning_rate=5e-3", "--set", "training.max_steps=4", "--set", "training.eval_every_steps=2",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "version          : 1" in result.stdout

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version(SCENARIO, "1")
    assert version.tags["head"] == "multi-label" and version.tags["thresholds.labels"] == "48"
    metrics = client.get_run(version.run_id).data.metrics
    for key in ("final_micro_f1", "final_macro_f1", "final_subset_accuracy", "final_baseline_micro_f1",
                "test_micro_f1", "test_baseline_micro_f1", "final_untuned_micro_f1"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0, key
    assert version.tags["eval.micro_f1"] == f"{metrics['final_micro_f1']:.4f}"

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{SCENARIO}/1", dst_path=str(tmp_path / "served")))
        texts = ["I want to cancel my transfer, it doesn't work", "hello", "How long does a new card take?"]
        served = mlflow.pyfunc.load_model(f"models:/{SCENARIO}/1").predict(pd.DataFrame({"text": texts}))
    finally:
        mlflow.set_tracking_uri(previous)
    shipped = json.loads((folder / "artifacts" / "thresholds.json").read_text(encoding="utf-8"))
    assert shipped["tuned_on"] == "eval" and len(shipped["labels"]) == len(shipped["thresholds"]) == 48
    labels = shipped["labels"]
    assert list(served.columns) == ["labels", *(f"prob_{label}" for label in labels)]
    probs = served[[f"prob_{label}" for label in labels]].to_numpy()
    expected = probs >= np.array(shipped["thresholds"])  # the served labels are exactly those at their thresholds
    assert decisions_of(served["labels"], labels).tolist() == expected.astype(int).tolist()

    # The champion, re-scored through its served pyfunc on the same eval split, gets the run's own eval micro-F1.
    config = FinetuneConfig.for_scenario(SCENARIO, {"model.source": str(tiny_model_dir)})
    data = prepare_multilabel_data(config, state / "cache")
    assert data.labels == labels
    request = EvalRequest(
        scenario=SCENARIO, head="multi-label", model_dir="", onnx_path="", dataset_dir=data.dataset_dir,
        labels=labels, primary_metric="micro_f1", max_length=32, evaluation=config.evaluation, report_dir="",
    )  # fmt: skip
    mlflow.set_tracking_uri(uri)
    try:
        evaluator = MultiLabelEvaluator()
        assert evaluator.score_champion(f"models:/{SCENARIO}/1", request) == pytest.approx(metrics["final_micro_f1"])
        other = request.model_copy(update={"labels": list(reversed(labels))})
        assert evaluator.score_champion(f"models:/{SCENARIO}/1", other) is None
    finally:
        mlflow.set_tracking_uri(previous)
