"""Monitor scoring benchmark: texts/s of the three ways to score a fine-tuned classifier on this machine.

One run scores the same texts, the held-back FinBERT-protocol test split of scenario
``finance-monitoring`` (built exactly as the ``finetune`` flow builds it), with

  pytorch     AutoModelForSequenceClassification, fp32, torch.inference_mode, HF fast tokenizer
  onnx-fp32   the exported graph through tasks.serving.classifier.OnnxTextClassifier (what ``monitor`` runs)
  onnx-int8   the same graph dynamically quantised (onnxruntime quantize_dynamic, QInt8 weights),
              through the same scorer

all in batches of --batch-size texts sorted by length (the scorer's own order), tokenization
included in the timing, the three interleaved pass by pass so that load on the machine hits them
alike. Each is also scored against the gold labels (accuracy, macro-F1 via
tasks.classification.evaluation.classification_metrics; modules of finetune_flows).

    .venv/bin/python bench/monitor_bench.py --model-dir CHECKPOINT [--onnx CHECKPOINT.onnx]
    .venv/bin/python bench/monitor_bench.py --model-uri models:/finance-monitoring@champion

Without --onnx the checkpoint is exported with tasks.export.model_export.export_head into a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))

SCENARIO = "finance-monitoring"
DEFAULT_OUT = REPO / "bench" / "results" / "monitor_bench.json"
VARIANTS = ("pytorch", "onnx-fp32", "onnx-int8")
Scorer = Callable[[list[str]], np.ndarray]  # texts -> logits, in input order


# -- inputs ---------------------------------------------------------------------------------------
def test_split(seed: int) -> tuple[list[str], list[str]]:
    """(texts, labels) of the held-back test split, as the ``finetune`` flow builds it."""
    import pandas as pd

    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files

    config = FinetuneConfig.for_scenario(SCENARIO, {"training.seed": seed})
    scenario = SCENARIOS.get(SCENARIO)
    options = IngestOptions(
        eval_fraction=config.data.eval_fraction, test_fraction=config.data.test_fraction, seed=config.training.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest_files(scenario.sample().train, None, scenario, options, Path(tmp) / "cache")
        frame = pd.read_parquet(Path(result.dataset_dir) / "test.parquet", columns=["text", "label"])
    return frame["text"].tolist(), frame["label"].tolist()


def from_registry(uri: str, tracking_uri: str | None, work: Path) -> tuple[Path, Path]:
    """(checkpoint folder, model.onnx) of a registered version, downloaded into ``work``.

    The pyfunc's MLmodel maps each artifact key (``hf_model``, ``onnx_model``) to where MLflow put it.
    """
    import mlflow
    import yaml

    from finetune_flows.tasks.core.model_source import HF_SUBDIR
    from finetune_flows.tasks.core.settings import get_settings
    from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT

    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or get_settings().tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(work / "registered")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    missing = [key for key in (HF_SUBDIR, ONNX_ARTIFACT) if key not in artifacts]
    if missing:
        raise SystemExit(f"{uri} has no artifact(s) {missing} (it has {sorted(artifacts)}); was it made by finetune?")
    return local / artifacts[HF_SUBDIR]["path"], local / artifacts[ONNX_ARTIFACT]["path"]


def export(model_dir: Path, work: Path, max_length: int) -> Path:
    """Export the checkpoint with the flow's own exporter (labels and max length in the metadata)."""
    from finetune_flows.tasks.core.model_source import tokenizer_hash
    from finetune_flows.tasks.export.model_export import export_head

    return export_head(
        model_dir, "sequence-classification", work / "fp32" / "model.onnx", max_length, tokenizer_hash(model_dir)
    )


def quantize(onnx_path: Path, work: Path) -> Path:
    """Dynamic int8 quantisation of ``onnx_path`` (QInt8 weights), keeping the scorer's metadata.

    onnxruntime's pre-processing runs first, without its symbolic shape inference, which fails on
    torch.onnx (dynamo) graphs ("Incomplete symbolic shape inference"); ONNX shape inference suffices.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "int8" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(prepared, out, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(out))
    present = {p.key for p in quantized.metadata_props}
    missing = [p for p in onnx.load(str(onnx_path)).metadata_props if p.key not in present]
    if missing:
        for prop in missing:
            quantized.metadata_props.add(key=prop.key, value=prop.value)
        onnx.save(quantized, str(out))
    return out


# -- the three scorers: texts -> logits in input order ------------------------------------------
def torch_scorer(model_dir: Path, max_length: int, batch_size: int) -> tuple[Scorer, list[str]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def logits(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # the ONNX scorer's order
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                out[idx] = model(**batch).logits.float().numpy()
        return out

    return logits, labels


def onnx_scorer(onnx_path: Path, tokenizer_json: Path, threads: int, batch_size: int) -> tuple[Scorer, Any]:
    from finetune_flows.tasks.serving.classifier import OnnxTextClassifier

    scorer = OnnxTextClassifier(onnx_path, tokenizer_json, threads=threads)
    return (lambda texts: scorer.logits(texts, batch_size)), scorer


# -- measuring ------------------------------------------------------------------------------------
def quality(logits: np.ndarray, model_labels: list[str], gold: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 against the gold labels (over the union of gold and model labels)."""
    from finetune_flows.tasks.classification.evaluation import classification_metrics

    labels = sorted(set(gold) | set(model_labels))
    index = {label: i for i, label in enumerate(labels)}
    predicted = np.array([index[model_labels[i]] for i in logits.argmax(axis=-1)])
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    metrics = classification_metrics(
        np.array([index[g] for g in gold]), predicted, exp / exp.sum(-1, keepdims=True), labels
    )
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "labels": labels}


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    names = [line for line in cpuinfo.read_text().splitlines() if "model name" in line] if cpuinfo.is_file() else []
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": names[0].split(":", 1)[1].strip() if names else platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def print_table(results: dict[str, Any], comparison: dict[str, float]) -> None:
    print(f"{'variant':<10} {'texts/s':>9} {'x pytorch':>9} {'accuracy':>9} {'macro-F1':>9} {'size MB':>8}")
    for name in VARIANTS:
        r = results[name]
        print(
            f"{name:<10} {r['texts_per_s']:>9.1f} {r['speedup_vs_pytorch']:>9.2f} "
            f"{r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['model_mb']:>8.1f}"
        )
    print(
        f"int8 - fp32: accuracy {comparison['accuracy_int8_minus_fp32']:+.4f}, macro-F1 "
        f"{comparison['macro_f1_int8_minus_fp32']:+.4f}; labels agree on "
        f"{comparison['label_agreement_int8_vs_fp32']:.1%}; max |logit diff| fp32 vs pytorch "
        f"{comparison['max_abs_logit_diff_fp32_vs_pytorch']:.2g}, int8 vs fp32 "
        f"{comparison['max_abs_logit_diff_int8_vs_fp32']:.2g}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="fine-tuned HF checkpoint folder (with tokenizer.json)")
    source.add_argument("--model-uri", help="registered model, e.g. models:/finance-monitoring@champion")
    parser.add_argument("--onnx", type=Path, help="the checkpoint's exported model.onnx (default: export it)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for --model-uri (default: the project's store)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens kept when exporting (default: scenario's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all texts, per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime intra-op threads; 0: defaults")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test texts (smoke runs)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the test split (the flow's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.model_uri and args.onnx:
        parser.error("--onnx goes with --model-dir; a registered version brings its own model.onnx")

    import torch

    from finetune_flows.tasks.core.config import FinetuneConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, gold = test_split(args.seed)
    texts, gold = texts[: args.limit], gold[: args.limit]
    max_length = args.max_length or FinetuneConfig.for_scenario(SCENARIO).model.max_length

    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as tmp:
        work = Path(tmp)
        model_dir, onnx_path = (
            from_registry(args.model_uri, args.tracking_uri, work) if args.model_uri else (args.model_dir, args.onnx)
        )
        if onnx_path is None:
            onnx_path = export(model_dir, work, max_length)
        int8_path = quantize(onnx_path, work)
        fp32_logits, fp32 = onnx_scorer(onnx_path, model_dir / "tokenizer.json", args.threads, args.batch_size)
        int8_logits, int8 = onnx_scorer(int8_path, model_dir / "tokenizer.json", args.threads, args.batch_size)
        # The PyTorch path truncates exactly as the graph's scorer does.
        torch_logits, torch_labels = torch_scorer(model_dir, fp32.max_length, args.batch_size)
        scorers = {"pytorch": torch_logits, "onnx-fp32": fp32_logits, "onnx-int8": int8_logits}
        labels = {"pytorch": torch_labels, "onnx-fp32": fp32.labels, "onnx-int8": int8.labels}
        sizes = {
            "pytorch": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6,
            "onnx-fp32": onnx_path.stat().st_size / 1e6,
            "onnx-int8": int8_path.stat().st_size / 1e6,
        }

        warm = texts[-args.batch_size :]  # one batch of each scorer before timing (lazy init, allocator)
        for score in scorers.values():
            score(warm)
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        logits: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name in VARIANTS:
                start = time.perf_counter()
                logits[name] = scorers[name](texts)
                seconds[name].append(time.perf_counter() - start)

    results: dict[str, Any] = {}
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        results[name] = {
            "texts_per_s": len(texts) / median,
            "seconds_median": median,
            "seconds": seconds[name],
            "model_mb": sizes[name],
            **quality(logits[name], labels[name], gold),
        }
    for name in VARIANTS:
        results[name]["speedup_vs_pytorch"] = results[name]["texts_per_s"] / results["pytorch"]["texts_per_s"]
    comparison = {
        "accuracy_int8_minus_fp32": results["onnx-int8"]["accuracy"] - results["onnx-fp32"]["accuracy"],
        "macro_f1_int8_minus_fp32": results["onnx-int8"]["macro_f1"] - results["onnx-fp32"]["macro_f1"],
        "label_agreement_int8_vs_fp32": float(
            (logits["onnx-int8"].argmax(-1) == logits["onnx-fp32"].argmax(-1)).mean()
        ),
        "max_abs_logit_diff_fp32_vs_pytorch": float(np.abs(logits["onnx-fp32"] - logits["pytorch"]).max()),
        "max_abs_logit_diff_int8_vs_fp32": float(np.abs(logits["onnx-int8"] - logits["onnx-fp32"]).max()),
    }

    print(
        f"\n{len(texts)} test texts ({SCENARIO}, seed {args.seed}), batch {args.batch_size}, max length "
        f"{fp32.max_length}, {args.repeats} passes each (median), threads {args.threads or 'default'}"
    )
    print_table(results, comparison)
    if set(torch_labels) != set(gold):
        print(f"note: model labels {sorted(torch_labels)} differ from the test labels {sorted(set(gold))}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "texts": len(texts),
        "model": args.model_uri or str(args.model_dir),
        "onnx": str(args.onnx) if args.onnx else "from the registered version" if args.model_uri else "exported",
        "batch_size": args.batch_size,
        "max_length": fp32.max_length,
        "repeats": args.repeats,
        "threads": args.threads,
        "results": results,
        "comparison": comparison,
        "machine": machine_info(),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
