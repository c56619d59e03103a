"""Active learning on Financial PhraseBank: labels picked by uncertainty against labels picked at random.

The data is the FinBERT-protocol split the ``finance-monitoring`` fine-tune uses (Sentences_50Agree,
stratified 20% test, 20% of the rest eval, seed 42). Each seed starts from the same seeded,
stratified 10% of train for both strategies; the rest of train is the unlabelled pool, whose labels
are revealed as texts are picked (a simulated person). Each round adds --batch texts picked by

  uncertainty  the current model scores the pool; one temperature is fitted on the eval split;
               entropy of the scaled probabilities; ``diversified`` over the all-MiniLM-L6-v2
               sentence embeddings (tasks.labelling.selection, as the ``label`` flow picks)
  random       ``random_pick``, uniformly

and the model is trained again from scratch on the labels so far. Learners (--learner):

  frozen    logistic regression (C=1) on all-MiniLM-L6-v2 sentence embeddings (the project's ONNX
            export, embedded once and cached as .npy in the work folder); seconds per round
  finetune  MiniLM fine-tuned per round with tasks.core.training.train_model and the scenario's
            defaults (max_length 96, lr 1e-4, 5 epochs, batch 16, layer decay 0.8, label smoothing
            0.1, checkpoint chosen on eval); ~1-2 min per round on 2 cores: run it with --seeds 1

Reported per strategy, seed and round: labels used, test macro-F1 and accuracy, the fitted temperature
and the test ECE before/after scaling; then mean (min-max over seeds) macro-F1 by number of labels
and the area under each learning curve (trapezoids, divided by the label range: a mean macro-F1).

    .venv/bin/python bench/active_learning_bench.py                              # frozen, 5 rounds, 3 seeds
    .venv/bin/python bench/active_learning_bench.py --learner finetune --seeds 1  # ~11 fine-tunes
    .venv/bin/python bench/active_learning_bench.py --rounds 2 --seeds 1 --limit 600          # smoke run
    .venv/bin/python bench/active_learning_bench.py --learner finetune --rounds 1 --seeds 1 \\
        --limit 200 --batch 20 --max-steps 10                                    # finetune smoke run

--limit and --max-steps are for smoke runs only: their figures say nothing about active learning.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "datasets"
DATA_FILE = SHARED / "financial_phrasebank" / "Sentences_50Agree.txt"
DEFAULT_OUT = REPO / "bench" / "results" / "active_learning_bench.json"
SCENARIO = "finance-monitoring"
STRATEGIES = ("uncertainty", "random")
SPLITS = ("train", "eval", "test")
Learner = Callable[[np.ndarray, np.ndarray, int], dict[str, np.ndarray]]  # (labelled, pool, seed) -> probabilities


@dataclass
class Data:
    """The three splits (text, label, label_id), their sentence embeddings and the label names in id order."""

    frames: dict[str, Any]
    vectors: dict[str, np.ndarray]
    labels: list[str]

    def y(self, split: str) -> np.ndarray:
        """Class ids of a split."""
        return np.asarray(self.frames[split]["label_id"], dtype=np.int64)


def load_data(work: Path, limit: int | None) -> Data:
    """Ingest the PhraseBank file with the scenario's options; embed every text once (cached in ``work``)."""
    import pandas as pd

    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.data_preparation import ingest_options
    from finetune_flows.tasks.core.ingestion import ingest_files

    began = time.perf_counter()
    config = FinetuneConfig.for_scenario(SCENARIO)
    options = ingest_options(config.data, SCENARIO, config.training.seed)
    ingest = ingest_files(DATA_FILE, None, SCENARIOS.get(SCENARIO), options, work / "cache")
    frames = {s: pd.read_parquet(Path(ingest.dataset_dir) / f"{s}.parquet") for s in SPLITS}
    if limit:  # smoke runs only: at most limit train rows, limit // 2 eval and test rows
        rng = np.random.default_rng(0)
        for split, frame in frames.items():
            keep = limit if split == "train" else max(limit // 2, 10)
            if len(frame) > keep:
                frames[split] = frame.iloc[np.sort(rng.choice(len(frame), keep, replace=False))]
    frames = {s: f.reset_index(drop=True)[["text", "label", "label_id"]] for s, f in frames.items()}
    print(
        f"data: {', '.join(f'{len(f)} {s}' for s, f in frames.items())} rows; labels {ingest.labels} "
        f"({time.perf_counter() - began:.1f} s)",
        flush=True,
    )
    return Data(frames, embed({s: f["text"].tolist() for s, f in frames.items()}, work), ingest.labels)


def embed(texts: dict[str, list[str]], work: Path) -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2 embeddings per split, through the project's ONNX encoder; ``work/*.npy`` reused."""
    from finetune_flows.tasks.core.model_source import minilm_path

    def cached(split: str) -> Path:
        digest = hashlib.sha256("\n".join(texts[split]).encode()).hexdigest()[:16]
        return work / f"embeddings-{split}-{digest}.npy"

    missing = [s for s in texts if not cached(s).is_file()]
    if missing:
        from finetune_flows.tasks.export.model_export import export_sentence_encoder
        from finetune_flows.tasks.serving.encoder import SentenceEncoder

        onnx = work / "encoder.onnx"
        if not onnx.is_file():
            began = time.perf_counter()
            export_sentence_encoder(minilm_path(), onnx)
            print(f"exported the sentence encoder to {onnx} ({time.perf_counter() - began:.1f} s)", flush=True)
        encoder = SentenceEncoder(onnx, minilm_path() / "tokenizer.json")
        for split in missing:
            began = time.perf_counter()
            np.save(cached(split), encoder.encode(texts[split]))
            seconds = time.perf_counter() - began
            print(f"embedded {len(texts[split])} {split} texts ({seconds:.1f} s)", flush=True)
    return {s: np.load(cached(s)) for s in texts}


def frozen_learner(data: Data, labelled: np.ndarray, pool: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Logistic regression on the labelled embeddings; class probabilities of eval, test and the pool."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0, max_iter=2000).fit(data.vectors["train"][labelled], data.y("train")[labelled])
    columns = np.asarray(model.classes_, dtype=np.int64)  # a class missing from the labels gets probability 0

    def probabilities(vectors: np.ndarray) -> np.ndarray:
        out = np.zeros((len(vectors), len(data.labels)))
        if len(vectors):
            out[:, columns] = model.predict_proba(vectors)
        return out

    return {
        "eval": probabilities(data.vectors["eval"]),
        "test": probabilities(data.vectors["test"]),
        "pool": probabilities(data.vectors["train"][pool]),
    }


def finetune_learner(
    data: Data, work: Path, max_steps: int | None, labelled: np.ndarray, pool: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """MiniLM fine-tuned from the base model on the labelled texts (checkpoint chosen on eval), then scored."""
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.model_source import minilm_path
    from finetune_flows.tasks.core.tokenization import tokenize_dataset
    from finetune_flows.tasks.core.training import train_model

    overrides: dict[str, Any] = {"training.seed": seed}
    if max_steps:
        overrides["training.max_steps"] = max_steps
    config = FinetuneConfig.for_scenario(SCENARIO, overrides)
    key = hashlib.sha256(f"{seed}|{max_steps}|{labelled.tolist()}".encode()).hexdigest()[:16]
    folder = work / "rounds" / key
    (folder / "data").mkdir(parents=True, exist_ok=True)
    data.frames["train"].iloc[labelled].to_parquet(folder / "data" / "train.parquet", index=False)
    data.frames["eval"].to_parquet(folder / "data" / "eval.parquet", index=False)
    tokenized = tokenize_dataset(
        folder / "data", minilm_path(), key, config.model.max_length, config.head_name, work / "cache"
    )
    with (work / "training.log").open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = train_model(
            Path(tokenized.tokenized_dir), minilm_path(), config.head_name, dict(enumerate(data.labels)),
            config.training, folder / "run", config.primary_metric,
        )  # fmt: skip
    texts = {
        "eval": data.frames["eval"]["text"].tolist(),
        "test": data.frames["test"]["text"].tolist(),
        "pool": data.frames["train"]["text"].iloc[pool].tolist(),
    }
    probabilities = predict(Path(result.model_dir), texts, config.model.max_length, config.head_name)
    shutil.rmtree(folder, ignore_errors=True)  # checkpoints are ~90 MB each
    shutil.rmtree(tokenized.tokenized_dir, ignore_errors=True)
    return probabilities


def predict(model_dir: Path, texts: dict[str, list[str]], max_length: int, head: str) -> dict[str, np.ndarray]:
    """Class probabilities of a fine-tuned checkpoint (torch, no_grad, batches of similar length)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune_flows.plugins import HEADS

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = {}
    for name, rows in texts.items():
        logits = np.zeros((len(rows), model.config.num_labels))
        order = np.argsort([len(t) for t in rows], kind="stable")
        with torch.no_grad():
            for start in range(0, len(rows), 64):
                idx = order[start : start + 64]
                batch = tokenizer(
                    [rows[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                )
                logits[idx] = model(**batch).logits.float().numpy()
        out[name] = HEADS.get(head).predict(logits)[1]
    return out


def initial_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified ``fraction`` of the train rows (sorted indices)."""
    from sklearn.model_selection import train_test_split

    picked, _ = train_test_split(np.arange(len(labels)), train_size=fraction, stratify=labels, random_state=seed)
    return np.sort(picked)


def score(data: Data, probabilities: dict[str, np.ndarray]) -> dict[str, float]:
    """Test macro-F1 and accuracy, the temperature fitted on eval, test ECE before and after scaling."""
    from sklearn.metrics import accuracy_score, f1_score

    from finetune_flows.tasks.labelling.selection import expected_calibration_error, fit_temperature, scaled

    y, test = data.y("test"), probabilities["test"]
    temperature = fit_temperature(probabilities["eval"], data.y("eval"))
    return {
        "macro_f1": float(f1_score(y, test.argmax(1), average="macro", labels=list(range(len(data.labels))))),
        "accuracy": float(accuracy_score(y, test.argmax(1))),
        "temperature": temperature,
        "ece_test": expected_calibration_error(test, y),
        "ece_test_scaled": expected_calibration_error(scaled(test, temperature), y),
    }


def pick(
    strategy: str, pool_probabilities: np.ndarray, temperature: float, vectors: np.ndarray, n: int, seed: int
) -> list[int]:
    """Positions in the pool of the ``n`` texts to label next."""
    from finetune_flows.tasks.labelling.selection import diversified, entropy, random_pick, scaled

    if strategy == "random":
        return random_pick(len(vectors), n, seed)
    return diversified(entropy(scaled(pool_probabilities, temperature)), vectors, n, seed)


def run_seed(data: Data, learner: Learner, name: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both strategies' learning curves for one seed; round 0 (the shared start) is trained once."""
    everything = np.arange(len(data.frames["train"]))
    start = initial_labels(data.y("train"), args.initial_fraction, seed)
    began = time.perf_counter()
    first = learner(start, np.setdiff1d(everything, start), seed)
    first_seconds = time.perf_counter() - began
    rows: list[dict[str, Any]] = []
    for strategy in STRATEGIES:
        labelled, probabilities, fit_seconds, picked_classes = start, first, first_seconds, None
        for round_ in range(args.rounds + 1):
            pool = np.setdiff1d(everything, labelled)
            if round_:
                began = time.perf_counter()
                scored = pool if strategy == "uncertainty" and round_ < args.rounds else pool[:0]
                probabilities = learner(labelled, scored, seed)
                fit_seconds = time.perf_counter() - began
            row: dict[str, Any] = {"learner": name, "strategy": strategy, "seed": seed, "round": round_}
            row["labels"] = len(labelled)
            row |= score(data, probabilities) | {"fit_seconds": fit_seconds, "picked_classes": picked_classes}
            began = time.perf_counter()
            if round_ < args.rounds and len(pool):
                chosen = pick(strategy, probabilities["pool"], row["temperature"], data.vectors["train"][pool],
                              args.batch, seed * 1000 + round_)  # fmt: skip
                labelled = np.sort(np.concatenate([labelled, pool[chosen]]))
                counts = np.bincount(data.y("train")[pool[chosen]], minlength=len(data.labels))
                picked_classes = dict(zip(data.labels, counts.tolist(), strict=True))
            row["pick_seconds"] = time.perf_counter() - began
            rows.append(row)
            print(
                f"[{name} {strategy:<11} seed {seed} round {round_}] {row['labels']:5d} labels: "
                f"macro-F1 {row['macro_f1']:.4f} acc {row['accuracy']:.4f} T {row['temperature']:.2f} "
                f"ECE {row['ece_test']:.3f}->{row['ece_test_scaled']:.3f} "
                f"(model {fit_seconds:.1f} s, pick {row['pick_seconds']:.1f} s)",
                flush=True,
            )
            if row["labels"] == len(everything):
                break
    return rows


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (min-max over seeds) macro-F1 per number of labels and strategy; area under each learning curve."""
    curves: dict[str, Any] = {}
    areas: dict[str, Any] = {}
    for strategy in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == strategy]
        by_labels: dict[int, list[dict[str, Any]]] = {}
        for r in mine:
            by_labels.setdefault(r["labels"], []).append(r)
        curves[strategy] = {
            labels: {key: spread([r[key] for r in group]) for key in ("macro_f1", "accuracy", "temperature")}
            for labels, group in sorted(by_labels.items())
        }
        per_seed = []
        for seed in sorted({r["seed"] for r in mine}):
            curve = sorted((r["labels"], r["macro_f1"]) for r in mine if r["seed"] == seed)
            x, f1 = np.array([c[0] for c in curve], float), np.array([c[1] for c in curve])
            per_seed.append(float(np.trapezoid(f1, x) / (x[-1] - x[0])) if len(x) > 1 else float(f1[0]))
        areas[strategy] = spread(per_seed)
    return {"macro_f1_by_labels": curves, "area_under_curve": areas}


def print_table(summary: dict[str, Any]) -> None:
    """The learning curves and their areas as Markdown."""
    unc, rnd = (summary["macro_f1_by_labels"][s] for s in STRATEGIES)

    def cell(stat: dict[str, float]) -> str:
        return f"{stat['mean']:.4f} ({stat['min']:.4f}-{stat['max']:.4f})"

    print("\n| labels | uncertainty macro-F1 | random macro-F1 | difference | T (uncertainty) |")
    print("|---:|---:|---:|---:|---:|")
    for labels in sorted(set(unc) & set(rnd)):
        difference = unc[labels]["macro_f1"]["mean"] - rnd[labels]["macro_f1"]["mean"]
        print(
            f"| {labels} | {cell(unc[labels]['macro_f1'])} | {cell(rnd[labels]['macro_f1'])} | {difference:+.4f} "
            f"| {unc[labels]['temperature']['mean']:.2f} |"
        )
    areas = summary["area_under_curve"]
    print("\n| strategy | area under the learning curve (mean macro-F1) |\n|---|---:|")
    for strategy in STRATEGIES:
        print(f"| {strategy} | {cell(areas[strategy])} |")
    print(f"| difference | {areas['uncertainty']['mean'] - areas['random']['mean']:+.4f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learner", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--rounds", type=int, default=5, help="batches added after the start (default 5)")
    parser.add_argument("--batch", type=int, default=100, help="texts labelled per round (default 100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--initial-fraction", type=float, default=0.1, help="labelled share of train at the start")
    parser.add_argument("--limit", type=int, help="SMOKE ONLY: at most N train rows, N//2 eval and test rows")
    parser.add_argument("--max-steps", type=int, help="SMOKE ONLY (finetune): cap the optimizer steps per training")
    parser.add_argument("--work-dir", type=Path, help="kept and reused (encoder, embeddings); default: a temp dir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rounds < 0 or args.batch < 1 or args.seeds < 1 or not 0 < args.initial_fraction < 1:
        parser.error("--rounds >= 0, --batch >= 1, --seeds >= 1 and 0 < --initial-fraction < 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()  # the Trainer's own output goes to <work>/training.log
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar per model load
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="active-learning-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        data = load_data(work, args.limit)
        prepare_seconds = time.perf_counter() - began
        learner: Learner = (
            functools.partial(frozen_learner, data)
            if args.learner == "frozen"
            else functools.partial(finetune_learner, data, work, args.max_steps)
        )
        rows: list[dict[str, Any]] = []
        for seed in range(args.seeds):
            rows += run_seed(data, learner, args.learner, seed, args)
        curves_seconds = time.perf_counter() - began - prepare_seconds
        summary = summarise(rows)
        print_table(summary)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "data_file": str(DATA_FILE),
            "rows": {s: len(f) for s, f in data.frames.items()}, "labels": data.labels,
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": {"data_and_embeddings": prepare_seconds, "curves": curves_seconds},
            "summary": summary, "results": rows,
        }  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"\ndata + embeddings {prepare_seconds:.1f} s, curves {curves_seconds:.1f} s; written {args.out}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
