"""Opening a served graph on the runtime the export ladder chose for it: onnxruntime or OpenVINO.

A graph is a plain ONNX file either way. One whose metadata holds ``serving_runtime=openvino`` is
compiled by OpenVINO's CPU plugin at the stored ``inference_precision`` (``f32``, or ``bf16`` on CPUs
that have it); any other runs on onnxruntime. Both come back behind the part of onnxruntime's
``InferenceSession`` the scorers use (``run``, ``get_inputs``, ``get_outputs``, ``get_modelmeta``),
so every scorer opens its graph with ``open_session`` and never asks which runtime it got.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFilesError

RUNTIME_KEY = "serving_runtime"
PRECISION_KEY = "inference_precision"
OPENVINO = "openvino"


@dataclass(frozen=True)
class Port:
    """A graph input or output: its name and shape (symbolic dimensions as strings)."""

    name: str
    shape: list[Any]


@dataclass(frozen=True)
class ModelMeta:
    """The graph's metadata, as ``InferenceSession.get_modelmeta()`` gives it."""

    custom_metadata_map: dict[str, str] = field(default_factory=dict)


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO's CPU plugin, used like an onnxruntime session.

    ``infer`` copies results out of OpenVINO's buffers (``share_outputs=False``, its default), which the next
    request reuses; requests are serialised with a lock, as one infer request must not run twice at once.
    """

    def __init__(self, path: Path, precision: str, threads: int, inputs: list[Port], outputs: list[Port],
                 meta: ModelMeta) -> None:  # fmt: skip
        try:
            import openvino as ov
        except ImportError as exc:
            raise ModelFilesError(
                f"{path} is served on OpenVINO (metadata {RUNTIME_KEY}={OPENVINO}); install openvino to load it"
            ) from exc
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()
        self.inputs, self.outputs, self.meta = inputs, outputs, meta

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs (all when ``None``) for ``feeds``, as onnxruntime returns them."""
        names = output_names or [port.name for port in self.outputs]
        with self.lock:
            result = self.request.infer(feeds, share_outputs=False)
            return [result[self.compiled.output(name)] for name in names]

    def get_inputs(self) -> list[Port]:
        return self.inputs

    def get_outputs(self) -> list[Port]:
        return self.outputs

    def get_modelmeta(self) -> ModelMeta:
        return self.meta


def open_session(path: str | Path, threads: int = 0) -> Any:
    """A session for the graph at ``path`` on the runtime its metadata names; ``threads`` 0: the runtime's default.

    onnxruntime opens the graph in every case (serving environments need no ``onnx`` package to read its
    metadata); a graph served on OpenVINO then gets compiled there and the onnxruntime session is let go.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get(RUNTIME_KEY) != OPENVINO:
        return session
    inputs = [Port(p.name, list(p.shape)) for p in session.get_inputs()]
    outputs = [Port(p.name, list(p.shape)) for p in session.get_outputs()]
    del session
    return OpenVinoSession(Path(path), meta.get(PRECISION_KEY, "f32"), threads, inputs, outputs, ModelMeta(meta))
