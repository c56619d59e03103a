"""Text drift on real data: how often the monitor's drift check fires without a shift, and with one.

The reference is what a finance version ships (``tasks/monitoring/drift_reference.build_reference``),
measured on the FinBERT-protocol train split of Financial PhraseBank (``Sentences_50Agree.txt``, the
scenario's split: 20% test, 20% of the rest eval, seed 42) with the all-MiniLM-L6-v2 sentence
encoder on onnxruntime, as the monitor runs it. Gold labels stand in for the model's predictions
(a perfect model), so the ``prediction`` signal measures the label shift itself.

Windows of --window texts are drawn from the held-out test split (sentences no version trained on):

  steady      the natural mix, --windows draws: the false-alarm rate of each signal
  mix <s>     a share s of the window from one topic (the scenario's taxonomy, assigned by the same
              encoder), the rest from the others: how strong a topic-mix shift must be to be seen

    .venv/bin/python bench/drift_bench.py                 # 40 windows per row, ~3 min on 2 cores
    .venv/bin/python bench/drift_bench.py --windows 10    # quicker
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets" / "financial_phrasebank" / "Sentences_50Agree.txt"
DEFAULT_OUT = REPO / "bench" / "results" / "drift_bench.json"
SCENARIO = "finance-monitoring"


def finbert_split(work: Path) -> dict[str, pd.DataFrame]:
    """train / eval / test of the finance scenario's own split."""
    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.data_preparation import ingest_options
    from finetune_flows.tasks.core.ingestion import ingest_files

    data = FinetuneConfig.for_scenario(SCENARIO).data
    result = ingest_files(SHARED, None, SCENARIOS.get(SCENARIO), ingest_options(data, SCENARIO, 42), work / "cache")
    return {s: pd.read_parquet(Path(result.dataset_dir) / f"{s}.parquet") for s in ("train", "eval", "test")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40, help="windows drawn per row (default 40)")
    parser.add_argument("--window", type=int, default=300, help="texts per window (default 300, the monitor's sample)")
    parser.add_argument("--topic", default="earnings", help="the topic whose share is raised (default earnings)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from finetune_flows.tasks.core.model_source import minilm_path
    from finetune_flows.tasks.export.model_export import export_sentence_encoder
    from finetune_flows.tasks.monitoring.drift import window_drift
    from finetune_flows.tasks.monitoring.drift_reference import build_reference
    from finetune_flows.tasks.monitoring.scoring import MonitorConfig
    from finetune_flows.tasks.serving.encoder import SentenceEncoder
    from finetune_flows.tasks.serving.topics import TopicAssigner, load_taxonomy

    work = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    started = time.perf_counter()
    splits = finbert_split(work)
    encoder = SentenceEncoder(
        export_sentence_encoder(minilm_path(), work / "encoder.onnx"), minilm_path() / "tokenizer.json"
    )
    train, evaluation, test = (splits[s] for s in ("train", "eval", "test"))
    eval_labels = evaluation["label"].astype(str).tolist()
    reference, reference_embeddings = build_reference(
        train["text"].tolist(), evaluation["text"].tolist(), eval_labels, [1.0] * len(eval_labels), encoder
    )
    texts, labels = test["text"].tolist(), test["label"].astype(str).tolist()
    embeddings = encoder.encode(texts)
    taxonomy = load_taxonomy(REPO / "plugins" / "scenarios" / "data" / "financial_phrasebank" / "topics.json")
    topics = TopicAssigner(encoder, taxonomy).assign(texts)
    inside = [i for i, t in enumerate(topics) if t == args.topic]
    outside = [i for i, t in enumerate(topics) if t != args.topic]
    natural = len(inside) / len(texts)
    setup = time.perf_counter() - started
    print(f"reference: {reference.texts} train texts ({len(reference_embeddings)} embedded); test split "
          f"{len(texts)} texts, topic {args.topic!r} {natural:.1%} of them; setup {setup:.0f} s")  # fmt: skip
    rule = MonitorConfig(source="bench").drift_rule().model_copy(update={"signals": []})  # measure only

    rows = []
    for name, share in [("steady", None), *[(f"mix {s:.0%}", s) for s in (0.3, 0.5, 0.8)]]:
        began, results = time.perf_counter(), []
        for number in range(args.windows):
            rng = random.Random(1000 * number + int(100 * (share or 0)))
            if share is None:
                pick = rng.sample(range(len(texts)), args.window)
            else:
                own = min(round(share * args.window), len(inside))
                pick = rng.sample(inside, own) + rng.sample(outside, args.window - own)
            window = 10_000 + number  # the permutation seed, as a window index would be
            chosen = ([texts[i] for i in pick], [labels[i] for i in pick], [1.0] * len(pick), embeddings[pick])
            results.append(window_drift(window, *chosen, reference, reference_embeddings, rule))
        config = MonitorConfig(source="bench")
        fired = {
            "embedding": np.mean([r.embedding_p < config.drift_alpha for r in results]),
            "prediction": np.mean([r.prediction_shift > config.drift_max_prediction_shift for r in results]),
            "vocabulary": np.mean([r.oov_increase > config.drift_max_oov_increase for r in results]),
            "length": np.mean([r.length_ks > config.drift_max_length_ks for r in results]),
        }
        rows.append({
            "windows": name, "share": share if share is not None else natural, "n": len(results),
            "fired": {k: float(v) for k, v in fired.items()},
            "median_p": float(np.median([r.embedding_p for r in results])),
            "mean_prediction_shift": float(np.mean([r.prediction_shift for r in results])),
            "mean_oov_increase": float(np.mean([r.oov_increase for r in results])),
            "seconds_per_window": (time.perf_counter() - began) / len(results),
        })  # fmt: skip
        print(f"  {name:<8} embedding fired {fired['embedding']:.0%}, median p {rows[-1]['median_p']:.4f}, "
              f"prediction shift {rows[-1]['mean_prediction_shift']:.3f}")  # fmt: skip

    print(f"\n| windows ({args.window} texts) | {args.topic} share | n | embedding fired (p < 0.002) | median p | "
          "prediction fired | mean prediction shift | vocabulary fired | length fired | s/window |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = r["fired"]
        print(f"| {r['windows']} | {r['share']:.0%} | {r['n']} | {f['embedding']:.0%} | {r['median_p']:.4f} | "
              f"{f['prediction']:.0%} | {r['mean_prediction_shift']:.3f} | {f['vocabulary']:.0%} | {f['length']:.0%} | "
              f"{r['seconds_per_window']:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": sys.argv,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "topic": args.topic,
        "natural_share": natural, "reference_texts": reference.texts, "rows": rows,
    }, indent=1), encoding="utf-8")  # fmt: skip
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
