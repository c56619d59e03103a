"""Recommendation scoring benchmark: pairs/s of the scorers, and the wall time of ``recommend``.

Scorers, all on the same (profile, item) pairs from the leave-one-out validation split, batch
--batch-size pairs, tokenization included, interleaved pass by pass (median of --passes):

  bi-encoder-onnx   the registered pyfunc's path: the exported encoder on onnxruntime embeds the
                    profile and the item of each pair (tasks.serving.pair_scorer.PairScorerPyfunc)
  bi-encoder-torch  the same encoder in PyTorch (fp32, inference_mode), mean pooling
  cross-encoder     a BERT cross-encoder over "profile [SEP] item" (the encoder with a fresh
                    1-logit head, PyTorch fp32): the cost a re-ranker would add per pair

Then ``recommend`` (tasks.ranking.recommending.recommend_for) for every user over every item, as the
flow runs it: items embedded once, profiles embedded, one matrix product, rated items excluded.

    .venv/bin/python bench/recommend_bench.py [--data FOLDER] [--model-uri models:/recommendation@champion]

Without --model-uri the base all-MiniLM-L6-v2 encoder is exported and timed (speed does not
depend on the weights). Results go to bench/results/recommend_bench.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere (finetune_flows itself comes from the install)
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "recommend_bench.json"


def model_folder(model_uri: str | None, work: Path) -> tuple[Path, Path, Path]:
    """(HF checkpoint folder, encoder.onnx, tokenizer.json) of the model to time."""
    import mlflow

    from finetune_flows.tasks.core.model_source import minilm_path, resolve_model_source
    from finetune_flows.tasks.core.settings import get_settings
    from finetune_flows.tasks.export.model_export import export_sentence_encoder

    mlflow.set_tracking_uri(get_settings().tracking_uri)
    checkpoint = resolve_model_source(model_uri, work) if model_uri else minilm_path()
    onnx_path = export_sentence_encoder(checkpoint, work / "encoder.onnx", max_length=64)
    return checkpoint, onnx_path, checkpoint / "tokenizer.json"


def torch_scorers(checkpoint: Path, max_length: int) -> dict[str, Callable[[list[str], list[str]], Any]]:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from finetune_flows.plugins.heads.bi_encoder import embed as head_embed

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    encoder = AutoModel.from_pretrained(str(checkpoint), use_safetensors=True).eval()
    cross = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), num_labels=1).eval()

    def embed(texts: list[str]) -> Any:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return head_embed(encoder, batch["input_ids"], batch["attention_mask"])

    @torch.inference_mode()
    def bi(queries: list[str], items: list[str]) -> Any:
        return (embed(queries) * embed(items)).sum(-1).numpy()

    @torch.inference_mode()
    def cross_score(queries: list[str], items: list[str]) -> Any:
        batch = tokenizer(queries, items, padding=True, truncation=True, max_length=2 * max_length, return_tensors="pt")
        return cross(**batch).logits[:, 0].numpy()

    return {"bi-encoder-torch": bi, "cross-encoder": cross_score}


def time_scorers(
    scorers: dict[str, Callable[[list[str], list[str]], Any]],
    queries: list[str],
    items: list[str],
    batch: int,
    passes: int,
) -> dict[str, float]:
    """Median pairs/s of each scorer over ``passes`` interleaved passes."""
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(passes):
        for name, score in scorers.items():
            start = time.perf_counter()
            for i in range(0, len(queries), batch):
                score(queries[i : i + batch], items[i : i + batch])
            seconds[name].append(time.perf_counter() - start)
    return {name: len(queries) / statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="interaction folder (default: the bundled sample)")
    parser.add_argument("--model-uri", default=None)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import pandas as pd

    from finetune_flows.tasks.ranking.dataset import interaction_folder, prepare_folder
    from finetune_flows.tasks.ranking.recommending import RecommendConfig, recommend_for
    from finetune_flows.tasks.ranking.split import SplitOptions
    from finetune_flows.tasks.serving.encoder import SentenceEncoder
    from finetune_flows.tasks.serving.pair_scorer import PairScorerPyfunc

    folder = interaction_folder(str(args.data) if args.data else None, "recommendation")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_folder(folder, SplitOptions(), 5, work / "cache")
        validation, texts = data.frame("validation"), data.frame("items").set_index("item")["text"]
        pairs = [
            (p, texts[c])
            for p, cands in zip(validation["profile"], validation["candidates"], strict=True)
            for c in cands
        ]
        queries, items = [p for p, _ in pairs[: args.pairs]], [i for _, i in pairs[: args.pairs]]
        checkpoint, onnx_path, tokenizer_json = model_folder(args.model_uri, work)
        pyfunc = PairScorerPyfunc()
        pyfunc.encoder = SentenceEncoder(onnx_path, tokenizer_json)
        scorers: dict[str, Callable[[list[str], list[str]], Any]] = {
            "bi-encoder-onnx": lambda q, i: pyfunc.predict(None, pd.DataFrame({"query": q, "item": i})),
            **torch_scorers(checkpoint, 64),
        }
        pairs_per_s = time_scorers(scorers, queries, items, args.batch_size, args.passes)

        start = time.perf_counter()
        result = recommend_for(
            RecommendConfig(output_path=str(work / "lists.csv")), folder, pyfunc.encoder, args.model_uri or "base"
        )
        recommend_seconds = time.perf_counter() - start

    base = pairs_per_s["cross-encoder"]
    print(
        f"\npairs scored per second, batch {args.batch_size}, {len(queries)} validation pairs, median of {args.passes}"
    )
    print(f"{'scorer':<18}{'pairs/s':>10}{'x cross-encoder':>17}")
    for name, value in pairs_per_s.items():
        print(f"{name:<18}{value:>10.1f}{value / base:>16.2f}x")
    print(
        f"\nrecommend, all users x all items: {result.users} users x {result.candidates} items "
        f"-> {result.rows} rows in {recommend_seconds:.1f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(),
                "data": str(folder),
                "model": args.model_uri or "minilm (base)",
                "batch_size": args.batch_size,
                "pairs": len(queries),
                "pairs_per_second": pairs_per_s,
                "recommend": {
                    "users": result.users,
                    "items": result.candidates,
                    "rows": result.rows,
                    "seconds": recommend_seconds,
                },
            },
            indent=2,
        )
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
