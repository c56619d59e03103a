"""LoRA against full fine-tuning: the same data, model, batch size and number of steps, in one run.

Each arm trains with ``tasks.core.training.train_model`` itself (so what is measured is what the flow
runs): ``full`` (every weight) and ``lora`` (a rank-``--rank`` adapter on query and value, the
classifier trained in full; ``tasks.core.adapters``), each in fp32 and in the precision ``auto``
picks on this machine (the same arm once when auto means fp32). Per arm:

  samples/s        training samples over the time from Trainer's on_train_begin to the end of the
                   last optimizer step (a callback; the final evaluation and checkpoint are not counted)
  peak memory      the arm's own peak RSS (each arm runs in a freshly spawned process: ru_maxrss of
                   that process), plus torch's peak CUDA allocation on a GPU
  trained params   parameters that train / all parameters (TrainResult)
  artifact size    what the arm adds to storage per trained model: the adapter folder for LoRA
                   (adapter_model.safetensors, adapter_config.json, base.json), the model folder for full
  accuracy         the scenario's metrics of the saved (for LoRA: merged) model on the eval split,
                   reloaded from disk by the head (``build_model``) and scored by the head's evaluator

The baseline is the full fine-tune of the same run. Learning rates differ by method (LoRA wants a
larger one; ``--lr-full``, ``--lr-lora``); everything else is equal. The scenario's bundled sample is
the data (``--scenario sentiment``: SST-2; ``finance-monitoring``; ``customer-service``: Banking77).

    .venv/bin/python bench/lora_bench.py --steps 150            # the real run (the lead's)
    .venv/bin/python bench/lora_bench.py --steps 5              # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "lora.json"
MAX_LENGTH = 128
SEED = 42
FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_meter(max_steps: int) -> Any:
    """A TrainerCallback timing on_train_begin .. the end of step ``max_steps``, counting the samples fed."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.samples, self.t_begin = 0, 0.0
            self.t_end: float | None = None
            self.handle: Any = None

        def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and self.t_end is None and ids is not None:
                self.samples += int(ids.shape[0])

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.t_begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.t_end is None and state.global_step >= max_steps:
                self.t_end = time.perf_counter()
                self.handle.remove()

    return Meter()


def eval_metrics(spec: dict[str, Any], model_dir: Path) -> dict[str, float]:
    """The head's training metrics of the saved model at ``model_dir`` on the tokenized eval split."""
    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from finetune_flows.plugins import HEADS
    from finetune_flows.tasks.core.evaluating import evaluator_for

    head, id2label = HEADS.get(spec["head"]), {int(k): v for k, v in spec["id2label"].items()}
    model = head.build_model(str(model_dir), id2label).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rows = load_from_disk(str(Path(spec["tokenized_dir"]) / "eval"))
    rows = rows.select_columns([c for c in (*FEATURES, "labels") if c in rows.column_names])
    collate = head.collator(AutoTokenizer.from_pretrained(str(model_dir)))
    logits, labels = [], []
    for start in range(0, len(rows), 64):
        batch = collate([rows[i] for i in range(start, min(start + 64, len(rows)))])
        labels.append(batch.pop("labels").numpy())
        with torch.no_grad():
            logits.append(model(**{k: v.to(device) for k, v in batch.items()})["logits"].float().cpu().numpy())
    scores = evaluator_for(spec["head"]).training_metrics(
        spec["head"], np.concatenate(logits), np.concatenate(labels), list(id2label.values())
    )
    return dict(scores)


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: train one arm with train_model, return its measurements (or why it failed)."""
    with Path(spec["log_path"]).open("w") as log:
        os.dup2(log.fileno(), 1)  # the Trainer's own output goes to the arm's log, not the table
        os.dup2(log.fileno(), 2)
        try:
            return measure(spec)
        except Exception as exc:
            traceback.print_exc()
            return {"name": spec["name"], "ok": False, "error": f"{type(exc).__name__}: {exc}", "log": spec["log_path"]}
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with train_model and measure it (see the module docstring)."""
    import torch
    import transformers

    from finetune_flows.tasks.core.adapters import AdapterConfig, TrainingMethod
    from finetune_flows.tasks.core.config import KeepCheckpoints, Precision, TrainingConfig
    from finetune_flows.tasks.core.training import train_model

    transformers.logging.set_verbosity_error()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    lora = spec["method"] == "lora"
    training = TrainingConfig(
        max_steps=spec["steps"], batch_size=spec["batch_size"], eval_every_steps=spec["steps"],
        learning_rate=spec["lr_lora"] if lora else spec["lr_full"], precision=Precision(spec["precision"]),
        seed=SEED, keep_checkpoints=KeepCheckpoints.MODEL_ONLY,
    )  # fmt: skip
    adapter = AdapterConfig(method=TrainingMethod(spec["method"]), rank=spec["rank"], alpha=2 * spec["rank"])
    meter, run_dir = make_meter(spec["steps"]), Path(spec["work_dir"]) / spec["name"]
    result = train_model(
        Path(spec["tokenized_dir"]), Path(spec["model_dir"]), spec["head"],
        {int(k): v for k, v in spec["id2label"].items()}, training, run_dir, spec["primary_metric"],
        callbacks=[meter], adapter=adapter, base_source=spec["model_source"],
    )  # fmt: skip
    if meter.t_end is None:
        raise RuntimeError(f"training stopped before step {spec['steps']} (at {result.steps})")
    seconds = meter.t_end - meter.t_begin
    stored = run_dir / ("adapter" if lora else "model")
    return {
        "name": spec["name"], "ok": True, "method": spec["method"], "precision": result.precision,
        "steps": result.steps, "samples": meter.samples, "train_seconds": seconds,
        "samples_per_s": meter.samples / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "trained_parameters": result.trained_parameters, "total_parameters": result.total_parameters,
        "artifact": stored.name, "artifact_bytes": folder_bytes(stored),
        "model_bytes": folder_bytes(run_dir / "model"),
        "metrics": eval_metrics(spec, run_dir / "model"),
        "learning_rate": training.learning_rate, "log": spec["log_path"],
    }  # fmt: skip


def _child(spec: dict[str, Any], conn: Any) -> None:
    conn.send(run_arm(spec))
    conn.close()


def in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """``run_arm`` in a freshly spawned interpreter, so that its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(spec, sender), name=f"lora-bench-{spec['name']}")
    process.start()
    sender.close()
    try:
        result: dict[str, Any] = receiver.recv()
    except EOFError:  # killed, out of memory, crashed
        result = {"name": spec["name"], "ok": False, "error": "the arm's process died without a result"}
    process.join()
    return result


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Ingest the scenario's sample (or the files given) and tokenize it with the model; the arms' shared spec."""
    from finetune_flows.plugins import HEADS, SCENARIOS
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
    from finetune_flows.tasks.core.model_source import resolve_model_source
    from finetune_flows.tasks.core.tokenization import tokenize_dataset

    scenario = SCENARIOS.get(args.scenario)
    sample = scenario.sample()
    train = args.train_file or (sample.train if sample else None)
    if train is None:
        raise SystemExit(f"scenario {args.scenario!r} bundles no sample: give --train-file")
    evaluation = args.eval_file or (sample.eval if sample and not args.train_file else None)
    options = IngestOptions(eval_fraction=scenario.defaults.eval_fraction, max_train_rows=args.rows, seed=SEED)
    data = ingest_files(Path(train), Path(evaluation) if evaluation else None, scenario, options, work / "cache")
    model_dir = resolve_model_source(args.model, work)
    tokens = tokenize_dataset(Path(data.dataset_dir), model_dir, data.data_hash, MAX_LENGTH, scenario.head,
                              work / "cache")  # fmt: skip
    if HEADS.get(scenario.head).name == "bi-encoder":
        raise SystemExit("the bi-encoder has no eval-split accuracy here: choose a classification scenario")
    return {
        "head": scenario.head, "primary_metric": scenario.primary_metric, "tokenized_dir": tokens.tokenized_dir,
        "model_dir": str(model_dir), "model_source": args.model, "id2label": data.id2label,
        "train_rows": tokens.train_rows, "eval_rows": tokens.eval_rows,
    }  # fmt: skip


def precisions() -> list[str]:
    """fp32, and what ``auto`` picks here when that is not fp32."""
    from finetune_flows.tasks.core.config import Precision
    from finetune_flows.tasks.core.training_options import choose_precision

    auto = choose_precision(Precision.AUTO).value
    return ["fp32"] if auto == "fp32" else ["fp32", auto]


def table(results: list[dict[str, Any]], primary: str) -> str:
    """The comparison as aligned text, each arm against the full fine-tune of the same precision."""
    lines = [f"{'arm':<12}{'samples/s':>10}{'x full':>8}{'peak RSS MB':>12}{'trained params':>22}"
             f"{'stored MB':>11}{primary:>10}"]  # fmt: skip
    for r in results:
        if not r["ok"]:
            lines.append(f"{r['name']:<12}FAILED: {r['error']} (log: {r.get('log')})")
            continue
        full = next((b for b in results if b["ok"] and b["method"] == "full" and b["precision"] == r["precision"]), r)
        share = 100.0 * r["trained_parameters"] / max(r["total_parameters"], 1)
        lines.append(
            f"{r['name']:<12}{r['samples_per_s']:>10.1f}{r['samples_per_s'] / full['samples_per_s']:>8.2f}"
            f"{r['peak_rss_mb']:>12.0f}{r['trained_parameters']:>12,} ({share:5.2f}%)"
            f"{r['artifact_bytes'] / 2**20:>11.2f}{r['metrics'].get(primary, float('nan')):>10.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="sentiment", help="classification scenario whose sample is the data")
    parser.add_argument("--train-file", type=Path, help="train on this file instead of the sample")
    parser.add_argument("--eval-file", type=Path, help="eval file (default: the sample's, or a split of train)")
    parser.add_argument("--model", default="minilm", help="model.source of both arms")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=None, help="at most this many train rows (seeded sample)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        work = Path(tmp)
        shared = prepare(args, work)
        results = []
        for precision in precisions():
            for method in ("full", "lora"):
                name = f"{method}-{precision}"
                log_path = args.out.parent / "lora_logs" / f"{args.scenario}-{name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                spec = {**shared, "name": name, "method": method, "precision": precision, "steps": args.steps,
                        "batch_size": args.batch_size, "rank": args.rank, "lr_full": args.lr_full,
                        "lr_lora": args.lr_lora, "threads": args.threads, "work_dir": str(work),
                        "log_path": str(log_path)}  # fmt: skip
                results.append(in_fresh_process(spec))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "scenario": args.scenario, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
        "rank": args.rank, "train_rows": shared["train_rows"], "eval_rows": shared["eval_rows"],
        "baseline": "full fine-tune of the same precision", "arms": results,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"{args.scenario}: {shared['train_rows']} train / {shared['eval_rows']} eval rows, {args.steps} steps "
          f"of {args.batch_size}, model {args.model}")  # fmt: skip
    print(table(results, shared["primary_metric"]))
    print(f"written: {args.out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
