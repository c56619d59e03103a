"""Fine-tune step benchmark: our Trainer setup against the usual HF Trainer setups, on this machine.

One run measures, on the same seeded sample of SST-2 rows, the same all-MiniLM-L6-v2 classifier, the
same batch size and (except bf16) the same number of optimizer steps:

  ours            tasks.core.training.train_model itself (dynamic padding, group_by_length, adamw_torch_fused,
                  precision auto -> fp32 on CPUs without native bf16)
  pad128          run_glue style: padding="max_length" to 128, random sampler, Trainer's default optim, fp32
  dynamic-gbl     DataCollatorWithPadding + group_by_length, fp32, optim="adamw_torch" (not fused)
  bf16-gbl-fused  Trainer's "best CPU setup": bf16=True + group_by_length + adamw_torch_fused (capped steps)

plus tokenization (tasks.core.tokenization.tokenize_dataset, first run vs cached run); modules of finetune_flows.

Every training configuration runs in its own freshly spawned process, so its peak RSS is its own.
Throughput is timed from Trainer's on_train_begin to the end of the last optimizer step (a callback),
so the evaluation/checkpoint that train_model does at the end is not counted. Tokens are counted
from the batches the model is actually fed (a forward pre-hook).

Defaults: 6400 rows and 50 steps. HF's group_by_length sorts mega-batches of
min(rows // (4 x batch), 50) batches, longest first; 6400 = 4 x 50 x 32 is the smallest sample
at which it uses the full 50-batch mega-batches a real (large) fine-tune gets, and 50 steps is
exactly one mega-batch, an unbiased draw of lengths. bf16 runs --bf16-steps steps only; they are
the same first batches as ours' (same sampler seed), and its row is scaled from ours' full-run
figures by the bf16/fp32 step-time ratio on those identical batches.

    .venv/bin/python bench/finetune_bench.py                       # full run (~5-8 min on 2 cores)
    .venv/bin/python bench/finetune_bench.py --steps 8 --rows 2000 --bf16-steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))

DEFAULT_TRAIN_FILE = REPO.parent / "shared" / "datasets" / "sst2" / "train.tsv"
DEFAULT_OUT = REPO / "bench" / "results" / "finetune_bench.json"
SCENARIO = "sentiment"
HEAD = "sequence-classification"
MAX_LENGTH = 128
SEED = 42
EVAL_ROWS_FOR_OURS = 256  # train_model evaluates at the end; a small eval split keeps that short (untimed)

CONFIGS: dict[str, str] = {
    "ours": "train_model(): dynamic pad + group_by_length + adamw_torch_fused, precision auto",
    "pad128": "pad to 128 (run_glue), random sampler, Trainer default optim, fp32",
    "dynamic-gbl": "dynamic pad + group_by_length, adamw_torch (not fused), fp32",
    "bf16-gbl-fused": "bf16=True + group_by_length + adamw_torch_fused",
}
BASELINE = "pad128"


# -- child side: one training configuration per fresh process ---------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _make_meter(max_steps: int) -> Any:
    """A TrainerCallback that times the optimizer steps and counts the tokens the model is actually fed."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.samples = 0
            self.real_tokens = 0
            self.padded_tokens = 0
            self.max_seq_len = 0
            self.batches = 0
            self.t_begin = 0.0
            self.t_last = 0.0
            self.t_end: float | None = None
            self.step_seconds: list[float] = []
            self.step_real_tokens: list[int] = []
            self.step_padded_tokens: list[int] = []
            self.rss_at_train_end_mb: float | None = None
            self.handle: Any = None

        def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training or self.t_end is not None:
                return  # evaluation forwards are not training throughput
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is None:
                return
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            self.batches += 1
            self.samples += int(ids.shape[0])
            self.padded_tokens += int(ids.numel())
            self.real_tokens += real
            self.step_real_tokens.append(real)  # one forward per step (no gradient accumulation)
            self.step_padded_tokens.append(int(ids.numel()))
            self.max_seq_len = max(self.max_seq_len, int(ids.shape[-1]))

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.t_begin = self.t_last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.t_end is not None:
                return
            now = time.perf_counter()
            self.step_seconds.append(now - self.t_last)
            self.t_last = now
            if state.global_step >= max_steps:
                self.t_end = now
                self.rss_at_train_end_mb = _peak_rss_mb()
                if self.handle is not None:
                    self.handle.remove()

    return Meter()


def _baseline_trainer(spec: dict[str, Any], meter: Any) -> tuple[Any, str]:
    """A plain HF Trainer for the comparison configurations; returns (trainer, precision)."""
    import torch
    from datasets import load_from_disk
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from finetune_flows.plugins import HEADS

    name = spec["name"]
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], use_fast=True)
    model = HEADS.get(HEAD).build_model(spec["model_dir"], {int(k): v for k, v in spec["id2label"].items()})
    # Same schedule hyper-parameters as train_model (they do not change the cost of a step);
    # what differs per configuration is padding, sampling, optimizer implementation and precision.
    common: dict[str, Any] = {
        "output_dir": str(Path(spec["work_dir"]) / "out"),
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "learning_rate": 5e-5,
        "warmup_steps": 0.06,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "use_cpu": not torch.cuda.is_available(),
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 50,
        "report_to": "none",
        "seed": SEED,
        "data_seed": SEED,
        "dataloader_num_workers": 0,
    }
    if name == "pad128":
        train_set = load_from_disk(spec["padded_train_dir"])
        args = TrainingArguments(**common)  # default sampler ("random") and default optim, fp32
        collator: Any = default_data_collator
        precision = "fp32"
    elif name == "dynamic-gbl":
        train_set = load_from_disk(spec["train_dir"])
        args = TrainingArguments(**common, train_sampling_strategy="group_by_length", optim="adamw_torch")
        collator = DataCollatorWithPadding(tokenizer)
        precision = "fp32"
    elif name == "bf16-gbl-fused":
        train_set = load_from_disk(spec["train_dir"])
        args = TrainingArguments(
            **common, train_sampling_strategy="group_by_length", optim="adamw_torch_fused", bf16=True
        )
        collator = DataCollatorWithPadding(tokenizer)
        precision = "bf16"
    else:
        raise ValueError(f"unknown configuration {name!r}")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[meter],
    )
    return trainer, precision


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh spawned process: train one configuration, return its measurements."""
    t_start = time.perf_counter()
    log_path = Path(spec["log_path"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    os.dup2(log.fileno(), 1)  # keep the Trainer's own printing out of the benchmark's table
    os.dup2(log.fileno(), 2)
    try:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()  # also turns tqdm bars off in TrainingArguments
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        meter = _make_meter(spec["steps"])
        extra: dict[str, Any] = {}
        if spec["name"] == "ours":
            from finetune_flows.plugins import SCENARIOS
            from finetune_flows.tasks.core.config import Precision, TrainingConfig
            from finetune_flows.tasks.core.training import train_model

            config = TrainingConfig(
                max_steps=spec["steps"],
                batch_size=spec["batch_size"],
                eval_every_steps=1_000_000,  # no evaluation/checkpoint before the last step
                precision=Precision.AUTO,
                seed=SEED,
            )
            result = train_model(
                Path(spec["ours_tokenized_dir"]),
                Path(spec["model_dir"]),
                HEAD,
                {int(k): v for k, v in spec["id2label"].items()},
                config,
                Path(spec["work_dir"]) / "run",
                SCENARIOS.get(SCENARIO).primary_metric,
                callbacks=[meter],
                report_to_mlflow=False,
            )
            precision = result.precision
            optim = "adamw_torch_fused"
            steps_done = result.steps
            # Trainer's train_runtime here includes the end-of-training evaluation and checkpoint.
            extra["trainer_train_runtime_s"] = result.train_seconds
        else:
            trainer, precision = _baseline_trainer(spec, meter)
            optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
            output = trainer.train()
            steps_done = output.global_step
            extra["trainer_train_runtime_s"] = float(output.metrics["train_runtime"])
        if meter.t_end is None:
            raise RuntimeError(f"training stopped before step {spec['steps']} (got {steps_done})")
        train_s = meter.t_end - meter.t_begin
        first = meter.step_seconds[0] if meter.step_seconds else 0.0
        steady_s = train_s - first
        per_batch = meter.samples / max(meter.batches, 1)
        return {
            "name": spec["name"],
            "description": CONFIGS[spec["name"]],
            "ok": True,
            "precision": precision,
            "optim": optim,
            "steps": steps_done,
            "batch_size": spec["batch_size"],
            "samples": meter.samples,
            "real_tokens": meter.real_tokens,
            "padded_tokens": meter.padded_tokens,
            "pad_fraction": 1.0 - meter.real_tokens / max(meter.padded_tokens, 1),
            "max_seq_len": meter.max_seq_len,
            "train_seconds": train_s,
            "samples_per_s": meter.samples / train_s,
            "real_tokens_per_s": meter.real_tokens / train_s,
            "padded_tokens_per_s": meter.padded_tokens / train_s,
            "samples_per_s_after_first_step": (meter.samples - per_batch) / steady_s if steady_s else None,
            "first_step_seconds": first,
            "step_seconds": meter.step_seconds,
            "step_real_tokens": meter.step_real_tokens,
            "step_padded_tokens": meter.step_padded_tokens,
            "peak_rss_mb_at_train_end": meter.rss_at_train_end_mb,
            "peak_rss_mb_process": _peak_rss_mb(),
            "process_wall_seconds": time.perf_counter() - t_start,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "log": str(log_path),
            **extra,
        }
    except Exception as exc:
        traceback.print_exc()
        return {
            "name": spec["name"],
            "description": CONFIGS[spec["name"]],
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "log": str(log_path),
            "process_wall_seconds": time.perf_counter() - t_start,
        }
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        log.flush()


def _child_main(spec: dict[str, Any], conn: Any) -> None:
    conn.send(run_config(spec))
    conn.close()


def _run_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a freshly spawned interpreter (so ru_maxrss is that config's own)."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    process = ctx.Process(target=_child_main, args=(spec, sender), name=f"bench-{spec['name']}")
    process.start()
    sender.close()
    try:
        result: dict[str, Any] = receiver.recv()
    except EOFError:  # the child died without answering (killed, out of memory, crashed)
        process.join()
        result = {
            "name": spec["name"],
            "description": CONFIGS[spec["name"]],
            "ok": False,
            "error": f"child process exited with code {process.exitcode} without a result",
            "log": spec["log_path"],
        }
    process.join()
    # spawn + imports + model load + training (+ ours' final eval and save)
    result["wall_seconds"] = time.perf_counter() - t0
    return result


# -- parent side: data preparation, tokenization timing, reporting ----------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None) -> dict[str, Any]:
    import datasets
    import torch
    import transformers

    from finetune_flows.tasks.core.training_options import bf16_is_fast

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "torch_threads_requested": threads,
        "cuda": torch.cuda.is_available(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "bf16_fast": bf16_is_fast(),
    }


def prepare_data(args: argparse.Namespace, work: Path, model_dir: Path) -> dict[str, Any]:
    """Ingest the seeded SST-2 sample, time tokenization (first vs cached), build the per-config datasets."""
    # imported up front so the first tokenize run times tokenizing, not module imports
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    from datasets import Dataset, disable_progress_bars, load_from_disk
    from transformers import AutoTokenizer

    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
    from finetune_flows.tasks.core.tokenization import tokenize_dataset

    disable_progress_bars()
    cache_dir = work / "cache"
    t0 = time.perf_counter()
    ingest = ingest_files(
        args.train_file, None, SCENARIOS.get(SCENARIO), IngestOptions(max_train_rows=args.rows), cache_dir
    )
    ingest_s = time.perf_counter() - t0

    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        tok = tokenize_dataset(Path(ingest.dataset_dir), model_dir, ingest.data_hash, MAX_LENGTH, HEAD, cache_dir)
        runs.append((time.perf_counter() - t0, tok))
    (first_s, tok), (cached_s, tok2) = runs
    rows = tok.train_rows + tok.eval_rows
    train = load_from_disk(str(Path(tok.tokenized_dir) / "train"))
    evaluation = load_from_disk(str(Path(tok.tokenized_dir) / "eval"))
    tokenization = {
        "rows": rows,
        "train_rows": tok.train_rows,
        "eval_rows": tok.eval_rows,
        "tokens": int(sum(len(x) for x in train["input_ids"]) + sum(len(x) for x in evaluation["input_ids"])),
        "truncation_rate": tok.truncation_rate,
        "first_seconds": first_s,
        "first_rows_per_s": rows / first_s,
        "cached_seconds": cached_s,
        "cached_rows_per_s": rows / cached_s,
        "second_run_was_cached": tok2.cached,
        "ingest_seconds": ingest_s,
    }

    # ours (train_model) reads <dir>/train and <dir>/eval: the real tokenized train split, and a small
    # eval split (train_model evaluates once training is done; that is not timed, only made shorter)
    ours_dir = work / "ours_tokenized"
    train.save_to_disk(str(ours_dir / "train"))
    evaluation.shuffle(seed=SEED).select(range(min(EVAL_ROWS_FOR_OURS, len(evaluation)))).save_to_disk(
        str(ours_dir / "eval")
    )

    # pad128: the same rows tokenized the run_glue way (padding="max_length", max_length=128)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    source = Dataset.from_parquet(str(Path(ingest.dataset_dir) / "train.parquet"))

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = dict(tokenizer(batch["text"], padding="max_length", max_length=MAX_LENGTH, truncation=True))
        encoded["labels"] = batch["label_id"]
        return encoded

    padded = source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names)
    padded_dir = work / "padded128_train"
    padded.save_to_disk(str(padded_dir))
    return {
        "ingest": ingest,
        "tokenization": tokenization,
        "train_dir": str(ours_dir / "train"),
        "ours_tokenized_dir": str(ours_dir),
        "padded_train_dir": str(padded_dir),
    }


def megabatch_batches(rows: int, batch_size: int) -> int:
    """Batches per mega-batch of HF's group_by_length sampler (trainer_pt_utils.get_length_grouped_indices)."""
    return max(min(rows // (batch_size * 4), 50), 1)


def scale_bf16(results: list[dict[str, Any]]) -> None:
    """Put the short bf16 run on the full-run scale: identical batches, bf16 vs fp32 step time.

    The bf16 run's first steps are exactly the first batches of ``ours`` (same data, same sampler seed;
    checked), which group_by_length makes the longest of their mega-batch. Its own rates would therefore
    be biased low; instead its rates are ours' full-run rates times the step-time ratio on those batches.
    """
    bf16 = next((r for r in results if r["name"] == "bf16-gbl-fused" and r["ok"]), None)
    if bf16 is None:
        return
    bf16["raw"] = {k: bf16[k] for k in ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "pad_fraction")}
    for ref_name in ("ours", "dynamic-gbl"):  # ours differs from bf16-gbl-fused in precision only
        ref = next((r for r in results if r["name"] == ref_name and r["ok"]), None)
        if ref is None or ref["precision"] != "fp32":  # ours is bf16 itself where bf16 is fast
            continue
        if len(bf16["step_seconds"]) >= len(ref["step_seconds"]):
            return  # it ran the full schedule: its own figures stand
        k = min(len(bf16["step_seconds"]), len(ref["step_seconds"]))
        skip = 1 if k >= 2 else 0  # leave out the first (warm-up) step where there is more than one
        ref_s = sum(ref["step_seconds"][skip:k])
        bf16_s = sum(bf16["step_seconds"][skip:k])
        speed = ref_s / bf16_s if bf16_s > 0 else 0.0
        bf16["normalized"] = {
            "reference": ref_name,
            "steps_compared": list(range(skip + 1, k + 1)),
            "same_batches": ref["step_padded_tokens"][:k] == bf16["step_padded_tokens"][:k]
            and ref["step_real_tokens"][:k] == bf16["step_real_tokens"][:k],
            "reference_seconds": ref_s,
            "bf16_seconds": bf16_s,
            "speed_vs_reference": speed,
        }
        for key in ("samples_per_s", "real_tokens_per_s", "padded_tokens_per_s"):
            bf16[key] = ref[key] * speed
        bf16["pad_fraction"] = ref["pad_fraction"]
        return


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    tok = report["tokenization"]
    info = report["machine"]
    params = report["params"]
    configs = report["configs"]
    print()
    threads = next((c["torch_threads"] for c in configs if c["ok"]), info["torch_threads_default"])
    print(
        f"Fine-tune benchmark - {info['cpu_model']} ({info['cpu_capability']}, {info['cpu_count']} cores), "
        f"torch {info['torch']}, transformers {info['transformers']}, {threads} torch threads, "
        f"bf16_fast={info['bf16_fast']}, {info['date']}"
    )
    print(
        f"data: {params['train_rows']} SST-2 train rows (seeded sample, seed {SEED}); batch {params['batch_size']}; "
        f"{params['steps']} optimizer steps; all-MiniLM-L6-v2 + 2-label head; max_length {MAX_LENGTH}"
    )
    print()
    print(
        f"Tokenization (tokenize_dataset, {tok['rows']} rows = {tok['train_rows']} train"
        f" + {tok['eval_rows']} eval): first run {tok['first_seconds']:.2f} s"
        f" ({tok['first_rows_per_s']:,.0f} rows/s), cached run {tok['cached_seconds']:.3f} s"
        f" ({tok['cached_rows_per_s']:,.0f} rows/s)"
    )
    print()
    header = (
        f"{'config':<16}{'prec':>5}{'optim':>19}{'steps':>6}{'samples/s':>11}{'real tok/s':>12}"
        f"{'padded tok/s':>14}{'pad %':>7}{'train s':>9}{'wall s':>8}{'peak RSS MB':>13}{'x pad128':>10}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for c in configs:
        if not c["ok"]:
            print(f"{c['name']:<16} FAILED: {c['error']} (log: {c['log']})")
            continue
        ratio = c.get("samples_per_s_vs_pad128")
        mark = "*" if c["steps"] != params["steps"] else ""
        if mark:
            norm = c.get("normalized")
            raw = c["raw"]
            if norm:
                steps = norm["steps_compared"]
                same = "checked identical" if norm["same_batches"] else "NOT identical"
                span = f"s {steps[0]}-{steps[-1]}" if len(steps) > 1 else f" {steps[0]}"
                ref = norm["reference"]
                notes.append(
                    f"* {c['name']} ran {c['steps']} steps (--bf16-steps), not {params['steps']}: "
                    f"the same first batches as {ref} ({same}). Its rates and pad % are the full-run "
                    f"figures of {ref} x the bf16/fp32 step-time ratio on step"
                    f"{span} ({norm['bf16_seconds']:.1f} s vs "
                    f"{norm['reference_seconds']:.1f} s = {norm['speed_vs_reference']:.3f}x). "
                    f"Raw over its own {c['steps']} steps (the longest batches): "
                    f"{raw['samples_per_s']:.2f} samples/s, {raw['real_tokens_per_s']:,.0f} real tok/s, "
                    f"{raw['padded_tokens_per_s']:,.0f} padded tok/s. "
                    "Its train s and wall s cover its own steps only."
                )
            else:
                notes.append(
                    f"* {c['name']} ran {c['steps']} steps (--bf16-steps), not {params['steps']}, and no fp32 "
                    "group_by_length config ran to scale it by: these are raw rates over its first (longest) "
                    "batches, biased low."
                )
        print(
            f"{c['name']:<16}{c['precision']:>5}{c['optim']:>19}{str(c['steps']) + mark:>6}"
            f"{_fmt(c['samples_per_s'])!s:>11}{_fmt(c['real_tokens_per_s'], 0):>12}"
            f"{_fmt(c['padded_tokens_per_s'], 0):>14}{100 * c['pad_fraction']:>7.1f}"
            f"{c['train_seconds']:>9.1f}"
            f"{c['wall_seconds']:>8.1f}{c['peak_rss_mb_at_train_end']:>13,.0f}"
            f"{(_fmt(ratio, 2) + 'x') if ratio else '-':>10}"
        )
    print()
    mb = params["group_by_length_megabatch_batches"]
    if params["steps"] % mb or mb < 50:
        notes.append(
            f"group_by_length sorts mega-batches of {mb} batches here"
            + (" (a large dataset gets 50: padding here is higher than in a real run)" if mb < 50 else "")
            + (
                f"; {params['steps']} steps is not a whole number of mega-batches, so the group_by_length "
                "configs end on the longest batches of a mega-batch, which lowers their samples/s"
                if params["steps"] % mb
                else ""
            )
            + "."
        )
    for note in notes:
        print(textwrap.fill(note, width=110, subsequent_indent="  "))
    for line in (
        "samples/s, tok/s, train s: on_train_begin -> end of the last optimizer step (data loading included;",
        "  ours' end-of-run eval + checkpoint excluded).",
        "real tok = non-pad tokens fed (attention_mask.sum()); padded tok = all positions fed.",
        "wall s = the config's whole child process: spawn, imports, model load, training",
        "  (+ ours' eval + save). peak RSS = the child's ru_maxrss at the end of training.",
        "x pad128 = samples/s divided by pad128's samples/s.",
    ):
        print(line)
    print(f"JSON: {report['out']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="SST-2 train rows to sample (seeded) and train on. Default: max(4 x 50 x batch, steps x batch) "
        "= 6400, the smallest sample at which group_by_length uses full 50-batch mega-batches.",
    )
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per config (default 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-step batch size (default 32)")
    parser.add_argument(
        "--bf16-steps",
        type=int,
        default=10,
        help="steps for the bf16 config, which is emulated (slow) on CPUs without native bf16 (default 10)",
    )
    parser.add_argument("--skip-bf16", action="store_true", help="leave out the bf16 config")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)"
    )
    parser.add_argument("--train-file", type=Path, default=DEFAULT_TRAIN_FILE, help="SST-2 train.tsv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    if args.skip_bf16:
        args.configs = [c for c in args.configs if c != "bf16-gbl-fused"]
    if args.steps < 1 or args.batch_size < 1 or args.bf16_steps < 1:
        parser.error("--steps, --batch-size and --bf16-steps must be at least 1")
    if args.rows is None:
        args.rows = max(4 * 50 * args.batch_size, args.steps * args.batch_size)
    if args.rows < 10:
        parser.error("--rows must be at least 10")
    if not args.train_file.is_file():
        parser.error(f"training file not found: {args.train_file}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from finetune_flows.tasks.core.model_source import minilm_path

    model_dir = minilm_path()
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    logs_dir = out.parent / f"{out.stem}_logs"
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    try:
        info = machine_info(args.threads)
        print(f"preparing data ({args.rows} rows) and timing tokenization ...", flush=True)
        data = prepare_data(args, work, model_dir)
        ingest = data["ingest"]
        results = []
        for name in args.configs:
            steps = min(args.bf16_steps, args.steps) if name == "bf16-gbl-fused" else args.steps
            spec = {
                "name": name,
                "steps": steps,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "model_dir": str(model_dir),
                "id2label": {str(k): v for k, v in ingest.id2label.items()},
                "train_dir": data["train_dir"],
                "ours_tokenized_dir": data["ours_tokenized_dir"],
                "padded_train_dir": data["padded_train_dir"],
                "work_dir": str(work / f"run-{name}"),
                "log_path": str(logs_dir / f"{name}.log"),
            }
            print(f"running {name} ({steps} steps) ...", flush=True)
            result = _run_in_fresh_process(spec)
            if result["ok"]:
                print(
                    f"  {result['samples_per_s']:.1f} samples/s, {result['train_seconds']:.1f} s training, "
                    f"{result['wall_seconds']:.1f} s wall",
                    flush=True,
                )
            else:
                print(f"  FAILED: {result['error']} (log: {result['log']})", flush=True)
            results.append(result)
            shutil.rmtree(work / f"run-{name}", ignore_errors=True)  # checkpoints are ~90 MB each

        scale_bf16(results)
        base = next((r for r in results if r["name"] == BASELINE and r["ok"]), None)
        for r in results:
            if r["ok"]:
                r["samples_per_s_vs_pad128"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        report = {
            "out": str(out),
            "machine": info,
            "params": {
                "train_file": str(args.train_file),
                "train_rows": ingest.train_rows,
                "rows_requested": args.rows,
                "group_by_length_megabatch_batches": megabatch_batches(ingest.train_rows, args.batch_size),
                "steps": args.steps,
                "bf16_steps": min(args.bf16_steps, args.steps),
                "batch_size": args.batch_size,
                "max_length": MAX_LENGTH,
                "seed": SEED,
                "model_dir": str(model_dir),
                "configs": args.configs,
            },
            "tokenization": data["tokenization"],
            "configs": results,
            "total_seconds": time.perf_counter() - t_all,
        }
        out.write_text(json.dumps(report, indent=2))
        print_table(report)
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
