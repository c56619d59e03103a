"""LoRA adapters as a training method of every head (the ``adapter`` section of the flows' config).

With ``adapter.method=lora`` the encoder stays frozen and small low-rank matrices are trained next to
the linear layers named in ``target_modules`` (``peft``'s LoRA); the head's own new layers (its
``new_layers``, e.g. the classifier; or ``train_modules`` when given) and, on request, the LayerNorm
weights train in full. After training the adapter is saved on its own (``save_adapter``:
``adapter_model.safetensors``, ``adapter_config.json`` and ``base.json``), then merged into the
encoder (``merge_adapter``), so the trained checkpoint, its ONNX export, the parity gate and the
served model are those of a full fine-tune.

``base.json`` names the base the adapter was trained over: ``source`` (``model.source`` as given:
``minilm``, a folder, a hub id or a ``models:/`` URI) and ``weights_sha256``, a hash over the base
folder's safetensors files (their names and bytes). The hash is the identity: two bases with the
same tokenizer (the tokenizer hash) but other weights are other bases, and an adapter only fits
the weights it was trained over. Many adapters can be stored over one base by that hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.plugins.heads import new_layers
from finetune_flows.tasks.core.sections import _Frozen

logger = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"
"""The adapter's folder in the run folder, and the registered version's artifact name."""
BASE_FILE = "base.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", BASE_FILE)


class TrainingMethod(StrEnum):
    """Which weights training changes."""

    FULL = "full"
    """Every weight (a full fine-tune)."""
    LORA = "lora"
    """Low-rank adapters on the encoder's linear layers, plus the head's new layers (peft LoRA)."""


def names(value: str) -> list[str]:
    """The names of a comma-separated list, stripped; empty for an empty string."""
    return [name.strip() for name in value.split(",")] if value.strip() else []


class AdapterConfig(_Frozen):
    """How training changes the weights: all of them, or a LoRA adapter over a frozen encoder."""

    method: TrainingMethod = Field(
        default=TrainingMethod.FULL, description="full: fine-tune every weight; lora: train a LoRA adapter."
    )
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank r of the low-rank update.")
    alpha: int = Field(default=16, ge=1, le=4096, description="LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input.")
    target_modules: str = Field(
        default="query,value",
        description="Comma-separated names of the linear layers that get an adapter (e.g. query,key,value,dense).",
    )
    train_modules: str = Field(
        default="",
        description="Comma-separated names of modules trained in full. Empty: the head's own new layers "
        "(the classifier; none for the bi-encoder).",
    )
    train_layer_norm: bool = Field(default=False, description="Train the LayerNorm weights in full too.")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: str) -> str:
        listed = names(value)
        if not listed or any(not name for name in listed):
            raise ValueError(f"give one or more comma-separated linear-layer names, got {value!r}")
        return ",".join(listed)

    @field_validator("train_modules")
    @classmethod
    def _clean_train_modules(cls, value: str) -> str:
        listed = names(value)
        if any(not name for name in listed):
            raise ValueError(f"an empty name in the comma-separated list {value!r}")
        return ",".join(listed)


def module_names(model: Any, kinds: tuple[type, ...]) -> set[str]:
    """The last part of the name of every module of ``model`` that is one of ``kinds``."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and isinstance(module, kinds)}


def linear_names(model: Any) -> set[str]:
    """Names (last part) of ``model``'s linear layers: what ``target_modules`` may name."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return module_names(model, (torch.nn.Linear, Conv1D))


def trained_in_full(model: Any, head: Any, config: AdapterConfig) -> list[str]:
    """The module names peft trains in full (``modules_to_save``): the head's new layers or ``train_modules``, and
    the LayerNorms when ``train_layer_norm``; raises ConfigError for a name ``model`` does not have."""
    import torch

    chosen = names(config.train_modules) or list(new_layers(head))
    present = module_names(model, (torch.nn.Module,))
    missing = [name for name in chosen if name not in present]
    if missing:
        raise ConfigError(
            f"adapter.train_modules: {missing} not in the {head.name} model; its modules include {sorted(present)}"
        )
    if config.train_layer_norm:
        chosen += sorted(module_names(model, (torch.nn.LayerNorm,)))
    return chosen


def lora_config(model: Any, head: Any, config: AdapterConfig) -> Any:
    """peft's ``LoraConfig`` for ``model`` (built by ``head``); ConfigError names an unknown or clashing module."""
    from peft import LoraConfig

    full = trained_in_full(model, head, config)
    linear, targets = linear_names(model), names(config.target_modules)
    unknown = [name for name in targets if name not in linear]
    if unknown:
        raise ConfigError(
            f"adapter.target_modules: {unknown} is not a linear layer of the {head.name} model; "
            f"its linear layers are {sorted(linear)}"
        )
    clash = sorted(set(targets) & set(full))
    if clash:
        raise ConfigError(f"adapter.target_modules: {clash} is trained in full already (train_modules); drop one")
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        modules_to_save=full or None,
        bias="none",
    )


def wrap_with_adapter(model: Any, head: Any, config: AdapterConfig) -> Any:
    """``model`` (as ``head.build_model`` made it) with a fresh LoRA adapter: only the adapter and the modules
    trained in full require gradients. Works for any ``torch.nn.Module`` head (``task_type`` None)."""
    from peft import get_peft_model

    settings = lora_config(model, head, config)
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing``
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, settings)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(parameters that train, all parameters) of ``model``; for an adapter, the frozen copies of the modules
    trained in full count in the total."""
    trained = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trained += parameter.numel() if parameter.requires_grad else 0
    return trained, total


def merge_adapter(model: Any) -> Any:
    """The head's own model with the adapter merged into its weights (and the modules trained in full in place of
    the originals): a plain model, saved, exported and served like a fully fine-tuned one."""
    return model.merge_and_unload()


def weights_sha256(folder: Path) -> str:
    """Identity of the base weights in ``folder``: sha256 over its ``*.safetensors`` files (names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {folder}: the adapter's base cannot be named")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_adapter(model: Any, folder: Path, base_source: str, base_hash: str) -> Path:
    """Write the adapter of ``model`` (a peft model) to ``folder``: ``adapter_model.safetensors`` (the LoRA
    matrices and the modules trained in full), ``adapter_config.json`` and ``base.json`` (``source``,
    ``weights_sha256``: see the module docstring). Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base_source
    # The embeddings are never adapted: no need to look for the base's config (on the hub, for a hub id).
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing of ours in it
    base = {"source": base_source, "weights_sha256": base_hash}
    (folder / BASE_FILE).write_text(json.dumps(base, indent=2), encoding="utf-8")
    return folder


def read_base(folder: Path) -> dict[str, str]:
    """The base an adapter folder names (``source``, ``weights_sha256``)."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {folder} is not an adapter saved by finetune-flows")
    base: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return base
