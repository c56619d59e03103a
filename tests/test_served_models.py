"""Registered models load and predict where finetune-flows is not installed.

Fast: what registration ships (the serving package, self-contained) and the pair scorer's
``score_scale``. Slow: three tiny versions go through the publishing core (``publish_version``)
with the code and requirements that ``tasks.serving.packaging`` gives registration: a sentiment
classifier, the same classifier served on OpenVINO (an export-ladder rung), a classifier with a topic
encoder, and a pair scorer. A fresh venv then gets only the ``requirements.txt`` MLflow wrote next to
each MLmodel (the OpenVINO version's, which adds openvino to the others'), and must load each downloaded version with
``mlflow.pyfunc.load_model`` and predict what this venv predicts with the same version (about a
minute, most of it the venv's install from the pip cache and PyPI).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT, TOPIC_ARTIFACT
from finetune_flows.tasks.serving.errors import ModelFilesError, ModelInputError
from finetune_flows.tasks.serving.packaging import (
    SERVING_REQUIREMENTS,
    SHIPPED_PACKAGE,
    served_code_paths,
    serving_requirements,
)
from finetune_flows.tasks.serving.pair_scorer import RANKING_TABLE_ARTIFACT, PairScorerPyfunc
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TAXONOMY_FILE, TOKENIZER_FILE
from tests.conftest import NEGATIVE, POSITIVE

TEXTS = [*POSITIVE[:4], *NEGATIVE[:4], "net profit rose", "the plant will close", ""]
TAXONOMY = {  # description == example: that text scores 1.0 for its topic, the others stay below 0.999
    "threshold": 0.999,
    "topics": [
        {"name": "earnings", "description": "net profit rose", "examples": ["net profit rose"]},
        {"name": "layoffs", "description": "the plant will close", "examples": ["the plant will close"]},
    ],
}
PAIRS = {
    "query": ["Liked recently: a gorgeous , witty film", "Liked recently: cooking shows", "x", "x"],
    "item": ["a triumph of storytelling", "Pasta kitchen 3. Cooking, Food", "x", "a mess without suspense"],
}
# Model name -> the input each registered version is asked to predict.
MODELS = {
    "served-sentiment": {"text": TEXTS},
    "served-openvino": {"text": TEXTS},
    "served-finance": {"text": TEXTS},
    "served-pairs": PAIRS,
}


# -- fast: what registration ships, and the pair scorer's scale ---------------------------------------------
def test_served_code_is_the_serving_package_only(tmp_path: Path) -> None:
    stale = tmp_path / SHIPPED_PACKAGE / "removed_module.py"
    stale.parent.mkdir()
    stale.write_text("raise ImportError", encoding="utf-8")

    (staged,) = served_code_paths(tmp_path)

    assert Path(staged) == tmp_path / SHIPPED_PACKAGE
    names = {p.name for p in Path(staged).iterdir()}
    assert {"__init__.py", "classifier.py", "encoder.py", "pair_scorer.py", "topics.py", "errors.py"} <= names
    assert "removed_module.py" not in names and "__pycache__" not in names  # an older copy is replaced
    for path in Path(staged).glob("*.py"):  # the copy runs as another package, where finetune-flows is not installed
        imported = absolute_imports(path)
        if path.name.endswith("_model.py"):  # an entry file's branch for logging from the installed package
            imported = {m for m in imported if not m.startswith("finetune_flows.tasks.serving.")}
        outside = {m for m in imported if m.split(".")[0] not in SERVED_IMPORTS | sys.stdlib_module_names}
        assert not outside, f"{path.name} imports {sorted(outside)}"


SERVED_IMPORTS = {
    "numpy",
    "pandas",
    "onnxruntime",
    "openvino",  # only for a version served on OpenVINO, which then lists it in its requirements
    "tokenizers",
    "mlflow",
    "pydantic",
    "pydantic_core",
    SHIPPED_PACKAGE,
}


def absolute_imports(path: Path) -> set[str]:
    """The modules ``path`` imports by absolute name, wherever in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def mask_graph(path: Path, metadata: dict[str, str]) -> Path:
    """A stand-in encoder graph: ``embedding`` is the attention mask as floats (no model needed)."""
    from onnx import TensorProto, helper, save

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", "seq"])
    node = helper.make_node("Cast", ["attention_mask"], ["embedding"], to=TensorProto.FLOAT)
    graph = helper.make_model(
        helper.make_graph([node], "mask", inputs, [output]), opset_imports=[helper.make_opsetid("", 18)]
    )
    graph.ir_version = 9
    helper.set_model_props(graph, metadata)
    save(graph, str(path))
    return path


def pair_scorer(graph: Path, minilm_dir: Path) -> PairScorerPyfunc:
    scorer = PairScorerPyfunc()
    context = SimpleNamespace(
        artifacts={ONNX_ARTIFACT: str(graph), TOKENIZER_ARTIFACT: str(minilm_dir / "tokenizer.json")}
    )
    scorer.load_context(context)
    return scorer


def test_pair_scores_use_the_graphs_score_scale(tmp_path: Path, minilm_dir: Path) -> None:
    frame = pd.DataFrame({"query": ["x", "x y"], "item": ["x", "x y"]})  # [CLS] x [SEP]: mask . mask = 3 and 4

    for scale in (20.0, 5.0):
        scorer = pair_scorer(mask_graph(tmp_path / f"{scale}.onnx", {"score_scale": str(scale)}), minilm_dir)
        np.testing.assert_allclose(scorer.predict(None, frame)["score"], [3 * scale, 4 * scale])

    with pytest.raises(ModelInputError, match="missing column\\(s\\) item; columns found: query"):
        scorer.predict(None, frame[["query"]])


def test_a_pair_graph_without_a_usable_score_scale_is_refused(tmp_path: Path, minilm_dir: Path) -> None:
    bare = mask_graph(tmp_path / "bare.onnx", {"pooling": "mean"})
    with pytest.raises(ModelFilesError, match=r"bare\.onnx has no 'score_scale' metadata \(keys: \['pooling'\]\)"):
        pair_scorer(bare, minilm_dir)
    for bad in ("twenty", "0", "nan"):
        graph = mask_graph(tmp_path / f"{bad}.onnx", {"score_scale": bad})
        with pytest.raises(ModelFilesError, match=rf"{bad}\.onnx has score_scale '{bad}'; expected a number above 0"):
            pair_scorer(graph, minilm_dir)


# -- slow: three registered versions in a venv without finetune-flows ------------------------------------
@pytest.fixture(scope="module")
def model_dirs(
    prefect_harness: str, tiny_classifier_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    """Each of the three kinds published to a temporary MLflow store, then downloaded: name -> folder."""
    import mlflow

    from finetune_flows.tasks.core.model_source import tokenizer_hash
    from finetune_flows.tasks.export.model_export import export_head, export_sentence_encoder
    from finetune_flows.tasks.export.variants import openvino_graph
    from finetune_flows.tasks.publishing.registration import ServedModel, publish_version
    from finetune_flows.tasks.publishing.stage import entry_file  # the head's serving_entry file

    work = tmp_path_factory.mktemp("served")
    classifier_onnx = export_head(
        tiny_classifier_dir,
        "sequence-classification",
        work / "classifier.onnx",
        64,
        tokenizer_hash(tiny_classifier_dir),
    )
    encoder_onnx = export_sentence_encoder(tiny_model_dir, work / "encoder.onnx", max_length=64)  # bi-encoder head
    topics = work / "topic_encoder"  # the folder export_topic_encoder makes
    topics.mkdir()
    shutil.copy2(encoder_onnx, topics / ENCODER_FILE)
    shutil.copy2(tiny_model_dir / "tokenizer.json", topics / TOKENIZER_FILE)
    (topics / TAXONOMY_FILE).write_text(json.dumps(TAXONOMY), encoding="utf-8")
    table = work / "ranking_table.csv"
    table.write_text("method,split,ndcg_at_10\nmodel,validation,0.5\n", encoding="utf-8")

    classifier = {
        ONNX_ARTIFACT: str(classifier_onnx),
        TOKENIZER_ARTIFACT: str(tiny_classifier_dir / "tokenizer.json"),
    }
    served = {
        "served-sentiment": (entry_file("sequence-classification"), classifier),
        "served-openvino": (
            entry_file("sequence-classification"),
            {**classifier, ONNX_ARTIFACT: str(openvino_graph(classifier_onnx, work / "openvino-f32.onnx", "f32"))},
        ),
        "served-finance": (entry_file("sequence-classification"), {**classifier, TOPIC_ARTIFACT: str(topics)}),
        "served-pairs": (
            entry_file("bi-encoder"),
            {
                ONNX_ARTIFACT: str(encoder_onnx),
                TOKENIZER_ARTIFACT: str(tiny_model_dir / "tokenizer.json"),
                RANKING_TABLE_ARTIFACT: str(table),
            },
        ),
    }
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("served", artifact_location=(work / "artifacts").as_uri())
        folders = {}
        for name, (entry, artifacts) in served.items():
            example = MODELS[name]
            result = publish_version(
                client.create_run(experiment).info.run_id,
                name,
                ServedModel(
                    python_model=str(entry),
                    artifacts=artifacts,
                    code_paths=served_code_paths(work / "staged" / name),
                    pip_requirements=serving_requirements(artifacts[ONNX_ARTIFACT]),
                    input_example=example["text"][:2] if "text" in example else {k: v[:2] for k, v in example.items()},
                ),
                metric=0.5,
                primary_metric="macro_f1",
                eval_hash="served-models-test",
            )
            folders[name] = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(work / name)))
        yield folders
    finally:
        mlflow.set_tracking_uri(previous_uri)


def project_predictions(folder: Path, model_input: dict[str, list[str]]) -> pd.DataFrame:
    """What the model predicts when loaded here, where finetune-flows is installed."""
    import mlflow

    return mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame(model_input))


@pytest.fixture(scope="module")
def bare_python(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the models' own requirements.txt: the OpenVINO version's, which holds the others'."""
    requirements = {name: set((folder / "requirements.txt").read_text().split()) for name, folder in model_dirs.items()}
    assert all(lines <= requirements["served-openvino"] for lines in requirements.values()), requirements
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-r",
            str(model_dirs["served-openvino"] / "requirements.txt"),
        ],
        env=bare_environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def bare_environment() -> dict[str, str]:
    """This environment without PYTHONPATH, virtualenv or MLflow settings."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MLFLOW_")}


@pytest.mark.slow
def test_versions_ship_the_serving_copy_and_pinned_requirements(model_dirs: dict[str, Path]) -> None:
    for name, folder in model_dirs.items():
        shipped = {p.name for p in (folder / "code").iterdir()}
        assert shipped == {SHIPPED_PACKAGE}, shipped  # not the whole tasks/ tree
        assert {"classifier.py", "pair_scorer.py", "topics.py"} <= {
            p.name for p in (folder / "code" / SHIPPED_PACKAGE).glob("*.py")
        }
        lines = (folder / "requirements.txt").read_text().split()
        extra = [f"openvino=={version('openvino')}"] if name == "served-openvino" else []
        assert sorted(lines) == sorted(SERVING_REQUIREMENTS + extra)
        assert all("==" in line for line in lines)


@pytest.mark.slow
def test_versions_load_and_predict_without_finetune_flows(
    model_dirs: dict[str, Path], bare_python: Path, tmp_path: Path
) -> None:
    env = bare_environment()
    missing = subprocess.run(
        [str(bare_python), "-c", "import finetune_flows"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "No module named 'finetune_flows'" in missing.stderr, missing.stderr

    jobs = {name: (str(folder), MODELS[name], str(tmp_path / f"{name}.json")) for name, folder in model_dirs.items()}
    script = textwrap.dedent(
        """
        import json, sys
        import mlflow, pandas as pd
        for name, (folder, model_input, out) in json.loads(sys.argv[1]).items():
            predicted = mlflow.pyfunc.load_model(folder).predict(pd.DataFrame(model_input))
            predicted.to_json(out, orient="split", double_precision=15)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "finetune_flows"))
        print(json.dumps(heavy))
        """
    )
    done = subprocess.run(
        [str(bare_python), "-c", script, json.dumps(jobs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []

    for name, (folder, model_input, out) in jobs.items():
        bare = pd.read_json(out, orient="split")
        here = project_predictions(Path(folder), model_input)
        assert list(bare.columns) == list(here.columns), name
        assert len(bare) == len(here) == len(next(iter(model_input.values())))
        for column in here.columns:
            if pd.api.types.is_numeric_dtype(here[column]):
                np.testing.assert_allclose(bare[column].to_numpy(), here[column].to_numpy(), atol=1e-5, rtol=0)
            else:
                assert bare[column].tolist() == here[column].tolist(), (name, column)
    # The checks above are not vacuous: labels, topics and scores vary across the inputs.
    sentiment = project_predictions(model_dirs["served-sentiment"], MODELS["served-sentiment"])
    openvino = project_predictions(model_dirs["served-openvino"], MODELS["served-openvino"])
    assert openvino["label"].tolist() == sentiment["label"].tolist()  # f32 on OpenVINO predicts as onnxruntime
    finance = project_predictions(model_dirs["served-finance"], MODELS["served-finance"])
    pairs = project_predictions(model_dirs["served-pairs"], PAIRS)
    assert sentiment["label"].nunique() == 2, sentiment
    assert finance["topic"].tolist()[-3:] == ["earnings", "layoffs", "other"]
    assert pairs["score"].iloc[2] == pytest.approx(20.0, abs=1e-4)  # identical texts: cosine 1 times score_scale
    assert pairs["score"].nunique() == len(pairs)
