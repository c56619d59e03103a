"""How well does embedding similarity assign topics? Measured on the hand-labelled PhraseBank sample.

Loads the taxonomy and the labelled sample (``docs/topic_labelling.md`` says how it was drawn and
labelled), exports all-MiniLM-L6-v2 to ONNX in a temporary folder (or reuses ``--encoder``) and
checks it against PyTorch, then scores every sentence with ``tasks.serving.topics.TopicAssigner``.

Choosing on the sample inflates figures measured on it, so choices are made on the first half
(rows 0-79, the "tune" part) only: for each scoring rule (mean of the top-k reference
similarities, k in ``--top-k``) the threshold that maximises tune macro-F1 (the middle of the
best plateau of a 0.01 grid), then the rule with the best tune macro-F1 (ties: smaller k). The
held-out second half is the honest figure; the whole sample is reported too. Figures at the
threshold and rule shipped in the taxonomy file / ``TopicAssigner`` default are the headline.

    .venv/bin/python bench/topic_eval.py                      # export, check, evaluate (~1 min)
    .venv/bin/python bench/topic_eval.py --encoder model.onnx # reuse an exported encoder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from finetune_flows.tasks.monitoring.taxonomy import DEFAULT_TAXONOMY, load_taxonomy  # noqa: E402
from finetune_flows.tasks.serving.topics import (  # noqa: E402  (after the sys.path line: runs as a script from anywhere)
    DEFAULT_TOP_K,
    SentenceEncoder,
    Taxonomy,
    TopicAssigner,
    pick_topics,
)

SAMPLE = DEFAULT_TAXONOMY.parent / "topic_sample.csv"
SAMPLE_SEED, SAMPLE_SIZE = 42, 160
GRID = np.round(np.arange(0.0, 0.801, 0.01), 2)
SWEEP = np.round(np.arange(0.10, 0.601, 0.05), 2)


def draw_sample(seed: int = SAMPLE_SEED, size: int = SAMPLE_SIZE) -> pd.DataFrame:
    """The sample's rows of the FinBERT-protocol test split, drawn as docs/topic_labelling.md says."""
    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files

    cfg = FinetuneConfig.for_scenario("finance-monitoring")
    scenario = SCENARIOS.get("finance-monitoring")
    options = IngestOptions(
        eval_fraction=cfg.data.eval_fraction, test_fraction=cfg.data.test_fraction, seed=cfg.training.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest_files(scenario.sample().train, None, scenario, options, Path(tmp) / "cache")
        test = pd.read_parquet(Path(result.dataset_dir) / "test.parquet")
    positions = np.random.default_rng(seed).permutation(len(test))[:size]
    return test.iloc[positions].reset_index(drop=True)


def scores_table(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-label precision/recall/F1/support.

    Macro-F1 averages the labels that occur in ``gold`` or ``pred`` (a label absent from both has
    no defined F1 on this part of the sample).
    """
    per: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        n_pred, n_gold = pred.count(label), gold.count(label)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold, "predicted": n_pred}
    present = [label for label in labels if per[label]["support"] or per[label]["predicted"]]
    return {
        "n": len(gold),
        "accuracy": float(np.mean([g == p for g, p in zip(gold, pred, strict=True)])) if gold else 0.0,
        "macro_f1": float(np.mean([per[label]["f1"] for label in present])) if present else 0.0,
        "macro_f1_labels": present,
        "per_label": per,
    }


def bootstrap(gold: list[str], pred: list[str], labels: list[str], rounds: int = 1000, seed: int = 0) -> dict:
    """95 % percentile intervals of accuracy and macro-F1 over resamples of the sentences (seeded)."""
    rng = np.random.default_rng(seed)
    acc, f1 = [], []
    for _ in range(rounds):
        idx = rng.integers(0, len(gold), len(gold))
        s = scores_table([gold[i] for i in idx], [pred[i] for i in idx], labels)
        acc.append(s["accuracy"])
        f1.append(s["macro_f1"])
    return {
        "accuracy_95": [float(np.percentile(acc, 2.5)), float(np.percentile(acc, 97.5))],
        "macro_f1_95": [float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))],
    }


def confusion(gold: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(gold, pred, strict=True):
        matrix[index[g], index[p]] += 1
    return matrix.tolist()


def confusion_text(matrix: list[list[int]], labels: list[str]) -> str:
    short = [label[:8] for label in labels]
    width = max(len(label) for label in labels)
    corner = "gold / predicted"
    width = max(width, len(corner))
    lines = [f"{corner:>{width}} " + " ".join(f"{s:>8}" for s in short)]
    lines += [
        f"{label:>{width}} " + " ".join(f"{n:>8}" for n in row) for label, row in zip(labels, matrix, strict=True)
    ]
    return "\n".join(lines)


def choose_threshold(sims: np.ndarray, gold: list[str], taxonomy: Taxonomy, labels: list[str]) -> tuple[float, float]:
    """The middle of the thresholds of ``GRID`` with the best macro-F1, and that macro-F1."""
    f1s = np.array([scores_table(gold, pick_topics(sims, taxonomy, t)[0], labels)["macro_f1"] for t in GRID])
    best = np.flatnonzero(f1s == f1s.max())
    return float(GRID[best[len(best) // 2]]), float(f1s.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taxonomy", type=Path, default=DEFAULT_TAXONOMY, help="taxonomy JSON")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="labelled CSV with columns sentence,topic")
    parser.add_argument("--encoder", type=Path, default=None, help="an exported encoder ONNX file to reuse")
    parser.add_argument("--top-k", default="1,2,3", help="scoring rules to compare: mean of the top-k similarities")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--no-draw", action="store_true", help="skip re-drawing the sample to check the CSV")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/topic_eval.json", help="JSON output")
    args = parser.parse_args()

    # 1. Taxonomy and sample; every labelled topic must exist in the taxonomy.
    taxonomy = load_taxonomy(args.taxonomy)
    labels = [*taxonomy.names, taxonomy.other]
    sample = pd.read_csv(args.sample, encoding="utf-8")
    unknown = sorted(set(sample["topic"]) - set(labels))
    if unknown:
        raise SystemExit(f"{args.sample}: topics {unknown} are not in {args.taxonomy} ({labels})")
    texts, gold = sample["sentence"].tolist(), sample["topic"].tolist()
    half = len(texts) // 2
    parts = {"tune": slice(0, half), "held_out": slice(half, None), "whole": slice(None)}

    # 2. The sample is the seeded draw the labelling guide describes (and gives the sentiment labels).
    sentiment = None
    if not args.no_draw:
        drawn = draw_sample(size=len(texts))
        if drawn["text"].tolist() != texts:
            raise SystemExit(f"{args.sample} is not the seeded draw of docs/topic_labelling.md")
        sentiment = drawn["label"].tolist()

    # 3. The encoder: exported here and checked against PyTorch, unless one is given.
    from finetune_flows.tasks.core.model_source import minilm_path

    model_dir = minilm_path()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, parity = args.encoder, None
        if onnx_path is None:
            from finetune_flows.tasks.export.model_export import check_head_parity, export_sentence_encoder

            onnx_path = export_sentence_encoder(model_dir, Path(tmp) / "minilm.onnx")
            parity = check_head_parity(onnx_path, model_dir, "bi-encoder", texts, min_texts=1).max_abs_diff
        encoder = SentenceEncoder(onnx_path, model_dir / "tokenizer.json", threads=args.threads)

        # 4. Similarity matrices per scoring rule (the references are embedded once per assigner).
        rules = [int(k) for k in args.top_k.split(",")]
        shipped_k = DEFAULT_TOP_K
        rules = sorted(set(rules) | {shipped_k})
        sims, seconds = {}, 0.0
        for k in rules:
            assigner = TopicAssigner(encoder, taxonomy, top_k=k)
            start = time.perf_counter()
            sims[k] = assigner.similarities(texts)
            if k == shipped_k:
                seconds = time.perf_counter() - start

    # 5. Choices on the tune half only; reports on the held-out half and the whole sample.
    tune_gold = gold[parts["tune"]]
    selection = {}
    for k in rules:
        threshold, tune_f1 = choose_threshold(sims[k][parts["tune"]], tune_gold, taxonomy, labels)
        selection[k] = {"threshold": threshold, "tune_macro_f1": tune_f1}
    chosen_k = max(rules, key=lambda k: (selection[k]["tune_macro_f1"], -k))
    chosen = {"top_k": chosen_k, "threshold": selection[chosen_k]["threshold"]}

    def evaluate(k: int, threshold: float) -> dict:
        pred = pick_topics(sims[k], taxonomy, threshold)[0]
        return {name: scores_table(gold[part], pred[part], labels) for name, part in parts.items()}

    shipped = {"top_k": shipped_k, "threshold": taxonomy.threshold}
    pred = pick_topics(sims[shipped_k], taxonomy)[0]
    results = {
        "shipped": shipped | {"scores": evaluate(shipped_k, taxonomy.threshold)},
        "selected_on_tune_half": chosen | {"per_rule": selection, "scores": evaluate(chosen_k, chosen["threshold"])},
        "per_rule_at_own_tuned_threshold": {
            k: {part: s["macro_f1"] for part, s in evaluate(k, selection[k]["threshold"]).items()} for k in rules
        },
        "sweep": [
            {"threshold": float(t)}
            | {part: {m: s[m] for m in ("accuracy", "macro_f1")} for part, s in evaluate(shipped_k, t).items()}
            for t in SWEEP
        ],
        "shipped_bootstrap": {
            name: bootstrap(gold[part], pred[part], labels) for name, part in parts.items() if name != "tune"
        },
        "confusion_labels": labels,
        "confusion_whole": confusion(gold, pred, labels),
        "confusion_held_out": confusion(gold[parts["held_out"]], pred[parts["held_out"]], labels),
        "majority_baseline_accuracy": {
            name: float(np.mean([g == taxonomy.other for g in gold[part]])) for name, part in parts.items()
        },
        "gold_counts": pd.Series(gold).value_counts().to_dict(),
        "predicted_counts": pd.Series(pred).value_counts().to_dict(),
        "encoder": {"onnx": str(args.encoder or "exported to a temporary folder"), "parity_max_abs_diff": parity},
        "texts_per_second": len(texts) / seconds if seconds else None,
        "sample": {"file": str(args.sample), "rows": len(texts), "tune_rows": half, "seed": SAMPLE_SEED},
    }
    table = None
    if sentiment is not None:
        table = pd.crosstab(pd.Series(gold, name="topic"), pd.Series(sentiment, name="sentiment"))
        results["gold_topic_by_sentiment"] = table.to_dict(orient="index")

    # 6. Print and save.
    print(f"sample: {len(texts)} sentences ({half} tune / {len(texts) - half} held out), labels {labels}")
    if parity is not None:
        print(f"encoder parity vs PyTorch: max |diff| {parity:.2g}")
    print(f"\nshipped rule: top_k={shipped_k}, threshold={taxonomy.threshold}")
    for name in parts:
        s = results["shipped"]["scores"][name]
        base = results["majority_baseline_accuracy"][name]
        ci = results["shipped_bootstrap"].get(name)
        spread = ""
        if ci:
            (a0, a1), (f0, f1) = ci["accuracy_95"], ci["macro_f1_95"]
            spread = f"   [95 % bootstrap: accuracy {a0:.2f}-{a1:.2f}, macro-F1 {f0:.2f}-{f1:.2f}]"
        print(
            f"  {name:>8}: n={s['n']:>3} accuracy {s['accuracy']:.3f} (all-'other' {base:.3f}), "
            f"macro-F1 {s['macro_f1']:.3f}{spread}"
        )
    print(f"\nselected on the tune half: top_k={chosen_k}, threshold={chosen['threshold']}")
    for k in rules:
        row = results["per_rule_at_own_tuned_threshold"][k]
        print(
            f"  top_k={k}: tuned threshold {selection[k]['threshold']:.2f}; macro-F1 tune {row['tune']:.3f}, "
            f"held out {row['held_out']:.3f}, whole {row['whole']:.3f}"
        )
    print(f"\nthreshold sweep (top_k={shipped_k}); accuracy / macro-F1 (figures on 'tune' and 'whole' are optimistic)")
    print(f"  {'thr':>5} {'tune':>13} {'held_out':>13} {'whole':>13}")
    for row in results["sweep"]:
        cells = " ".join(f"{row[p]['accuracy']:.3f}/{row[p]['macro_f1']:.3f}" for p in parts)
        print(f"  {row['threshold']:>5.2f} {cells}")
    print("\nper topic, whole sample, shipped rule:")
    for label, m in results["shipped"]["scores"]["whole"]["per_label"].items():
        print(
            f"  {label:>22}: P {m['precision']:.2f} R {m['recall']:.2f} F1 {m['f1']:.2f} "
            f"(gold {m['support']}, predicted {m['predicted']})"
        )
    print("\nconfusion matrix, whole sample, shipped rule (rows gold, columns predicted):")
    print(confusion_text(results["confusion_whole"], labels))
    if table is not None:
        print("\ngold topic by sentiment label (whole sample):")
        print("\n".join("  " + line for line in table.to_string().splitlines()))
    if results["texts_per_second"]:
        print(f"\nspeed: {results['texts_per_second']:.0f} texts/s on {args.threads} thread(s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
