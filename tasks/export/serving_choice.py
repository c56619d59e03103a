"""Stage ``export-ladder``, for any head: build the faster variants of the parity-checked graph, judge them, and
choose the one the registered model serves (see ``tasks.export.ladder``).

Every variant, its row of the table and the table itself go to the MLflow run (artifact folder
``onnx_ladder``, metrics ``ladder.<variant>.*``) and to a Prefect table artifact; the version is tagged
with the served variant and the CPU flags its int8 weights were laid out for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.core.config import ExportConfig, ServedGraph
from finetune_flows.tasks.core.evaluating import EvalRequest, evaluator_for
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.export.ladder import Gate, Judge, Rung, best_rung, ladder_table
from finetune_flows.tasks.export.model_export import parity_texts
from finetune_flows.tasks.export.onnx_graph import serving_inputs
from finetune_flows.tasks.export.variants import (
    VNNI_FLAGS,
    WeightScheme,
    cpu_flags,
    fuse_graph,
    openvino_graph,
    openvino_precisions,
    quantize_dynamic_graph,
    quantize_static_graph,
    weight_matmuls,
    weight_schemes,
)

logger = logging.getLogger(__name__)

LADDER_DIR = "onnx_ladder"
MAX_KEPT_SHARE = 0.5
"""The fallback keeps at most this share of the weight MatMuls in fp32 before giving a variant up."""


class LadderResult(BaseModel):
    """Which graph is served and the table that chose it."""

    model_config = ConfigDict(frozen=True)

    served_variant: str
    served_path: str
    rows: list[Rung] = Field(default_factory=list)
    int8_layout: str = ""
    """The CPU features the int8 weights were laid out for ("vnni" or "no-vnni")."""


def dynamic_rung(judge: Judge, base: Path, scheme: WeightScheme, nodes: list[str], folder: Path) -> Rung:
    """Dynamic int8 of ``base``; when it fails the gate, the most sensitive weights go back to fp32 one by one."""
    name = f"int8-dynamic-{scheme.name}"
    target = folder / f"{name}.onnx"

    def build(chosen: list[str], path: Path) -> Path:
        return quantize_dynamic_graph(base, path, scheme, chosen)

    checked = judge.check(build(nodes, target))
    kept = 0
    if not checked[3]:
        order = judge.sensitivity(build, nodes, folder / "single-node.onnx")
        (folder / "single-node.onnx").unlink(missing_ok=True)
        for kept in range(1, int(len(nodes) * MAX_KEPT_SHARE) + 1):
            checked = judge.check(build(order[kept:], target))
            if checked[3]:
                break
    note = f"{kept} most sensitive of {len(nodes)} weight nodes kept in fp32" if kept else ""
    return judge.rung(name, target, kept, note, checked)


def openvino_rung(judge: Judge, fp32: Path, precision: str, folder: Path) -> Rung:
    """The fp32 graph compiled by OpenVINO at ``precision`` (it reads the ONNX file itself)."""
    variant = f"openvino-{precision}"
    return judge.rung(variant, openvino_graph(fp32, folder / f"{variant}.onnx", precision))


def static_rung(
    judge: Judge,
    base: Path,
    scheme: WeightScheme,
    nodes: list[str],
    folder: Path,
    make_batch: Callable[[list[str]], dict[str, Any]],
) -> Rung:
    """Static int8 of ``base``, its activation ranges calibrated on the judge's eval texts."""
    target = folder / f"int8-static-{scheme.name}.onnx"
    return judge.rung(target.stem, quantize_static_graph(base, target, scheme, nodes, judge.texts, make_batch))


def climb(
    fp32: Path, tokenizer: Path, head: str, texts: list[str], request: EvalRequest, gate: Gate, folder: Path
) -> list[Rung]:
    """Build, time and judge every candidate in ``folder``; the fp32 row first."""
    folder.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator_for(head)
    output = HEADS.get(head).export_output
    judge = Judge(fp32, tokenizer, output, head, texts, lambda path: evaluator.score_graph(path, request), gate)
    fused = attempt("fused", partial(judge.rung, "fused", fuse_graph(fp32, folder / "fused.onnx")))
    rows = [judge.rung("fp32", fp32), fused]
    for precision in openvino_precisions():
        rows.append(attempt(f"openvino-{precision}", partial(openvino_rung, judge, fp32, precision, folder)))
    base = Path(fused.path) if fused.passed else fp32
    nodes = weight_matmuls(base)
    if not nodes:
        return rows
    _, make_batch = serving_inputs(base, tokenizer, output)
    for scheme in weight_schemes(cpu_flags()):
        rows.append(attempt(f"int8-dynamic-{scheme.name}", partial(dynamic_rung, judge, base, scheme, nodes, folder)))
        static = partial(static_rung, judge, base, scheme, nodes, folder, make_batch)
        rows.append(attempt(f"int8-static-{scheme.name}", static))
    return rows


def attempt(variant: str, build: Callable[[], Rung]) -> Rung:
    """``build()``'s row, or a failing row naming the error: a variant that cannot be built is not served."""
    try:
        return build()
    except Exception as exc:  # a quantiser or rewriter that cannot handle this graph must not fail the run
        logger.warning("export ladder: variant %s not built: %s: %s", variant, type(exc).__name__, exc)
        return Rung(
            variant=variant, path="", texts_per_s_batch1=0.0, texts_per_s_batch64=0.0, agreement=0.0, metric=0.0,
            metric_loss=0.0, size_mb=0.0, passed=False, note=f"not built: {type(exc).__name__}: {exc}"[:300],
        )  # fmt: skip


def log_ladder(rows: list[Rung], served: Rung, folder: Path, run: RunInfo, layout: str) -> None:
    """The table to ``ladder.json``, Prefect and the MLflow run (with every variant's graph)."""
    import mlflow

    table = ladder_table(rows, served.variant)
    (folder / "ladder.json").write_text(json.dumps({"int8_layout": layout, "rows": table}, indent=2))
    create_table_artifact(
        key="export-ladder",
        table=table,
        description=f"Graphs timed on this CPU ({layout}) and gated against fp32; served: {served.variant}",
    )
    mlflow.set_tracking_uri(run.tracking_uri())
    with mlflow.start_run(run_id=run.run_id):
        for row in rows:
            mlflow.log_metrics(
                {
                    f"ladder.{row.variant}.texts_per_s_b1": row.texts_per_s_batch1,
                    f"ladder.{row.variant}.texts_per_s_b64": row.texts_per_s_batch64,
                    f"ladder.{row.variant}.agreement": row.agreement,
                    f"ladder.{row.variant}.metric_loss": row.metric_loss,
                }
            )
        mlflow.set_tags({"export.served_variant": served.variant, "export.int8_layout": layout})
        mlflow.log_artifacts(str(folder), artifact_path=LADDER_DIR)


@task(name="export-ladder")
def choose_served_graph(request: EvalRequest, export: ExportConfig, run: RunInfo) -> LadderResult:
    """The graph to serve: fp32 when ``export.served`` says so, else the fastest variant that passes the gate."""
    if export.served is ServedGraph.FP32:
        return LadderResult(served_variant="fp32", served_path=request.onnx_path)
    fp32 = Path(request.onnx_path)
    folder = fp32.parent / "ladder"
    texts = parity_texts(Path(request.dataset_dir), export.ladder_texts, HEADS.get(request.head).text_columns)
    gate = Gate(
        min_agreement=export.min_agreement, min_cosine=export.min_cosine, max_metric_loss=export.max_metric_loss
    )
    tokenizer = Path(request.model_dir) / "tokenizer.json"
    rows = climb(fp32, tokenizer, request.head, texts, request, gate, folder)
    served = best_rung(rows)
    layout = "vnni" if cpu_flags() & set(VNNI_FLAGS) else "no-vnni"
    log_ladder(rows, served, folder, run, layout)
    logger.info(
        "export ladder: serving %s (%.0f texts/s at batch 64, fp32 %.0f)",
        served.variant, served.texts_per_s_batch64, rows[0].texts_per_s_batch64,
    )  # fmt: skip
    return LadderResult(served_variant=served.variant, served_path=served.path, rows=rows, int8_layout=layout)
