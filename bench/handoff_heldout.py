"""Out-of-scope hand-off on Banking77 with intents held out: the registered policy against raw softmax confidence.

Ten intents (seeded) are left out of training and eval; their 1-in-8 share of Banking77's test set
stands in for out-of-scope messages. The script trains ``customer-service`` on the other 67 intents
with ``finetune-flows run`` (so the ``fit-handoff`` stage chooses the threshold on the in-scope eval
split for ``evaluation.handoff_precision``, 0.95) and scores the whole test set (3,080) with the
registered pyfunc (ONNX): in-scope accuracy, coverage, accuracy of the answered messages (an
out-of-scope message answered with an intent counts as wrong), out-of-scope recall and precision of
the hand-off. The baseline, in the same run: raw softmax confidence (temperature 1) with its own
threshold chosen on the same eval split for the same target. Prints a table, writes JSON and the
curve (PNG).

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


def held_out_intents(intents: list[str], count: int, seed: int) -> list[str]:
    """``count`` intents chosen with ``seed`` (sorted)."""
    return sorted(np.random.default_rng(seed).choice(sorted(intents), size=count, replace=False).tolist())


def train(work: Path, held: list[str], state: Path, seed: int) -> str:
    """Train customer-service without the held-out intents; the registered model's URI."""
    import pandas as pd

    train_rows, test_rows = pd.read_csv(BANKING77 / "train.csv"), pd.read_csv(BANKING77 / "test.csv")
    in_train = train_rows[~train_rows["category"].isin(held)]
    in_test = test_rows[~test_rows["category"].isin(held)]
    work.mkdir(parents=True, exist_ok=True)
    in_train.to_csv(work / "train_in_scope.csv", index=False)
    in_test.to_csv(work / "test_in_scope.csv", index=False)
    command = [
        sys.executable, "-m", "finetune_flows.flows.cli.main", "run", "customer-service",
        "--data", str(work / "train_in_scope.csv"), "--set", f"data.test_path={work / 'test_in_scope.csv'}",
        "--set", f"registration.model_name={MODEL_NAME}", "--set", f"training.seed={seed}",
    ]  # fmt: skip
    env = {**os.environ, "FINETUNE_FLOWS_STATE_DIR": str(state), "TQDM_DISABLE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout[-2500:])
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stderr[-4000:]}")
    version = next(line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("version"))
    return f"models:/{MODEL_NAME}/{version}"


def operating_point(confidence: np.ndarray, correct: np.ndarray, oos: np.ndarray, threshold: float) -> dict[str, Any]:
    """What the hand-off does on the test set at ``threshold``."""
    from finetune_flows.tasks.classification.handoff import answered_precision, out_of_scope_rates

    coverage, precision = answered_precision(confidence, correct & ~oos, threshold)
    recall, oos_precision = out_of_scope_rates(confidence, oos, threshold)
    in_scope_coverage, in_scope_precision = answered_precision(confidence[~oos], correct[~oos], threshold)
    return {"threshold": threshold, "coverage": coverage, "accuracy_of_answered": precision,
            "oos_recall": recall, "oos_precision": oos_precision, "in_scope_coverage": in_scope_coverage,
            "in_scope_accuracy_of_answered": in_scope_precision}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="score this version instead of training one (trained on the same split)")
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "handoff_heldout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from finetune_flows.plugins.scenarios.customer_service import intent_name
    from finetune_flows.tasks.classification.handoff import answer_curve, choose_threshold, plot_curve, softmax
    from finetune_flows.tasks.serving.classifier import OnnxTextClassifier

    state = args.work / "state"
    held = held_out_intents(json.loads((BANKING77 / "categories.json").read_text(encoding="utf-8")), args.held_out,
                            args.seed)  # fmt: skip
    uri = args.model_uri or train(args.work, held, state, args.seed)
    mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(args.work / "served")))
    policy = json.loads((folder / "artifacts" / "handoff.json").read_text(encoding="utf-8"))
    onnx = next((folder / "artifacts").glob("*.onnx"))
    scorer = OnnxTextClassifier(onnx, next((folder / "artifacts").glob("tokenizer*.json")))

    version = mlflow.MlflowClient().get_model_version(*uri.removeprefix("models:/").split("/"))
    run_dir = Path(mlflow.MlflowClient().get_run(version.run_id).data.tags["run_dir"])
    ingested = sorted(run_dir.parents[1].glob("cache/ingest/*/eval.parquet"), key=lambda p: p.stat().st_mtime)
    eval_frame = pd.read_parquet(ingested[-1])  # the run's own eval split (the newest ingest of this state folder)
    test = pd.read_csv(BANKING77 / "test.csv")
    oos = test["category"].isin(held).to_numpy()
    truth = np.array([intent_name(c) for c in test["category"]])

    rows = {}
    for name, temperature in (("temperature-scaled (registered)", float(policy["temperature"])), ("raw softmax", 1.0)):
        eval_logits = scorer.logits(eval_frame["text"].tolist())
        eval_probs = softmax(eval_logits, temperature)
        eval_correct = np.array(scorer.labels)[eval_probs.argmax(-1)] == eval_frame["label"].to_numpy()
        threshold = choose_threshold(eval_probs.max(-1), eval_correct, policy["target_precision"])
        probs = softmax(scorer.logits(test["text"].tolist()), temperature)
        predicted = np.array(scorer.labels)[probs.argmax(-1)]
        confidence, correct = probs.max(-1), predicted == truth
        rows[name] = {**operating_point(confidence, correct, oos, threshold), "temperature": temperature,
                      "in_scope_accuracy": float(correct[~oos].mean())}  # fmt: skip
        if temperature != 1.0:
            curve = answer_curve(confidence, correct & ~oos)[1:]
            plot_curve({"test, held-out intents as out-of-scope": curve}, _policy(policy, threshold),
                       args.out.with_suffix(".png"))  # fmt: skip

    sys.stdout.write(f"\nheld out ({len(held)}): {', '.join(held)}; test: {int((~oos).sum())} in scope, "
                     f"{int(oos.sum())} out of scope; model {uri}\n\n")  # fmt: skip
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
