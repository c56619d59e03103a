"""Hand a message to a person when the intent classifier is unsure: temperature scaling and a confidence threshold.

``fit_handoff`` is a ``BEFORE_REGISTER`` stage for intent scenarios (``customer-service``). On the eval
split it scores the exported ONNX graph, fits one temperature ``T`` that minimises the negative
log-likelihood of softmax(logits / T) (Guo et al. 2017: calibrated confidence, same ranking), and
chooses the lowest confidence threshold at which the messages the model still answers are answered
correctly at ``evaluation.handoff_precision`` (default 0.95): below it the served model answers
``handoff`` instead of an intent. The policy (``handoff.json``: temperature, threshold) ships with the
model; the run gets the coverage/accuracy curve (a PNG in MLflow, a table in Prefect) on eval and test.

Out-of-scope messages are wrong whatever intent they get. Where ingest set some aside
(``out_of_scope.parquet``: ``data.out_of_scope_label`` rows, or the eval and test rows of the
``data.held_out_labels`` left out of training; ``tasks.core.out_of_scope``), they join each split as
messages answered wrongly: the curve and the accuracy of the answered count them, and
``out_of_scope_rates`` gives the out-of-scope recall and precision of the hand-off. With
``evaluation.handoff_out_of_scope_recall`` set, the threshold is instead the lowest that hands off that
share of the eval split's out-of-scope messages. bench/handoff_heldout.py runs it on Banking77.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins.heads import softmax as heads_softmax
from finetune_flows.tasks.core.out_of_scope import OUT_OF_SCOPE_FILE
from finetune_flows.tasks.core.stages import StageContext, StageOutput
from finetune_flows.tasks.serving.classifier import HANDOFF_ARTIFACT, OnnxTextClassifier

logger = logging.getLogger(__name__)


class HandoffPolicy(BaseModel):
    """What the served model applies: probabilities = softmax(logits / temperature); below ``threshold``, hand off."""

    model_config = ConfigDict(frozen=True)

    temperature: float
    threshold: float
    target_precision: float
    label: str = "handoff"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (the heads' ``softmax``)."""
    return np.asarray(heads_softmax(logits.astype(np.float64) / temperature))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the mean negative log-likelihood of ``labels``."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.log(softmax(logits, float(np.exp(log_t)))[rows, labels] + 1e-12).mean())

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def answer_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, coverage, precision): answering the messages whose confidence is at least each threshold, the
    share answered and the share of those answered correctly; thresholds from the highest confidence down."""
    order = np.argsort(-confidence, kind="stable")
    answered = np.arange(1, len(order) + 1)
    precision = np.cumsum(correct[order]) / answered
    return confidence[order], answered / len(order), precision


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold whose answered messages are correct at ``target`` or better (answer the most); above
    every confidence (hand off everything) when no threshold reaches it."""
    thresholds, _, precision = answer_curve(confidence, correct)
    reaching = np.flatnonzero(precision >= target)
    return float(thresholds[reaching[-1]]) if len(reaching) else float(np.nextafter(confidence.max(), np.inf))


def recall_threshold(out_of_scope_confidence: np.ndarray, recall: float) -> float:
    """The lowest threshold that hands off at least ``recall`` of the out-of-scope messages (confidence below it)."""
    needed = int(np.ceil(recall * len(out_of_scope_confidence)))
    return float(np.nextafter(np.sort(out_of_scope_confidence)[needed - 1], np.inf)) if needed else 0.0


def answered_precision(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, precision) at ``threshold``: the share answered, and the share of those answered correctly."""
    answered = confidence >= threshold
    coverage = float(answered.mean())
    return coverage, float(correct[answered].mean()) if answered.any() else 1.0


def out_of_scope_rates(confidence: np.ndarray, out_of_scope: np.ndarray, threshold: float) -> tuple[float, float]:
    """(recall, precision) of the hand-off for out-of-scope messages: the share of them handed off, and the share
    of the handed-off messages that were out of scope."""
    handed = confidence < threshold
    recall = float(handed[out_of_scope].mean()) if out_of_scope.any() else 0.0
    precision = float(out_of_scope[handed].mean()) if handed.any() else 0.0
    return recall, precision


def out_of_scope_confidence(
    scorer: OnnxTextClassifier, path: Path, temperature: float, splits: list[str]
) -> dict[str, np.ndarray]:
    """Calibrated confidence of the out-of-scope messages ingest set aside, per split; none when it set none aside."""
    import pandas as pd

    if not path.is_file():
        return {}
    rows = pd.read_parquet(path)
    found = {}
    for split in splits:
        texts = rows.loc[rows["split"] == split, "text"].tolist()
        if texts:
            found[split] = softmax(scorer.logits(texts), temperature).max(axis=-1)
    return found


def plot_curve(curves: dict[str, tuple[np.ndarray, np.ndarray]], policy: HandoffPolicy, path: Path) -> Path:
    """Accuracy of the answered messages against coverage, one line per split, the chosen operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.0))
    for split, (coverage, precision) in curves.items():
        axes.plot(coverage, precision, label=split)
    axes.axhline(policy.target_precision, color="grey", linestyle=":", label=f"target {policy.target_precision:g}")
    axes.set(xlabel="coverage (share answered, not handed off)", ylabel="accuracy of the answered", ylim=(0.5, 1.005))
    axes.set_title(f"hand-off below confidence {policy.threshold:.3f} (T = {policy.temperature:.2f})")
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def fit_handoff(context: StageContext) -> StageOutput:
    """Fit the temperature and the hand-off threshold on eval, report the curve on eval and test, ship the policy."""
    import mlflow
    import pandas as pd
    from prefect.artifacts import create_markdown_artifact

    if context.data is None or context.onnx_path is None or context.model_dir is None:
        raise ValueError("fit_handoff runs after export and evaluation")
    scorer = OnnxTextClassifier(context.onnx_path, Path(context.model_dir) / "tokenizer.json")
    dataset = Path(context.data.dataset_dir)
    splits = {
        s: pd.read_parquet(dataset / f"{s}.parquet") for s in ("eval", "test") if (dataset / f"{s}.parquet").is_file()
    }
    scored = {s: (scorer.logits(f["text"].tolist()), f["label_id"].to_numpy()) for s, f in splits.items() if len(f)}
    logits, labels = scored["eval"]
    temperature = fit_temperature(logits, labels)  # in-scope messages only: they have a right answer
    target = context.config.evaluation.handoff_precision
    confidence = {s: softmax(x, temperature).max(axis=-1) for s, (x, _) in scored.items()}
    correct = {s: softmax(x, temperature).argmax(axis=-1) == y for s, (x, y) in scored.items()}
    outside = out_of_scope_confidence(scorer, dataset / OUT_OF_SCOPE_FILE, temperature, list(scored))
    for split, found in outside.items():  # out of scope: answered wrongly whatever the intent
        confidence[split] = np.concatenate([confidence[split], found])
        correct[split] = np.concatenate([correct[split], np.zeros(len(found), dtype=bool)])
    recall_target = context.config.evaluation.handoff_out_of_scope_recall
    if recall_target is not None and len(outside.get("eval", [])):
        threshold = recall_threshold(outside["eval"], recall_target)
        chosen_for = f"{recall_target:g} out-of-scope recall"
    else:
        if recall_target is not None:
            logger.warning("hand-off: no out-of-scope eval messages; threshold chosen for %g accuracy", target)
        threshold = choose_threshold(confidence["eval"], correct["eval"], target)
        chosen_for = f"{target:g} accuracy of the answered"
    policy = HandoffPolicy(temperature=temperature, threshold=threshold, target_precision=target)

    folder = Path(context.run.run_dir) / "handoff"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handoff.json").write_text(policy.model_dump_json(indent=2), encoding="utf-8")
    metrics = {"handoff_temperature": temperature, "handoff_threshold": policy.threshold}
    rows = []
    for split in scored:
        coverage, precision = answered_precision(confidence[split], correct[split], policy.threshold)
        metrics.update({f"handoff_{split}_coverage": coverage, f"handoff_{split}_precision": precision})
        recall, oos_precision, n_out = float("nan"), float("nan"), len(outside.get(split, []))
        if n_out:
            is_out = np.arange(len(correct[split])) >= len(correct[split]) - n_out
            recall, oos_precision = out_of_scope_rates(confidence[split], is_out, policy.threshold)
            metrics.update({f"handoff_{split}_oos_recall": recall, f"handoff_{split}_oos_precision": oos_precision})
        in_scope = correct[split][: len(correct[split]) - n_out].mean()
        rows.append(
            f"| {split} | {len(correct[split]) - n_out} + {n_out} | {in_scope:.4f} | {coverage:.4f} | {precision:.4f} "
            f"| {recall:.4f} | {oos_precision:.4f} |"
        )
    curves = {s: answer_curve(confidence[s], correct[s])[1:] for s in scored}
    png = plot_curve(curves, policy, folder / "coverage_accuracy.png")
    report = folder / "handoff.md"
    report.write_text(
        f"## Hand-off below calibrated confidence {policy.threshold:.4f} (temperature {temperature:.3f}, chosen "
        f"on eval for {chosen_for})\n\n"
        "| split | messages (in scope + out of scope) | in-scope accuracy | coverage | accuracy of the answered "
        "| out-of-scope recall | out-of-scope precision |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n",
        encoding="utf-8",
    )
    mlflow.set_tracking_uri(context.run.tracking_uri())
    with mlflow.start_run(run_id=context.run.run_id):
        mlflow.log_artifact(str(png), artifact_path="handoff")
        mlflow.log_text(json.dumps(policy.model_dump(), indent=2), "handoff/handoff.json")
    create_markdown_artifact(
        key=f"{context.config.scenario}-handoff", markdown=report.read_text(encoding="utf-8"),
        description="Hand-off threshold, coverage and accuracy of the answered messages",
    )  # fmt: skip
    logger.info("hand-off: temperature %.3f, threshold %.4f; %s", temperature, policy.threshold, metrics)
    return StageOutput(
        metrics=metrics,
        tags={"handoff.threshold": f"{policy.threshold:.6f}", "handoff.temperature": f"{temperature:.6f}"},
        served_artifacts={HANDOFF_ARTIFACT: str(folder / "handoff.json")},
        report=str(report),
    )
