"""The candidate graphs of the export ladder, each built from the parity-checked fp32 graph.

``fused``
    onnxscript's ORT fusions on the dynamo graph: multi-head ``Attention``, ``SkipLayerNormalization``,
    ``BiasGelu`` (ORT's own ``onnxruntime.transformers`` optimizer finds none of these patterns in a
    dynamo export, which is what ``tasks.export.onnx_graph`` writes).
``int8-dynamic``
    the fused graph with the weights of its ``MatMul`` and ``Attention`` nodes in int8, per output
    channel (ORT's QAttention keeps its Q, K, V weights at 7 bits), activations quantised at run
    time. The word embeddings (``Gather``) and the head (``Gemm``) stay fp32. How the weights are
    stored follows the CPU (``weight_schemes``).
``int8-static``
    QDQ int8 with activation ranges calibrated on the scenario's own eval texts, same nodes.
``openvino-f32``, ``openvino-bf16``
    the fp32 graph itself, marked to be compiled by OpenVINO's CPU plugin at that inference precision
    (``tasks.serving.runtime``); bf16 only where OpenVINO reports the CPU can (AVX-512 BF16 or AMX).

Every variant keeps the fp32 graph's metadata (labels, ``max_length``, tokenizer hash), so the serving
scorers load it exactly like the fp32 graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class WeightScheme:
    """How int8 weights are stored: signed or unsigned, full 8 bits or 7 (``reduce_range``)."""

    name: str
    signed: bool
    reduce_range: bool


FULL_RANGE = WeightScheme("u8s8", signed=True, reduce_range=False)
REDUCED_RANGE = WeightScheme("u8s8-reduce-range", signed=True, reduce_range=True)
UNSIGNED = WeightScheme("u8u8", signed=False, reduce_range=False)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of this machine's first CPU; empty where /proc/cpuinfo is not there."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def weight_schemes(flags: set[str]) -> list[WeightScheme]:
    """The int8 weight layouts worth trying on a CPU with ``flags``.

    With VNNI (``vpdpbusd``) u8 x s8 products accumulate in int32 and full-range signed weights are
    exact. Without it (AVX2 or AVX-512 without VNNI) ``vpmaddubsw`` adds pairs of u8 x s8 products in
    int16, which saturates for large activations: the weights must lose a bit (``reduce_range``) or be
    unsigned (u8u8, a slower kernel); both are built and the ladder's gate and timing choose.
    """
    if flags & set(VNNI_FLAGS):
        return [FULL_RANGE]
    return [REDUCED_RANGE, UNSIGNED]


def copy_metadata(source: Path, target: Path) -> None:
    """Give ``target`` the metadata of ``source`` (quantisers and rewriters drop or alter it)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    graph = onnx.load(str(target))
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(target))


def fuse_graph(source: Path, target: Path) -> Path:
    """``source`` with onnxscript's ORT fusions applied, written to ``target``, then made quantisable
    (``fold_attention_weights``)."""
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    model = ir.load(str(source))
    fused, counts = ort_fusions.optimize_for_ort(model)
    ir.save(fused, str(target))
    fold_attention_weights(target)
    copy_metadata(source, target)
    logger.info("ladder: fused %s", {k: v for k, v in counts.items() if v})
    return target


def fold_attention_weights(path: Path) -> None:
    """Make the fused ``Attention`` nodes' Q, K, V weights one initializer, as ORT's quantiser needs.

    The fusion packs the three weights with a ``Concat`` of initializers (folded here into one) and
    sets ``qkv_hidden_sizes``, with which ORT's quantiser leaves the node in fp32; equal sizes are
    its default, so the attribute is dropped where they are equal. The graph computes the same.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Concat" and node.input and all(i in constants for i in node.input):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            joined = np.concatenate([numpy_helper.to_array(constants[i]) for i in node.input], axis=axis)
            graph.initializer.append(numpy_helper.from_array(joined, node.output[0]))
            continue
        if node.op_type == "Attention":
            sizes = [a for a in node.attribute if a.name == "qkv_hidden_sizes"]
            if sizes and len(set(sizes[0].ints)) == 1:
                node.attribute.remove(sizes[0])
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for node in graph.node for i in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)
    onnx.save(model, str(path))


QUANTISED_OPS = ("MatMul", "Attention")


def weight_matmuls(path: Path) -> list[str]:
    """Names of the ``MatMul`` and ``Attention`` nodes with a constant (weight) input: what int8 variants
    quantise (the head's ``Gemm`` is not among them)."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type in QUANTISED_OPS and any(i in constants for i in n.input)]


def quantize_dynamic_graph(source: Path, target: Path, scheme: WeightScheme, nodes: list[str]) -> Path:
    """Dynamic int8 of ``nodes`` (weight MatMuls of ``source``), per channel, weights as ``scheme`` says."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=list(QUANTISED_OPS),
        nodes_to_quantize=nodes,
        per_channel=True,
        reduce_range=scheme.reduce_range,
        weight_type=QuantType.QInt8 if scheme.signed else QuantType.QUInt8,
    )
    copy_metadata(source, target)
    return target


class _Calibration:
    """Batches of eval texts as graph inputs, for ``quantize_static``'s range calibration."""

    def __init__(self, batches: Iterator[dict[str, Any]]) -> None:
        self.batches = batches

    def get_next(self) -> dict[str, Any] | None:
        return next(self.batches, None)


def quantize_static_graph(
    source: Path,
    target: Path,
    scheme: WeightScheme,
    nodes: list[str],
    texts: list[str],
    make_batch: Callable[[list[str]], dict[str, Any]],
    batch_size: int = 32,
) -> Path:
    """QDQ int8 of ``nodes`` with activation ranges (min/max) calibrated on ``texts``, weights per channel."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    batches = (make_batch(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size))
    quantize_static(
        str(source),
        str(target),
        _Calibration(batches),  # duck-typed CalibrationDataReader
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTISED_OPS),
        nodes_to_quantize=nodes,
        per_channel=True,
        reduce_range=scheme.reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8 if scheme.signed else QuantType.QUInt8,
    )
    copy_metadata(source, target)
    return target


def openvino_precisions() -> list[str]:
    """OpenVINO inference precisions worth a rung here: ``f32``, plus ``bf16`` where OpenVINO's CPU plugin
    lists it among the CPU's capabilities; none where openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return []
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["f32"] + (["bf16"] if "BF16" in capabilities else [])


def openvino_graph(source: Path, target: Path, precision: str) -> Path:
    """``source`` written to ``target`` with the metadata that has it served on OpenVINO at ``precision``."""
    import onnx

    from finetune_flows.tasks.serving.runtime import OPENVINO, PRECISION_KEY, RUNTIME_KEY

    model = onnx.load(str(source))
    marks = {RUNTIME_KEY: OPENVINO, PRECISION_KEY: precision}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in marks]
    del model.metadata_props[:]
    for key, value in [*kept, *marks.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target
