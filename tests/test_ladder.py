"""The export ladder: variants built from the fp32 graph, judged against it, and the choice of what is served.

One tiny classifier is exported once per module; its eval set's gold labels are the fp32 graph's own
predictions, so fp32 scores accuracy 1.0 and a variant's metric loss is its share of changed labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from finetune_flows.tasks.core.config import EvaluationConfig
from finetune_flows.tasks.core.evaluating import EvalRequest, evaluator_for
from finetune_flows.tasks.core.model_source import tokenizer_hash
from finetune_flows.tasks.export.ladder import Gate, Judge, Rung, best_rung, ladder_table
from finetune_flows.tasks.export.model_export import export_head
from finetune_flows.tasks.export.serving_choice import climb, dynamic_rung
from finetune_flows.tasks.export.variants import (
    FULL_RANGE,
    REDUCED_RANGE,
    UNSIGNED,
    cpu_flags,
    fuse_graph,
    openvino_graph,
    openvino_precisions,
    quantize_dynamic_graph,
    weight_matmuls,
    weight_schemes,
)
from finetune_flows.tasks.serving.classifier import OnnxTextClassifier
from finetune_flows.tasks.serving.packaging import SERVING_REQUIREMENTS, serving_requirements
from finetune_flows.tasks.serving.runtime import OpenVinoSession
from tests.test_export import review_texts

pytestmark = pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")

HEAD = "sequence-classification"
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def fp32(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ladder") / "model.onnx"
    return export_head(tiny_classifier_dir, HEAD, out, 64, tokenizer_hash(tiny_classifier_dir))


@pytest.fixture(scope="module")
def request_for(fp32: Path, tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalRequest:
    """An eval split whose gold labels are the fp32 graph's predictions."""
    folder = tmp_path_factory.mktemp("ladder-data")
    texts = review_texts(300, seed=3)
    logits = OnnxTextClassifier(fp32, tiny_classifier_dir / "tokenizer.json").logits(texts)
    ids = logits.argmax(-1)
    assert len(set(ids)) == 2  # both labels occur: agreement can tell variants apart
    pd.DataFrame({"text": texts, "label": [LABELS[i] for i in ids], "label_id": ids}).to_parquet(
        folder / "eval.parquet"
    )
    return EvalRequest(
        scenario="sentiment", head=HEAD, model_dir=str(tiny_classifier_dir), onnx_path=str(fp32),
        dataset_dir=str(folder), labels=LABELS, primary_metric="accuracy", max_length=64,
        evaluation=EvaluationConfig(), report_dir=str(folder / "report"),
    )  # fmt: skip


def judge_for(request: EvalRequest, gate: Gate) -> Judge:
    texts = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")["text"].tolist()
    evaluator = evaluator_for(HEAD)
    return Judge(
        Path(request.onnx_path), Path(request.model_dir) / "tokenizer.json", "logits", HEAD, texts,
        lambda path: evaluator.score_graph(path, request), gate, repeats=1,
    )  # fmt: skip


def test_int8_weight_layout_follows_the_cpu(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "fma", "avx512f"}
    assert weight_schemes(cpu_flags(cpuinfo)) == [REDUCED_RANGE, UNSIGNED]  # no VNNI: 7-bit or u8u8 weights
    assert weight_schemes({"avx2", "avx512_vnni"}) == [FULL_RANGE]
    assert weight_schemes({"avx2", "avx_vnni"}) == [FULL_RANGE]
    assert cpu_flags(tmp_path / "absent") == set()


def test_variants_keep_metadata_and_quantise_only_weight_matmuls(
    fp32: Path, tiny_classifier_dir: Path, tmp_path: Path
) -> None:
    fused = fuse_graph(fp32, tmp_path / "fused.onnx")
    ops = {n.op_type for n in onnx.load(str(fused)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    nodes = weight_matmuls(fused)
    int8 = quantize_dynamic_graph(fused, tmp_path / "int8.onnx", REDUCED_RANGE, nodes)
    graph = onnx.load(str(int8)).graph
    kinds = [n.op_type for n in graph.node]
    assert kinds.count("MatMulInteger") + kinds.count("QAttention") == len(nodes) > 0
    assert "QAttention" in kinds  # the fused attention's packed Q, K, V weights are quantised too
    head = [n for n in graph.node if "Gemm" in n.name]  # pooler and classifier, rewritten as MatMul + Add
    assert head and all(n.op_type in ("Gemm", "MatMul", "Add") for n in head)  # the head stays fp32
    assert "Gather" in kinds  # and so do the embeddings
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert meta == {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    scorer = OnnxTextClassifier(int8, tiny_classifier_dir / "tokenizer.json")
    assert scorer.labels == LABELS and scorer.max_length == 64


def test_gate_refuses_a_variant_that_changes_labels(request_for: EvalRequest, tmp_path: Path) -> None:
    from onnx import numpy_helper

    graph = onnx.load(request_for.onnx_path)
    weight = next(i for i in graph.graph.initializer if i.name.endswith("classifier.weight"))
    changed = numpy_helper.to_array(weight) * np.array([[-1.0], [1.0]], dtype=np.float32)  # the negative row flips
    weight.CopyFrom(numpy_helper.from_array(changed, weight.name))
    onnx.save(graph, str(tmp_path / "biased.onnx"))

    judge = judge_for(request_for, Gate())
    fp32_row = judge.rung("fp32", Path(request_for.onnx_path))
    biased_row = judge.rung("biased", tmp_path / "biased.onnx")
    assert fp32_row.passed and fp32_row.agreement == 1.0 and fp32_row.metric == 1.0
    assert not biased_row.passed and biased_row.agreement < 0.99
    assert biased_row.metric_loss == pytest.approx(1.0 - biased_row.agreement)
    fast_but_wrong = biased_row.model_copy(update={"texts_per_s_batch64": 1e9})
    assert best_rung([fp32_row, fast_but_wrong]).variant == "fp32"  # a failing variant is never served


def test_best_rung_is_the_fastest_that_passes() -> None:
    def row(name: str, speed: float, passed: bool) -> Rung:
        return Rung(
            variant=name, path=name, texts_per_s_batch1=1.0, texts_per_s_batch64=speed, agreement=1.0,
            metric=1.0, metric_loss=0.0, size_mb=1.0, passed=passed,
        )  # fmt: skip

    rows = [row("fp32", 10.0, True), row("int8", 30.0, True), row("static", 50.0, False)]
    assert best_rung(rows).variant == "int8"
    table = ladder_table(rows, "int8")
    assert [r["served"] for r in table] == [False, True, False] and table[2]["gate"] == "FAIL"


def test_fallback_keeps_the_most_sensitive_weights_in_fp32(request_for: EvalRequest, tmp_path: Path) -> None:
    strict = judge_for(request_for, Gate(min_agreement=1.0, max_metric_loss=0.0))
    fp32 = Path(request_for.onnx_path)
    nodes = weight_matmuls(fp32)
    full = strict.check(quantize_dynamic_graph(fp32, tmp_path / "full.onnx", REDUCED_RANGE, nodes))
    assert full[0] < 1.0  # all-int8 changes some label of this random model: the strict gate refuses it
    row = dynamic_rung(strict, fp32, REDUCED_RANGE, nodes, tmp_path)
    assert row.kept_fp32 > 0 and "kept in fp32" in row.note
    kinds = [n.op_type for n in onnx.load(row.path).graph.node]
    quantised = kinds.count("MatMulInteger") + kinds.count("QAttention")
    assert quantised == len(nodes) - row.kept_fp32
    assert row.passed == (row.agreement == 1.0)


def test_climb_times_every_candidate_and_fp32_always_passes(request_for: EvalRequest, tmp_path: Path) -> None:
    texts = pd.read_parquet(Path(request_for.dataset_dir) / "eval.parquet")["text"].tolist()
    fp32 = Path(request_for.onnx_path)
    rows = climb(fp32, Path(request_for.model_dir) / "tokenizer.json", HEAD, texts, request_for, Gate(), tmp_path)
    names = [r.variant for r in rows]
    assert names[:2] == ["fp32", "fused"]
    assert [n for n in names if n.startswith("int8-dynamic")] == [
        f"int8-dynamic-{s.name}" for s in weight_schemes(cpu_flags())
    ]
    assert any(n.startswith("int8-static") for n in names)
    assert [n for n in names if n.startswith("openvino")] == [f"openvino-{p}" for p in openvino_precisions()]
    assert rows[0].passed and all(r.texts_per_s_batch1 > 0 and r.texts_per_s_batch64 > 0 for r in rows)
    for row in rows:
        assert row.passed == (row.agreement >= 0.99 and row.metric_loss <= 0.003)
    assert best_rung(rows).passed


def test_an_openvino_rung_serves_the_fp32_graph_through_openvino(
    fp32: Path, tiny_classifier_dir: Path, tmp_path: Path
) -> None:
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert openvino_precisions() == (["f32", "bf16"] if "BF16" in capabilities else ["f32"])
    graph = openvino_graph(fp32, tmp_path / "openvino-f32.onnx", "f32")
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    original = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    assert meta == original | {"serving_runtime": "openvino", "inference_precision": "f32"}

    texts = review_texts(40, seed=5)
    tokenizer = tiny_classifier_dir / "tokenizer.json"
    reference = OnnxTextClassifier(fp32, tokenizer)
    served = OnnxTextClassifier(graph, tokenizer)
    assert isinstance(served.session, OpenVinoSession) and not isinstance(reference.session, OpenVinoSession)
    assert served.labels == LABELS and served.max_length == 64
    expected = reference.logits(texts, batch_size=16)
    np.testing.assert_allclose(served.logits(texts, batch_size=16), expected, atol=1e-4)
    first = served.session.run(["logits"], served.encode(texts[:8]))[0]
    served.session.run(["logits"], served.encode(texts[8:16]))  # OpenVINO reuses its output buffers
    np.testing.assert_allclose(first, reference.logits(texts[:8]), atol=1e-4)  # the first result is a copy

    assert serving_requirements(fp32) == SERVING_REQUIREMENTS
    extra = set(serving_requirements(graph)) - set(SERVING_REQUIREMENTS)
    assert len(extra) == 1 and extra.pop().startswith("openvino==")
