"""Export-ladder benchmark: every served-graph candidate of a fine-tuned model against PyTorch eager, on this CPU.

One run takes a finetune run folder (its ``model/`` checkpoint and ``onnx/model.onnx``) and the
prepared dataset it was trained on, and measures

  pytorch-eager  the head's export module (what the graph was traced from), fp32, torch.inference_mode,
                 HF fast tokenizer, the same length-sorted batches
  fp32 ... int8  the ladder's candidates (tasks.export.serving_choice.climb: fp32, fused, OpenVINO f32
                 and bf16 where the CPU has it, dynamic and static int8 with the weight layout this CPU
                 calls for), through the serving scorer

in texts/s at batch 1 and 64, with each candidate's label agreement (embeddings: mean cosine) with
the fp32 graph and its primary-metric loss on the eval split: the gate the flow applies. Where the
dataset has a test split, the served variant's agreement and metric there are reported too: the
fallback chose its fp32 weights on eval, so test is the held-out check.

    .venv/bin/python bench/export_ladder_bench.py --run-dir RUN --dataset-dir DATA --head sequence-classification \
        --primary-metric accuracy --name finance
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.monitor_bench import machine_info  # noqa: E402

OUT = REPO / "bench" / "results"


def eager_throughput(model_dir: Path, head: str, texts: list[str], batch_size: int, max_length: int) -> float:
    """Texts/s of the head's export module in PyTorch eager mode (best of 3 passes, tokenization included)."""
    import torch
    from transformers import AutoTokenizer

    from finetune_flows.plugins import HEADS

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    module = HEADS.get(head).export_module(model_dir)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    ordered = sorted(texts, key=len)
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]

    def run(chunk: list[str]) -> None:
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        module(**{n: batch[n] for n in names})

    best = 0.0
    with torch.inference_mode():
        run(chunks[0])
        for _ in range(3):
            start = time.perf_counter()
            for chunk in chunks:
                run(chunk)
            best = max(best, len(ordered) / (time.perf_counter() - start))
    return best


def test_check(served: Path, fp32: Path, request: Any, head: str, output: str) -> dict[str, float] | None:
    """The served graph against fp32 on the test split: agreement and the primary metric of both."""
    from finetune_flows.tasks.core.evaluating import evaluator_for
    from finetune_flows.tasks.export.ladder import Outputs, agreement

    dataset = Path(request.dataset_dir)
    if not (dataset / "test.parquet").is_file():
        return None
    ranking = (dataset / "validation.parquet").is_file()  # a ranking dataset: validation chooses, test reports
    with tempfile.TemporaryDirectory() as tmp:  # the evaluators read eval (validation): point them at test
        Path(tmp, "validation.parquet" if ranking else "eval.parquet").symlink_to(dataset / "test.parquet")
        if ranking:
            Path(tmp, "items.parquet").symlink_to(dataset / "items.parquet")
        test_request = request.model_copy(update={"dataset_dir": tmp})
        column = "profile" if ranking else "text"
        texts = pd.read_parquet(dataset / "test.parquet")[column].astype(str).tolist()
        batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
        tokenizer = Path(request.model_dir) / "tokenizer.json"
        agree, _ = agreement(
            Outputs(fp32, tokenizer, output, batches), Outputs(served, tokenizer, output, batches), output, head
        )
        evaluator = evaluator_for(head)
        return {
            "texts": len(texts),
            "agreement": agree,
            "fp32_metric": evaluator.score_graph(str(fp32), test_request),
            "served_metric": evaluator.score_graph(str(served), test_request),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finetune run folder (model/, onnx/model.onnx)")
    parser.add_argument("--dataset-dir", type=Path, required=True, help="the prepared dataset the run trained on")
    parser.add_argument("--head", default="sequence-classification")
    parser.add_argument("--primary-metric", default="accuracy")
    parser.add_argument("--texts", type=int, default=1000, help="eval texts the gate compares on (ladder_texts)")
    parser.add_argument("--name", default="model", help="results go to bench/results/export_ladder_<name>.json")
    parser.add_argument("--keep", type=Path, help="copy the served graph here (as <variant>.onnx)")
    args = parser.parse_args()

    import onnx

    from finetune_flows.plugins import HEADS
    from finetune_flows.tasks.core.config import EvaluationConfig
    from finetune_flows.tasks.core.evaluating import EvalRequest
    from finetune_flows.tasks.export.ladder import SPEED_BATCH, Gate, best_rung, ladder_table
    from finetune_flows.tasks.export.model_export import parity_texts
    from finetune_flows.tasks.export.serving_choice import climb

    model_dir, fp32 = args.run_dir / "model", args.run_dir / "onnx" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    max_length = int(meta["max_length"])  # what the graph's scorer truncates at; eager truncates the same
    head = HEADS.get(args.head)
    eval_file = args.dataset_dir / "eval.parquet"
    labels: list[str] = []
    if eval_file.is_file() and "label_id" in pd.read_parquet(eval_file).columns:
        frame = pd.read_parquet(eval_file, columns=["label", "label_id"]).drop_duplicates().sort_values("label_id")
        config = json.loads((model_dir / "config.json").read_text())
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))] if "id2label" in config else []
        labels = labels or frame["label"].tolist()
    texts = parity_texts(args.dataset_dir, args.texts, head.text_columns)
    with tempfile.TemporaryDirectory(prefix="ladder-bench-") as tmp:
        request = EvalRequest(
            scenario=args.name, head=args.head, model_dir=str(model_dir), onnx_path=str(fp32),
            dataset_dir=str(args.dataset_dir), labels=labels, primary_metric=args.primary_metric,
            max_length=max_length, evaluation=EvaluationConfig(), report_dir=str(Path(tmp) / "report"),
        )  # fmt: skip
        started = time.perf_counter()
        eager = {
            size: eager_throughput(
                model_dir, args.head, texts[: SPEED_BATCH * 4][: 32 if size == 1 else None], size, max_length
            )
            for size in (1, SPEED_BATCH)
        }
        rows = climb(fp32, model_dir / "tokenizer.json", args.head, texts, request, Gate(), Path(tmp) / "ladder")
        seconds = time.perf_counter() - started
        served = best_rung(rows)
        held_out = test_check(Path(served.path), fp32, request, args.head, head.export_output)
        table = ladder_table(rows, served.variant)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy2(served.path, args.keep / f"{served.variant}.onnx")

    print(f"\n{args.name}: {len(texts)} eval texts, head {args.head}, primary metric {args.primary_metric}")
    print(
        f"{'variant':<26} {'b1 t/s':>8} {'b64 t/s':>8} {'x eager b64':>11} {'agree':>7} {'loss pt':>8} {'MB':>6} gate"
    )
    print(f"{'pytorch-eager':<26} {eager[1]:>8.1f} {eager[SPEED_BATCH]:>8.1f} {1.0:>11.2f}")
    for row, r in zip(table, rows, strict=True):
        print(
            f"{row['variant'] + (' *' if row['served'] else ''):<26} {r.texts_per_s_batch1:>8.1f} "
            f"{r.texts_per_s_batch64:>8.1f} {r.texts_per_s_batch64 / eager[SPEED_BATCH]:>11.2f} {r.agreement:>7.4f} "
            f"{100 * r.metric_loss:>8.2f} {r.size_mb:>6.1f} {row['gate']} {row['note']}"
        )
    print(f"* served. ladder + eager timing took {seconds:.0f} s")
    if held_out:
        print(
            f"held-out test ({held_out['texts']} texts): agreement {held_out['agreement']:.4f}, "
            f"{args.primary_metric} fp32 {held_out['fp32_metric']:.4f} served {held_out['served_metric']:.4f}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"export_ladder_{args.name}.json"
    report = {
        "name": args.name, "head": args.head, "texts": len(texts),
        "pytorch_eager": {"b1": eager[1], "b64": eager[SPEED_BATCH]},
        "rows": table, "served": served.variant, "served_speedup_b64": served.texts_per_s_batch64 / eager[SPEED_BATCH],
        "held_out_test": held_out, "seconds": seconds, "machine": machine_info(),
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
