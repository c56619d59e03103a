"""What registration ships with a served model: a copy of this package and pinned requirements.

A registered version is an MLflow models-from-code pyfunc (``classifier_model.py`` or
``pair_model.py``). MLflow copies each ``code_paths`` entry into the model's ``code/`` folder and
puts that folder on ``sys.path`` when it loads the model, so the copy staged by
``served_code_paths`` becomes the top-level package ``finetune_flows_serving`` there, and the model
loads and predicts in an environment with only ``SERVING_REQUIREMENTS`` installed (no
finetune-flows, no torch).

Only registration imports this module; the served model never does.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

SHIPPED_PACKAGE = "finetune_flows_serving"  # what the entry files import when a model loads (keep in sync)
SERVING_DIR = Path(__file__).resolve().parent

# What a served model imports, pinned to the versions installed here, as MLflow's inference would.
# mlflow-skinny loads pyfuncs and brings pydantic (which topics.py uses); the full mlflow would add
# the tracking server, scikit-learn and friends to every serving environment.
SERVING_REQUIREMENTS: list[str] = [
    f"{name}=={version(name)}" for name in ("mlflow-skinny", "numpy", "onnxruntime", "pandas", "tokenizers")
]


def serving_requirements(onnx_path: str | Path) -> list[str]:
    """``SERVING_REQUIREMENTS``, plus openvino where the export ladder chose to serve the graph on it."""
    import onnxruntime as ort

    from .runtime import OPENVINO, RUNTIME_KEY

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only its metadata is read
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    return SERVING_REQUIREMENTS + ([f"openvino=={version('openvino')}"] if meta.get(RUNTIME_KEY) == OPENVINO else [])


def served_code_paths(staging_dir: Path) -> list[str]:
    """Copy this package to ``staging_dir/finetune_flows_serving`` (replacing an older copy); the
    ``code_paths`` argument for ``mlflow.pyfunc.log_model``.

    Only the package's Python files travel (no ``__pycache__``). ``staging_dir`` must outlive the
    ``log_model`` call; a run's own folder is a good place.
    """
    target = Path(staging_dir) / SHIPPED_PACKAGE
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for source in sorted(SERVING_DIR.glob("*.py")):
        shutil.copy2(source, target / source.name)
    return [str(target)]
