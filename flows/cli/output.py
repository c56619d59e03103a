"""What the ``finetune-flows`` commands write on stdout once a flow has finished.

``run`` and ``resume`` print the run's summary (and its reports), ``monitor`` its records and
alerts, ``recommend`` the first users' lists, ``route`` the first routes. Nothing heavy is imported
here, so the command line still lists plugins without torch.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


def write_summary(summary: Any) -> None:
    """The ``FinetuneSummary`` of a finished run, on stdout."""
    out = sys.stdout
    out.write("\n=== finetune-flows: run complete ===\n")
    out.write(f"registered model : {summary.model_name}\n")
    out.write(f"version          : {summary.version}\n")
    out.write(f"aliases          : {', '.join(summary.aliases) or 'none'}\n")
    out.write(f"promotion        : {summary.decision}\n")
    out.write(f"data             : {summary.data_summary}\n")
    if summary.splits and summary.splits != summary.data_summary:
        out.write(f"splits           : {summary.splits}\n")
    if summary.eval_note:
        out.write(f"eval figures     : {summary.eval_note}\n")
    for key, value in summary.metrics.items():
        label = f"test {key.removeprefix('test_')}" if key.startswith("test_") else f"eval {key}"
        out.write(f"{label:<17}: {value:.4f}\n")
    out.write(f"ONNX (served)    : {summary.onnx_path} ({summary.served_variant})\n")
    out.write(f"training time    : {summary.train_seconds:.0f} s\n")
    out.write(
        f"cache            : ingest {'reused' if summary.reused_ingest else 'built'}, "
        f"tokens {'reused' if summary.reused_tokens else 'built'}\n"
    )
    for report in summary.reports:
        out.write("\n" + Path(report).read_text(encoding="utf-8"))


def write_pretrain_summary(summary: Any) -> None:
    """The ``PretrainSummary`` of a finished ``pretrain`` run, on stdout."""
    out = sys.stdout
    out.write("\n=== finetune-flows: pretrain run complete ===\n")
    out.write(f"registered model : {summary.model_name} version {summary.version}\n")
    out.write(f"aliases          : {', '.join(summary.aliases) or 'none'}\n")
    out.write(f"promotion        : {summary.decision}\n")
    out.write(f"corpus           : {summary.corpus}\n")
    out.write(f"MLM head         : {'built (the checkpoint had none)' if summary.head_built else 'loaded'}\n")
    out.write(
        f"held-back loss   : {summary.loss_before:.4f} -> {summary.loss_after:.4f} "
        f"(perplexity {summary.perplexity_before:.1f} -> {summary.perplexity_after:.1f})\n"
    )
    out.write(f"training         : {summary.steps} steps, {summary.train_seconds:.0f} s\n")
    alias = "champion" if "champion" in summary.aliases else "challenger"
    out.write(f"fine-tune from it: --set model.source=models:/{summary.model_name}@{alias}\n")


def write_monitor_summary(summary: Any, config: Any) -> None:
    """The ``MonitorSummary`` of a finished ``monitor`` run, for its ``MonitorConfig``, on stdout."""
    out = sys.stdout
    out.write("\n=== finetune-flows: monitor run complete ===\n")
    out.write(f"records          : {summary.records_read} read, {summary.bad_records} bad, ")
    out.write(f"{summary.new_records} new, {summary.duplicates_skipped} already stored\n")
    out.write(f"model version    : {config.model_name} v{summary.model_version} (@{config.alias})\n")
    out.write(f"alerts           : {len(summary.alerts)}\n")
    for alert in summary.alerts:
        out.write(
            f"  ALERT {alert.topic}: negative share {alert.share:.0%} in {alert.window_start:%Y-%m-%d %H:%M}"
            f"-{alert.window_end:%H:%M} UTC ({alert.volume} texts; baseline {alert.baseline_mean:.0%})\n"
        )
    minutes = config.drift_window_minutes
    raised = set(summary.drift_raised)
    out.write(f"drift            : {summary.drift_note or f'{len(summary.drift)} window(s) judged'}\n")
    for drift in summary.drift:
        start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(minutes=drift.window * minutes)
        fired = ", ".join(drift.fired) or "none fired"
        event = " (model.drift raised)" if drift.window in raised else ""
        out.write(
            f"  {start:%Y-%m-%d %H:%M} +{minutes} min: {drift.volume} texts, embedding p {drift.embedding_p:.4f}, "
            f"prediction shift {drift.prediction_shift:.2f}: {fired}{event}\n"
        )
    out.write(f"trend plot       : {summary.trend_png}\n")
    if summary.bad_records:
        out.write(f"error report     : {summary.error_report}\n")


def write_recommendations(result: Any) -> None:
    """The first users' lists of a finished ``recommend`` run (its ``RecommendResult``), then where all of them are."""
    frame = _read_lists(result.output_path)
    for user, group in list(frame.groupby("user", sort=False))[:5]:
        sys.stdout.write(f"user {user}:\n")
        for row in group.itertuples():
            sys.stdout.write(f"  {row.rank:>3}. {row.score:6.2f}  {row.text}\n")
    sys.stdout.write(f"{result.rows} rows for {result.users} users from {result.model_uri} -> {result.output_path}\n")


def _read_lists(path: str) -> Any:
    """The lists `recommend` wrote (CSV or Parquet)."""
    import pandas as pd

    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype={"user": str, "item": str})


ROUTES_SHOWN = 10


def write_routes(result: Any) -> None:
    """The first routes of a finished ``route`` run (its ``RouteResult``): route, confidence, intent, message and
    reply; then how many messages were handed off and where all the routes are."""
    out = sys.stdout
    out.write("\n=== finetune-flows: route complete ===\n")
    for row in result.first[:ROUTES_SHOWN]:
        intent = row.intent if row.route == "intent" else f"({row.intent})"  # handoff: the closest intent
        link = f" [{row.link}]" if row.link else ""
        out.write(f"{row.route:<8} {row.confidence:.3f}  {intent:<28} {_short(row.text, 50)!r}\n")
        out.write(f"{'':<16}-> {_short(row.reply, 300)}{link}\n")
        if row.intents or row.slots not in ("", "[]"):
            out.write(f"{'':<16}   intents: {row.intents or '-'}  slots: {_slots(row.slots)}\n")
    if result.rows > ROUTES_SHOWN:
        out.write(f"... {result.rows - ROUTES_SHOWN} more\n")
    out.write(
        f"{result.rows} messages, {result.handoffs} handed off, routed by "
        f"{', '.join([result.model_uri, *result.also_routed_by])} -> {result.output_path}\n"
    )


def _slots(slots: str) -> str:
    """A route's ``slots`` JSON as ``slot=text`` pairs; ``-`` for none."""
    found = json.loads(slots) if slots else []
    return ", ".join(f"{s['slot']}={s['text']!r}" for s in found) or "-"


def _short(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
