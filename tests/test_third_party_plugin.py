"""The plugin API from the outside: examples/finetune-flows-plugin-example installed as a user installs it
(``pip install --target``, found through its entry points on ``PYTHONPATH``), then the CLI lists its head
and scenario and a ``run`` of its scenario registers a version served by the core's ONNX classifier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import run_cli, services_environment

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune-flows-plugin-example"
HEAD, SCENARIO = "mean-pooled-classifier", "product-reviews"
LABELS = {"defect", "delivery", "praise"}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed into a folder of its own (the shared .venv is left alone)."""
    work = tmp_path_factory.mktemp("plugin")
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the working tree.
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    source = shutil.copytree(EXAMPLE, work / "source", ignore=skip)
    site = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "ffx_example" / "data" / "product_reviews" / "train.csv").is_file()
    return site


def plugin_environment(state: Path, site: Path | None, prefect_api: str | None = None) -> dict[str, str]:
    """The CLI's environment: a fresh state folder, and the installed plugin on the path when ``site`` is given."""
    env = services_environment(state, prefect_api)
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def test_cli_lists_the_plugin_only_when_installed(plugin_site: Path, tmp_path: Path) -> None:
    listed = run_cli(plugin_environment(tmp_path / "state", plugin_site), "plugins", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    heads, scenarios = listed.stdout.split("scenarios (")
    assert f"  {HEAD} " in heads and "  sequence-classification " in heads
    assert f"  {SCENARIO} " in scenarios and "  sentiment " in scenarios

    without = run_cli(plugin_environment(tmp_path / "state", None), "plugins", timeout=120)
    assert without.returncode == 0, without.stdout + without.stderr
    assert HEAD not in without.stdout and SCENARIO not in without.stdout


@pytest.mark.slow  # a full CLI run; the default suite keeps the plugin's discovery and registry checks
def test_run_registers_a_version_with_the_stage_tag(
    plugin_site: Path, tiny_model_dir: Path, state_dir: Path, prefect_harness: str
) -> None:
    result = run_cli(
        plugin_environment(state_dir, plugin_site, prefect_harness),
        "run", SCENARIO,
        "--set", f"model.source={tiny_model_dir}", "--set", "model.max_length=32",
        "--set", "training.max_steps=6", "--set", "training.eval_every_steps=3",
        "--set", "training.learning_rate=5e-3", "--set", "export.parity_samples=256",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "version          : 1" in result.stdout
    # The stage's report is printed at the end of the run: the bundled sample has 96 training rows per label.
    assert f"### Labels of {SCENARIO}" in result.stdout and "| defect | 96 | 24 |" in result.stdout

    uri = f"sqlite:///{state_dir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version(SCENARIO, "1")
    assert version.tags["head"] == HEAD and version.tags["scenario"] == SCENARIO
    assert version.tags["label_counts.train"] == "defect=96, delivery=96, praise=96"
    assert float(version.tags["onnx_max_abs_diff"]) <= 1e-4
    assert set(version.tags) >= {"eval.accuracy", "eval.macro_f1", "eval.ece"}  # the head's own evaluator ran
    assert client.get_run(version.run_id).data.metrics["label_imbalance"] == 1.0

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{SCENARIO}/1", dst_path=str(state_dir / "served")))
        model = mlflow.pyfunc.load_model(f"models:/{SCENARIO}/1")
    finally:
        mlflow.set_tracking_uri(previous)
    # The stage's served artifact ships with the model; the trained head's own files too.
    counts = json.loads((folder / "artifacts" / "label_report" / "label_counts.json").read_text())
    assert counts["eval"] == {"defect": 24, "delivery": 24, "praise": 24}
    assert (folder / "artifacts" / "model" / "mean_pooled_head.safetensors").is_file()

    scored = model.predict(["the toaster caught fire on day one", "my parcel never arrived", "a lovely kettle"])
    assert len(scored) == 3 and set(scored["label"]) <= LABELS
    assert {f"prob_{label}" for label in LABELS} <= set(scored.columns)
    assert scored[[f"prob_{label}" for label in sorted(LABELS)]].sum(axis=1).round(6).eq(1.0).all()
