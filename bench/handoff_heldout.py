"""Out-of-scope hand-off on Banking77 with intents held out: the registered policy against raw softmax confidence.

The pipeline does the holding out: ``finetune-flows run customer-service`` on Banking77's train file with
``data.held_out_labels=10`` leaves ten intents (chosen with the seed) out of training; their rows of the
eval split (10% of train) and of the test file (Banking77's test.csv, 3,080 rows) are set aside as
out-of-scope messages, and the ``fit-handoff`` stage chooses the threshold on eval (in scope + out of
scope) for ``evaluation.handoff_precision`` (0.95) and reports out-of-scope recall and precision on
test. This script reads the registered version back and scores the same splits with the served ONNX
graph: the registered policy (temperature-scaled), and the baseline in the same run, raw softmax
confidence (temperature 1) with its own threshold chosen on the same eval rows for the same target.
Prints a table, writes JSON and the test curve (PNG).

    .venv/bin/python bench/handoff_heldout.py                      # trains (about 10 min on 2 cores)
    .venv/bin/python bench/handoff_heldout.py --model-uri models:/banking77-heldout/1   # scores only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "datasets" / "banking77"
DEFAULT_OUT = REPO / "bench" / "results" / "handoff_heldout.json"
MODEL_NAME = "banking77-heldout"


def train(held_out: int, state: Path, seed: int) -> str:
    """Train customer-service on Banking77 with ``held_out`` intents left out; the registered model's URI."""
    command = [
        sys.executable, "-m", "finetune_flows.flows.cli.main", "run", "customer-service",
        "--data", str(BANKING77 / "train.csv"), "--set", f"data.test_path={BANKING77 / 'test.csv'}",
        "--set", f"data.held_out_labels={held_out}", "--set", f"registration.model_name={MODEL_NAME}",
        "--set", f"training.seed={seed}",
    ]  # fmt: skip
    env = {**os.environ, "FINETUNE_FLOWS_STATE_DIR": str(state), "TQDM_DISABLE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout[-2500:])
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stderr[-4000:]}")
    version = next(line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("version"))
    return f"models:/{MODEL_NAME}/{version}"


def operating_point(confidence: np.ndarray, correct: np.ndarray, oos: np.ndarray, threshold: float) -> dict[str, Any]:
    """What the hand-off does on a split at ``threshold`` (``correct`` is False for out-of-scope messages)."""
    from finetune_flows.tasks.classification.handoff import answered_precision, out_of_scope_rates

    coverage, precision = answered_precision(confidence, correct, threshold)
    recall, oos_precision = out_of_scope_rates(confidence, oos, threshold)
    in_scope_coverage, in_scope_precision = answered_precision(confidence[~oos], correct[~oos], threshold)
    return {"threshold": threshold, "coverage": coverage, "accuracy_of_answered": precision,
            "oos_recall": recall, "oos_precision": oos_precision, "in_scope_coverage": in_scope_coverage,
            "in_scope_accuracy_of_answered": in_scope_precision}  # fmt: skip


def scored(scorer: Any, dataset: Path, split: str, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, out of scope) of a split's in-scope rows followed by its out-of-scope ones."""
    import pandas as pd

    from finetune_flows.tasks.classification.handoff import softmax

    inside = pd.read_parquet(dataset / f"{split}.parquet")
    outside = pd.read_parquet(dataset / "out_of_scope.parquet").query("split == @split")
    probs = softmax(scorer.logits(inside["text"].tolist() + outside["text"].tolist()), temperature)
    predicted = np.array(scorer.labels)[probs.argmax(-1)]
    truth = np.concatenate([inside["label"].to_numpy(), np.full(len(outside), "")])
    oos = np.arange(len(truth)) >= len(inside)
    return probs.max(-1), (predicted == truth) & ~oos, oos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="score this version instead of training one")
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "handoff_heldout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import mlflow

    from finetune_flows.tasks.classification.handoff import answer_curve, choose_threshold, plot_curve
    from finetune_flows.tasks.serving.classifier import OnnxTextClassifier

    state = args.work / "state"
    uri = args.model_uri or train(args.held_out, state, args.seed)
    mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(args.work / "served")))
    policy = json.loads((folder / "artifacts" / "handoff.json").read_text(encoding="utf-8"))
    onnx = next((folder / "artifacts").glob("*.onnx"))
    scorer = OnnxTextClassifier(onnx, next((folder / "artifacts").glob("tokenizer*.json")))
    version = mlflow.MlflowClient().get_model_version(*uri.removeprefix("models:/").split("/"))
    run = mlflow.MlflowClient().get_run(version.run_id).data
    ingested = sorted(state.glob("cache/ingest/*/out_of_scope.parquet"), key=lambda p: p.stat().st_mtime)
    dataset = ingested[-1].parent  # the run's own splits (the newest ingest with out-of-scope rows)

    rows = {}
    temperature_scaled = float(policy["temperature"])
    arms = (
        ("temperature-scaled (registered)", temperature_scaled, False),
        ("raw softmax", 1.0, False),
        ("temperature-scaled, threshold from in-scope eval only", temperature_scaled, True),
    )
    for name, temperature, in_scope_only in arms:
        confidence, correct, oos = scored(scorer, dataset, "eval", temperature)
        keep = ~oos if in_scope_only else np.ones_like(oos)
        threshold = choose_threshold(confidence[keep], correct[keep], policy["target_precision"])
        confidence, correct, oos = scored(scorer, dataset, "test", temperature)
        rows[name] = {**operating_point(confidence, correct, oos, threshold), "temperature": temperature,
                      "in_scope_accuracy": float(correct[~oos].mean())}  # fmt: skip
        if name == arms[0][0]:
            curve = answer_curve(confidence, correct)[1:]
            plot_curve({"test, held-out intents as out-of-scope": curve}, _policy(policy, threshold),
                       args.out.with_suffix(".png"))  # fmt: skip

    held = run.tags.get("data.held_out_labels", "") or ", ".join(
        json.loads((dataset / "meta.json").read_text(encoding="utf-8"))["held_out_labels"]
    )
    sys.stdout.write(f"\nheld out ({args.held_out}): {held}; test: {int((~oos).sum())} in scope, {int(oos.sum())} "
                     f"out of scope; model {uri}\n")  # fmt: skip
    sys.stdout.write("pipeline's own figures (run metrics): " + ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(run.metrics.items()) if k.startswith("handoff_test")) + "\n\n")  # fmt: skip
    keys = ("threshold", "coverage", "accuracy_of_answered", "oos_recall", "oos_precision", "in_scope_accuracy")
    sys.stdout.write(f"| confidence | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}\n")
    for name, row in rows.items():
        sys.stdout.write(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_uri": uri, "held_out": held, "target_precision": policy["target_precision"],
                                    "rows": rows}, indent=2), encoding="utf-8")  # fmt: skip
    sys.stdout.write(f"\nwrote {args.out} and {args.out.with_suffix('.png')}\n")


def _policy(policy: dict[str, Any], threshold: float) -> Any:
    from finetune_flows.tasks.classification.handoff import HandoffPolicy

    return HandoffPolicy(temperature=policy["temperature"], threshold=threshold,
                         target_precision=policy["target_precision"])  # fmt: skip


if __name__ == "__main__":
    main()
