"""Packaging: the project builds into one wheel, ``finetune_flows``, whose subpackages are the repository's
flows/, tasks/ and plugins/ folders; installed (from the wheel, or editable as in .venv) it imports as
``finetune_flows`` only, lists its built-in plugins from entry points without heavy imports, and carries the
scenarios' data files. Built offline: the project's .venv builds the wheel, a bare venv installs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ["customer-service", "finance-monitoring", "intents-multilabel", "recommendation", "sentiment", "slots"]
DATA = "finetune_flows/plugins/scenarios/data"
DATA_FILES = [
    f"{DATA}/sst2_sample/train.tsv",
    f"{DATA}/sst2_sample/dev.tsv",
    f"{DATA}/financial_phrasebank/Sentences_50Agree.txt",
    f"{DATA}/movielens_sample/ratings.csv",
    f"{DATA}/movielens_sample/movies.csv",
    f"{DATA}/banking77_sample/train.csv",
    f"{DATA}/banking77_sample/categories.json",
    f"{DATA}/banking77_sample/answers.csv",
    f"{DATA}/nlupp_sample/banking/fold0.json",
    f"{DATA}/nlupp_sample/ontology.json",
    f"{DATA}/nlupp_sample/LICENSE",
]

# Run by an installed interpreter from a folder outside the repository: what imports, and what it pulled in.
PROBE = """
import json, sys
import finetune_flows
import finetune_flows.plugins as plugins

top_level = {}
for name in ("tasks", "flows", "plugins"):
    try:
        __import__(name)
        top_level[name] = "imported"
    except ModuleNotFoundError as exc:
        top_level[name] = type(exc).__name__
sample = plugins.SCENARIOS.get("sentiment").sample()
heavy = {"numpy", "pandas", "torch", "transformers", "prefect", "mlflow", "pydantic", "onnxruntime"}
json.dump({
    "package_path": list(finetune_flows.__path__),
    "plugins_file": plugins.__file__,
    "scenarios": plugins.SCENARIOS.names(),
    "heads": plugins.HEADS.names(),
    "top_level": top_level,
    "sample": str(sample.train),
    "sample_exists": sample.train.is_file(),
    "heavy_modules": sorted(m for m in sys.modules if m.partition(".")[0] in heavy),
}, sys.stdout)
"""


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A subprocess without this session's PYTHONPATH (so only what is installed can be imported)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def probe(python: Path, cwd: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(run([str(python), "-c", PROBE], cwd).stdout)
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built as ``pip install .`` builds it, from a copy of the working tree's files
    (tracked and new, not ignored): an in-tree build would write build/ and the egg-info into the repository."""
    work = tmp_path_factory.mktemp("packaging")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    )  # fmt: skip
    source = work / "source"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():  # a file deleted in the working tree but still in the index is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    dist = work / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
         str(source)],
        work,
    )  # fmt: skip
    (built,) = dist.glob("finetune_flows-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with nothing but the wheel (no dependencies: the probe must not need them)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], venv.parent)
    return python


def test_wheel_holds_one_package_with_its_data_and_entry_points(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        groups = archive.read(entry_points).decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"finetune_flows", entry_points.split("/")[0]}
    assert {"finetune_flows/flows/finetune.py", "finetune_flows/tasks/core/config.py"} <= set(names)
    assert {"finetune_flows/plugins/registry.py", "finetune_flows/tasks/serving/classifier_model.py"} <= set(names)
    assert set(DATA_FILES) <= set(names)
    assert not [n for n in names if n.startswith(("flows/", "tasks/", "plugins/", "tests/", "examples/"))]
    assert "[finetune_flows.scenarios]" in groups and "[finetune_flows.heads]" in groups
    assert "sentiment = finetune_flows.plugins.scenarios.sentiment:SentimentScenario" in groups
    assert "finetune-flows = finetune_flows.flows.cli.main:main" in groups


def test_installed_wheel_imports_as_finetune_flows_only(venv_python: Path, tmp_path: Path) -> None:
    found = probe(venv_python, tmp_path)
    site = venv_python.parents[1]
    assert all(Path(p).is_relative_to(site) for p in found["package_path"]), found["package_path"]
    assert Path(found["plugins_file"]).is_relative_to(site)
    assert found["scenarios"] == SCENARIOS
    assert found["heads"] == ["bi-encoder", "multi-label", "sequence-classification", "token-classification"]
    assert found["top_level"] == {"tasks": "ModuleNotFoundError", "flows": "ModuleNotFoundError",
                                  "plugins": "ModuleNotFoundError"}  # fmt: skip
    assert found["sample_exists"] and Path(found["sample"]).is_relative_to(site)
    assert found["heavy_modules"] == []
    assert (venv_python.parent / "finetune-flows").is_file()


def test_editable_install_imports_as_finetune_flows_only(tmp_path: Path) -> None:
    """The project's own .venv (an editable install), run from outside the repository."""
    found = probe(Path(sys.executable), tmp_path)
    assert Path(found["plugins_file"]) == REPO / "plugins" / "__init__.py"
    assert set(SCENARIOS) <= set(found["scenarios"])
    assert found["top_level"] == {"tasks": "ModuleNotFoundError", "flows": "ModuleNotFoundError",
                                  "plugins": "ModuleNotFoundError"}  # fmt: skip
    assert Path(found["sample"]) == REPO / "plugins" / "scenarios" / "data" / "sst2_sample" / "train.tsv"
    assert found["heavy_modules"] == []
