"""The masked-language-model head: loaded where a checkpoint has one, else built on top of the encoder.

An encoder package such as the offline all-MiniLM-L6-v2 ships only the encoder (``BertModel``): no
MLM head. ``masked_lm_from_encoder`` then builds one the way BERT's own is made: the output
projection (decoder) shares its weight with the word embeddings (tied, one tensor), the transform
before it (dense + activation + LayerNorm) starts fresh, and the output bias starts at zero. A
head saved by an earlier ``pretrain`` run (``HEAD_FILE`` next to the encoder) is loaded instead.

``save_adapted_encoder`` writes what fine-tuning reads: the encoder alone (``AutoModel``,
safetensors, with the source's pooler where it had one) and the tokenizer files, so
``AutoModelForSequenceClassification.from_pretrained`` loads it as it loads minilm; the MLM head
goes to ``HEAD_FILE`` beside it, for a later ``pretrain`` run to continue from.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.model_source import TOKENIZER_FILES

logger = logging.getLogger(__name__)

HEAD_FILE = "mlm_head.safetensors"
"""The MLM head's weights (not the tied decoder weight: that is the word embeddings), beside the encoder."""


def has_mlm_weights(folder: Path) -> bool:
    """Whether the checkpoint in ``folder`` was saved with a masked-LM head (its architecture says so)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return any(name.endswith("ForMaskedLM") for name in config.get("architectures") or [])


def masked_lm_from_encoder(folder: Path) -> tuple[Any, bool]:
    """A masked-LM model for the checkpoint in ``folder``, and whether its head was built here (True) or loaded.

    Loaded: ``AutoModelForMaskedLM.from_pretrained`` for a checkpoint with MLM weights, or the encoder
    plus ``HEAD_FILE`` written by an earlier run. Built: the architecture's MLM model from the config, the
    encoder's weights loaded into it (every one of them, or a ``ConfigError``), the decoder tied to the
    word embeddings, a fresh transform and a zero bias."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    if has_mlm_weights(folder):
        model = AutoModelForMaskedLM.from_pretrained(str(folder))
        logger.info("MLM head: loaded with the checkpoint %s", folder)
        return model, False
    config = AutoConfig.from_pretrained(str(folder))
    try:
        model = AutoModelForMaskedLM.from_config(config)
    except ValueError as exc:
        raise ConfigError(f"model in {folder} ({config.model_type}) has no masked-LM architecture: {exc}") from exc
    encoder = AutoModel.from_pretrained(str(folder))
    missing, _unused = model.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if missing:
        raise ConfigError(f"the encoder in {folder} lacks weights the masked-LM model needs: {sorted(missing)[:5]}")
    model.tie_weights()
    head_file = folder / HEAD_FILE
    if head_file.is_file():
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(head_file)), strict=False)
        if unexpected:
            raise ConfigError(f"{head_file} holds weights the masked-LM model does not have: {sorted(unexpected)[:5]}")
        logger.info("MLM head: loaded from %s", head_file)
        return model, False
    logger.info(
        "MLM head: %s has none; built one (decoder tied to the word embeddings, fresh transform, zero bias)", folder
    )
    return model, True


def head_state(model: Any) -> dict[str, Any]:
    """The MLM head's own tensors (everything outside the encoder, except the tied decoder weight)."""
    prefix = model.base_model_prefix + "."
    # named_parameters names a shared tensor once, the encoder's name first: the tied decoder weight is left out
    return {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if not name.startswith(prefix)
    }


def save_adapted_encoder(model: Any, source_dir: Path, out_dir: Path) -> Path:
    """Write the trained encoder as ``AutoModel`` (safetensors; the source's pooler kept), the tokenizer files of
    ``source_dir`` and the MLM head (``HEAD_FILE``) into ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(source_dir))  # the source's own layout (a pooler where it had one)
    missing, unexpected = encoder.load_state_dict(model.base_model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("pooler.") for name in missing):
        raise ConfigError(f"the trained encoder does not fit {source_dir}: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(out_dir), safe_serialization=True)
    save_file(head_state(model), str(out_dir / HEAD_FILE))
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    return out_dir
