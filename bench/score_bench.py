"""Batch scoring throughput: the ``score`` flow in one process and on local Dask clusters of 1 and 2 workers.

A synthetic stream of --texts texts is built from real sentences (SST-2 train and dev, Financial
PhraseBank, all agreement levels; de-duplicated, shuffled with --seed, repeated to length) and
written as one Parquet file with a row group per partition. The same texts are then scored by

  one-call        the registered pyfunc's predict on all texts at once (the monitor's single-process path)
  single-process  flow ``score`` with engine=local (partitions one after another in this process)
  dask-1x1        engine=dask, a LocalCluster of 1 worker process x 1 thread
  dask-2x1        2 worker processes x 1 thread each
  dask-1x2        1 worker process x 2 threads (one model, two partitions at a time, 2 ONNX threads)

texts/s is wall-clock over the whole scoring (cluster start, model load per worker, reading,
writing Parquet included). Every variant's labels are compared with one-call's.

The model: --model NAME[@ALIAS] in the configured MLflow store; else --onnx-model GRAPH --tokenizer
tokenizer.json registered into a temporary store; else all-MiniLM-L6-v2 with a fresh, untrained
3-class head, exported to ONNX and registered in a temporary store. Accuracy is irrelevant to
throughput; the graph has MiniLM's size and shape, which is what the figures measure.

    .venv/bin/python bench/score_bench.py --texts 5000
    .venv/bin/python bench/score_bench.py --texts 1000000 --partition-rows 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
DEFAULT_OUT = REPO / "bench" / "results" / "score_bench.json"
VARIANTS = {  # name -> engine settings
    "single-process": {"engine": "local"},
    "dask-1x1": {"engine": "dask", "workers": 1, "threads_per_worker": 1},
    "dask-2x1": {"engine": "dask", "workers": 2, "threads_per_worker": 1},
    "dask-1x2": {"engine": "dask", "workers": 1, "threads_per_worker": 2},
}


def sentences() -> list[str]:
    """SST-2 (train, dev) and Financial PhraseBank sentences, de-duplicated, in a fixed order."""
    import pandas as pd

    texts: list[str] = []
    for name in ("train.tsv", "dev.tsv"):
        texts += pd.read_csv(SHARED / "sst2" / name, sep="\t", quoting=3)["sentence"].astype(str).tolist()
    for path in sorted((SHARED / "financial_phrasebank").glob("Sentences_*.txt")):
        lines = path.read_bytes().decode("latin-1").splitlines()
        texts += [line.rsplit("@", 1)[0].strip() for line in lines if "@" in line]
    return sorted({t.strip() for t in texts if t.strip()})


def stream(n: int, seed: int) -> list[str]:
    """``n`` texts: the real sentences shuffled, repeated until there are ``n``."""
    pool = sentences()
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def register_minilm(state: Path) -> str:
    """all-MiniLM-L6-v2 with a fresh 3-class head, exported to ONNX, registered as score-bench@champion."""
    from finetune_flows.plugins import HEADS
    from finetune_flows.tasks.core.model_source import TOKENIZER_FILES, minilm_path, tokenizer_hash
    from finetune_flows.tasks.export.model_export import export_head

    checkpoint = state / "minilm-head"
    model = HEADS.get("sequence-classification").build_model(
        str(minilm_path()), {0: "negative", 1: "neutral", 2: "positive"}
    )
    model.save_pretrained(checkpoint, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).is_file():
            shutil.copy2(minilm_path() / name, checkpoint / name)
    graph = export_head(checkpoint, "sequence-classification", state / "model.onnx", 128, tokenizer_hash(checkpoint))
    return register_graph(graph, checkpoint / "tokenizer.json", state)


def register_graph(graph: Path, tokenizer: Path, state: Path) -> str:
    """Register an exported classifier graph in the store under ``state`` as score-bench@champion."""
    import mlflow

    from finetune_flows.tasks.core.settings import get_settings
    from finetune_flows.tasks.publishing.registration import ServedModel, publish_version
    from finetune_flows.tasks.publishing.stage import entry_file
    from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
    from finetune_flows.tasks.serving.packaging import served_code_paths, serving_requirements

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("score-bench", artifact_location=f"{settings.artifact_root}/score-bench")
    served = ServedModel(
        python_model=str(entry_file("sequence-classification")),
        artifacts={ONNX_ARTIFACT: str(graph), TOKENIZER_ARTIFACT: str(tokenizer)},
        code_paths=served_code_paths(state / "staged"),
        pip_requirements=serving_requirements(graph),
        input_example=["a sentence"],
    )
    run_id = client.create_run(experiment).info.run_id
    publish_version(run_id, "score-bench", served, metric=0.0, primary_metric="macro_f1", eval_hash="score-bench")
    return "score-bench@champion"


def one_call(model_uri: str, texts: list[str]) -> tuple[float, list[str]]:
    """Seconds and labels of the pyfunc's predict on all texts at once (model load included)."""
    import mlflow
    import pandas as pd

    from finetune_flows.tasks.batch.runner import resolve_version

    name, _, alias = model_uri.partition("@")
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{resolve_version(name, alias or 'champion')}")
    labels = model.predict(pd.DataFrame({"text": texts}))["label"].astype(str).tolist()
    return time.perf_counter() - started, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=5000, help="texts in the stream (default 5000)")
    parser.add_argument("--partition-rows", type=int, help="records per partition (default texts/20, 250..20000)")
    parser.add_argument("--model", help="NAME[@ALIAS] of a registered classifier in the configured store")
    parser.add_argument("--onnx-model", type=Path, help="an exported classifier graph (with --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, help="the graph's tokenizer.json")
    parser.add_argument("--variants", nargs="+", default=["one-call", *VARIANTS], help="which to run")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = args.partition_rows or min(max(args.texts // 20, 250), 20_000)

    work = Path(tempfile.mkdtemp(prefix="score-bench-"))
    if not args.model:  # a temporary store the Dask workers (started later) find through the environment
        os.environ["FINETUNE_FLOWS_STATE_DIR"] = str(work / "state")
        os.environ.pop("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))  # a fresh temporary Prefect server and database
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    import pandas as pd

    from finetune_flows.flows.cli.embedded import temporary_server
    from finetune_flows.flows.score import ScoreConfig, score
    from finetune_flows.tasks.batch.runner import read_output
    from finetune_flows.tasks.core.settings import get_settings

    if args.model:
        model, source = args.model, f"registered {args.model}"
    elif args.onnx_model:
        model, source = register_graph(args.onnx_model, args.tokenizer, work / "state"), f"graph {args.onnx_model}"
    else:
        model, source = register_minilm(work / "state"), "all-MiniLM-L6-v2 + fresh 3-class head (ONNX fp32)"
    name, _, alias = model.partition("@")

    started = time.perf_counter()
    texts = stream(args.texts, args.seed)
    table = work / "stream.parquet"
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_parquet(table, index=False, row_group_size=rows)
    print(
        f"{len(texts)} texts ({len(set(texts))} distinct) in {len(texts) // rows + bool(len(texts) % rows)} "
        f"partitions of <= {rows}; built in {time.perf_counter() - started:.1f} s; model: {source}"
    )

    results: dict[str, dict[str, Any]] = {}
    reference: list[str] | None = None
    if "one-call" in args.variants:
        seconds, reference = one_call(model, texts)
        results["one-call"] = {"seconds": seconds, "texts_per_s": len(texts) / seconds, "label_agreement": 1.0}
        print(f"  one-call        {len(texts) / seconds:8.1f} texts/s ({seconds:.1f} s)")
    with temporary_server(get_settings().prefect_home):
        for variant, engine in VARIANTS.items():
            if variant not in args.variants:
                continue
            output = work / "out" / variant
            config = ScoreConfig(
                model_name=name, alias=alias or "champion", input=str(table), output=str(output), partition_rows=rows,
                **engine,
            )  # fmt: skip
            began = time.perf_counter()
            run = score(config)
            seconds = time.perf_counter() - began
            labels = read_output(output)["label"].astype(str).tolist()
            reference = reference or labels
            agreement = sum(a == b for a, b in zip(labels, reference, strict=True)) / len(labels)
            results[variant] = {
                **engine, "seconds": seconds, "scoring_seconds": run.seconds, "texts_per_s": len(texts) / seconds,
                "parts": run.parts, "label_agreement": agreement,
            }  # fmt: skip
            print(f"  {variant:<15} {len(texts) / seconds:8.1f} texts/s ({seconds:.1f} s; labels {agreement:.2%})")

    print("\n| variant | texts/s | seconds | label agreement |\n|---|---:|---:|---:|")
    for variant, result in results.items():
        print(
            f"| {variant} | {result['texts_per_s']:.1f} | {result['seconds']:.1f} | {result['label_agreement']:.2%} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "texts": len(texts),
                "partition_rows": rows, "model": source, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "python": sys.version.split()[0], "results": results,
            },
            indent=1,
        ),
        encoding="utf-8",
    )  # fmt: skip
    print(f"written {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
