"""The token-classification head's evaluation: slot spans found by the exported graph, exactly as served, scored
against the gold spans with span-level precision, recall and F1 (strict: slot type, start and end must match).

Per slot type and micro-averaged (``span_f1``, the ``slots`` scenario's primary metric) on eval, and on
test when the prepared dataset has one (reported only). Beside the model, a dictionary baseline: every
span text seen in training (case-insensitive) tagged with its most frequent slot wherever it occurs
between word boundaries, longest first (``baseline_span_f1`` ...). The report folder holds
metrics.json (and test/metrics.json), predictions.parquet and baseline.json; a Prefect table has the
per-slot figures.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finetune_flows.tasks.classification.spans import slots_of, span_scores, token_span_scores
from finetune_flows.tasks.core.evaluating import EvalRequest, EvalResult
from finetune_flows.tasks.serving.slots import SLOTS_COLUMN, OnnxSlotTagger

logger = logging.getLogger(__name__)

Span = tuple[str, int, int]
HEADLINE = ("span_f1", "span_precision", "span_recall")
BASELINE_NAME = "dictionary baseline"
BASELINE_KEYS = tuple(f"baseline_{key}" for key in HEADLINE)


def gold_spans(frame: pd.DataFrame) -> list[list[Span]]:
    """The prepared split's ``spans`` column as lists of (slot, start, end)."""
    return [[(str(s), int(a), int(b)) for s, a, b in json.loads(cell)] for cell in frame["spans"]]


class DictionaryBaseline:
    """Span texts seen in training, each tagged with its most frequent slot, matched longest first."""

    def __init__(self, texts: list[str], spans: list[list[Span]]) -> None:
        votes: dict[str, Counter[str]] = defaultdict(Counter)
        for text, row in zip(texts, spans, strict=True):
            for slot, start, end in row:
                votes[text[start:end].lower()][slot] += 1
        # Most frequent slot per phrase (alphabetical on a tie), longest phrases first.
        self.phrases = sorted(
            ((phrase, min(c, key=lambda s: (-c[s], s))) for phrase, c in votes.items() if phrase.strip()),
            key=lambda item: (-len(item[0]), item[0]),
        )

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping matches in ``text`` that do not cut a word, longest first."""
        lowered = text.lower()
        haystack = lowered if len(lowered) == len(text) else text  # lower() may change lengths (e.g. "İ")
        taken = [False] * len(text)
        found = []
        for phrase, slot in self.phrases:
            start = haystack.find(phrase)
            while start >= 0:
                end = start + len(phrase)
                bounded = (start == 0 or not text[start - 1].isalnum()) and (
                    end == len(text) or not text[end].isalnum()
                )
                if bounded and not any(taken[start:end]):
                    taken[start:end] = [True] * (end - start)
                    found.append((slot, start, end))
                start = haystack.find(phrase, start + 1)
        return sorted(found, key=lambda s: (s[1], s[2]))


def predicted_spans(tagger: OnnxSlotTagger, texts: list[str], batch_size: int) -> list[list[Span]]:
    """The served spans of ``texts`` as (slot, start, end)."""
    return [[(s["slot"], s["start"], s["end"]) for s in row] for row in tagger.spans(texts, batch_size)]


def score_split(
    tagger: OnnxSlotTagger, frame: pd.DataFrame, slots: list[str], report_dir: Path, batch_size: int
) -> dict[str, float]:
    """Span scores of one split; metrics.json and predictions.parquet (text, gold, predicted, source) in
    ``report_dir``."""
    texts = frame["text"].tolist()
    gold, predicted = gold_spans(frame), predicted_spans(tagger, texts, batch_size)
    metrics = span_scores(gold, predicted, slots)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps({**metrics, "slots": slots}, indent=2))
    pd.DataFrame(
        {
            "text": texts,
            "gold": [json.dumps(g, ensure_ascii=False) for g in gold],
            "predicted": [json.dumps(p, ensure_ascii=False) for p in predicted],
            "correct": [sorted(g) == sorted(p) for g, p in zip(gold, predicted, strict=True)],
            "source": frame.get("source", ""),
        }
    ).to_parquet(report_dir / "predictions.parquet", index=False)
    return metrics


def baseline_scores(dataset_dir: Path, slots: list[str], splits: list[str]) -> dict[str, dict[str, float]]:
    """The dictionary baseline's span scores per split, fitted on the train split."""
    train = pd.read_parquet(dataset_dir / "train.parquet")
    baseline = DictionaryBaseline(train["text"].tolist(), gold_spans(train))
    scores = {}
    for split in splits:
        frame = pd.read_parquet(dataset_dir / f"{split}.parquet")
        scores[split] = span_scores(gold_spans(frame), [baseline.spans(t) for t in frame["text"]], slots)
    return scores


def comparison_markdown(metrics: dict[str, float], test: dict[str, float] | None) -> str:
    """The model and the baseline side by side: span F1, precision and recall on eval (and test)."""
    splits = [("eval", metrics)] + ([("test", test)] if test else [])
    header = "| model | " + " | ".join(f"{s} span F1 | {s} precision | {s} recall" for s, _ in splits) + " |"
    rows = [
        f"| {name} | " + " | ".join(" | ".join(f"{m[prefix + k]:.4f}" for k in HEADLINE) for _, m in splits) + " |"
        for name, prefix in (("fine-tuned", ""), (BASELINE_NAME, "baseline_"))
        if all(prefix + k in m for _, m in splits for k in HEADLINE)
    ]
    return "\n".join([header, "|---|" + "---|---|---|" * len(splits), *rows]) + "\n"


def publish_report(result: EvalResult, slots: list[str], rows: int, scenario: str) -> None:
    """Per-slot precision, recall, F1 and support on eval as a Prefect table; the headline and the baseline as
    Markdown."""
    metrics = result.metrics
    create_table_artifact(
        key=f"{scenario}-metrics",
        description="Per-slot span precision, recall and F1 on the eval set (strict: type, start and end)",
        table=[
            {
                "slot": slot,
                "precision": round(metrics[f"precision_{slot}"], 4),
                "recall": round(metrics[f"recall_{slot}"], 4),
                "f1": round(metrics[f"f1_{slot}"], 4),
                "support": int(metrics[f"support_{slot}"]),
            }
            for slot in slots
        ],
    )
    create_markdown_artifact(
        key=f"{scenario}-evaluation",
        description="Span-level slot filling scores",
        markdown=(
            f"### Slot spans on {rows} eval texts\n\nspan F1 **{metrics['span_f1']:.4f}** (precision "
            f"{metrics['span_precision']:.4f}, recall {metrics['span_recall']:.4f}; macro over slot types "
            f"{metrics['span_macro_f1']:.4f})\n\n{comparison_markdown(metrics, result.test_metrics)}"
        ),
    )


class SlotEvaluator:
    """Span-level precision, recall and F1 per slot type and micro-averaged, the served graph's spans against the
    gold ones; a dictionary baseline beside them."""

    headline: ClassVar[tuple[str, ...]] = HEADLINE

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """Span scores on token ranges (gold tags vs arg-max tags, special tokens and padding skipped)."""
        return token_span_scores(predictions, label_ids, labels)

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Score eval (and test, into ``report_dir/test``) with the exported graph, and the baseline on both."""
        dataset, report = Path(request.dataset_dir), Path(request.report_dir)
        slots = slots_of(request.labels)
        tagger = OnnxSlotTagger(request.onnx_path, Path(request.model_dir) / "tokenizer.json")
        batch = request.evaluation.batch_size
        eval_frame = pd.read_parquet(dataset / "eval.parquet")
        metrics = score_split(tagger, eval_frame, slots, report, batch)
        test: dict[str, float] | None = None
        splits = ["eval"]
        if (dataset / "test.parquet").is_file():
            test = score_split(tagger, pd.read_parquet(dataset / "test.parquet"), slots, report / "test", batch)
            splits.append("test")
        baseline = baseline_scores(dataset, slots, splits)
        (report / "baseline.json").write_text(json.dumps({"model": BASELINE_NAME, **baseline}, indent=2))
        metrics = {**metrics, **{f"baseline_{k}": baseline["eval"][k] for k in HEADLINE}}
        if test is not None:
            test = {**test, **{f"baseline_{k}": baseline["test"][k] for k in HEADLINE}}
        result = EvalResult(
            metrics=metrics,
            test_metrics=test,
            primary_metric=request.primary_metric,
            report_dir=str(report),
            headline=[*HEADLINE, *BASELINE_KEYS],
        )
        publish_report(result, slots, len(eval_frame), request.scenario)
        logger.info(
            "slots: eval span F1 %.4f (baseline %.4f)%s", metrics["span_f1"], metrics["baseline_span_f1"],
            f"; test span F1 {test['span_f1']:.4f} (baseline {test['baseline_span_f1']:.4f})" if test else "",
        )  # fmt: skip
        return result

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """The graph's spans on the eval texts against the gold spans."""
        tagger = OnnxSlotTagger(onnx_path, Path(request.model_dir) / "tokenizer.json")
        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        predicted = predicted_spans(tagger, frame["text"].tolist(), request.evaluation.batch_size)
        return float(span_scores(gold_spans(frame), predicted, slots_of(request.labels))[request.primary_metric])

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The champion's served spans on the same eval texts scored the same way; None when it tags other slots."""
        import mlflow

        champion = mlflow.pyfunc.load_model(model_uri)
        scorer = getattr(champion.unwrap_python_model(), "scorer", None)
        if not isinstance(getattr(scorer, "labels", None), list) or scorer.labels != request.labels:  # type: ignore[union-attr]
            logger.info(
                "champion tags %s differ from %s: not comparable", getattr(scorer, "labels", None), request.labels
            )
            return None
        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        served = champion.predict(pd.DataFrame({"text": frame["text"]}))
        predicted = [[(s["slot"], s["start"], s["end"]) for s in json.loads(cell)] for cell in served[SLOTS_COLUMN]]
        return float(span_scores(gold_spans(frame), predicted, slots_of(request.labels))[request.primary_metric])
