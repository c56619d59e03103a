"""Where a finance-monitoring model errs: test accuracy by how far Financial PhraseBank's annotators agreed.

The FinBERT-protocol test split (969 sentences of ``Sentences_50Agree.txt``, the flow's own split)
is scored with a registered version (its pyfunc: ONNX on onnxruntime) and each sentence is put
in the highest agreement file that holds it: all annotators, >= 75 %, >= 66 %, or only >= 50 %.
The other agreement files are not bundled; they are read from ``--phrasebank`` (the shared
datasets folder). Prints a table and writes JSON.

    .venv/bin/python bench/finance_agreement.py --model-uri models:/finance-monitoring@champion
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # monitor_bench next to this file (finetune_flows: the install)

from monitor_bench import test_split  # noqa: E402

LEVELS = (("all agreed", "AllAgree"), (">= 75%", "75Agree"), (">= 66%", "66Agree"), ("50-65%", "50Agree"))
DEFAULT_OUT = REPO / "bench" / "results" / "finance_agreement.json"


def sentences(path: Path) -> set[str]:
    """The sentences of one PhraseBank file (``sentence@label`` per line, UTF-8 like the bundled copy)."""
    return {line.rpartition("@")[0].strip() for line in path.read_text(encoding="utf-8").splitlines() if line}


def level_of(text: str, files: dict[str, set[str]]) -> str:
    """The name of the highest agreement level whose file holds ``text``."""
    return next(name for name, key in LEVELS if key == "50Agree" or text.strip() in files[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="models:/finance-monitoring@champion")
    parser.add_argument("--phrasebank", type=Path, default=REPO.parent / "shared" / "datasets" / "financial_phrasebank")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from finetune_flows.tasks.core.settings import get_settings

    files = {key: sentences(args.phrasebank / f"Sentences_{key}.txt") for _, key in LEVELS if key != "50Agree"}
    texts, gold = test_split(args.seed)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or get_settings().tracking_uri)
    predicted = mlflow.pyfunc.load_model(args.model_uri).predict(pd.DataFrame({"text": texts}))["label"].tolist()
    frame = pd.DataFrame(
        {"level": [level_of(t, files) for t in texts], "right": [p == g for p, g in zip(predicted, gold, strict=True)]}
    )

    rows = [
        {
            "agreement": name,
            "sentences": int((frame["level"] == name).sum()),
            "accuracy": float(frame.loc[frame["level"] == name, "right"].mean()),
        }
        for name, _ in LEVELS
    ]
    rows.append({"agreement": "all test", "sentences": len(frame), "accuracy": float(frame["right"].mean())})
    print(f"{args.model_uri}: test accuracy by annotator agreement (FinBERT split, seed {args.seed})")
    print(f"{'agreement':<12}{'sentences':>10}{'accuracy':>10}")
    for row in rows:
        print(f"{row['agreement']:<12}{row['sentences']:>10}{row['accuracy']:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model_uri": args.model_uri, "seed": args.seed, "rows": rows}, indent=2), encoding="utf-8"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
