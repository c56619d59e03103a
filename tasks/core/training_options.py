"""Training options that Trainer does not decide itself: precision, class weights, layer-wise learning rates.

bf16 autocast only where the hardware runs it fast (on an AVX2-only CPU it is emulated and slower
than fp32).

Layer-wise learning-rate decay (ULMFiT's discriminative fine-tuning, which FinBERT used too):
the layers near the output adapt most, the embeddings least. With ``L`` encoder layers and decay
``d``, encoder layer ``i`` (0-based) trains at ``lr * d ** (L - i)``, the embeddings at
``lr * d ** (L + 1)``, and everything above the encoder (pooler, classifier) at ``lr``. Which
parameters get weight decay is Trainer's own rule.
"""

from __future__ import annotations

import re
from typing import Any

from finetune_flows.tasks.core.config import Precision, TrainingConfig

LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
"""Where an encoder layer's index sits in a parameter name (BERT/RoBERTa ``encoder.layer.3.``, GPT-style ``h.3.``)."""


def bf16_is_fast() -> bool:
    """True where bf16 autocast pays: a CUDA GPU with bf16, or a CPU with native bf16 (AVX512-BF16/AMX).

    On CPUs without it (AVX2 only) bf16 matrix products are emulated and far slower than fp32.
    """
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_precision(requested: Precision) -> Precision:
    """``requested``, with auto resolved to bf16 where it is fast and fp32 elsewhere."""
    if requested is Precision.AUTO:
        return Precision.BF16 if bf16_is_fast() else Precision.FP32
    return requested


def balanced_class_weights(labels: list[int], n_classes: int) -> list[float]:
    """n_rows / (n_classes * n_rows_of_class) for each class (sklearn's "balanced")."""
    counts = [labels.count(i) for i in range(n_classes)]
    return [len(labels) / (n_classes * count) if count else 0.0 for count in counts]


def layer_depth(name: str, n_layers: int) -> int:
    """0 for embeddings, ``i + 1`` for encoder layer ``i``, ``n_layers + 1`` for what sits above the encoder."""
    found = LAYER.search(name)
    if found:
        return int(found.group(1)) + 1
    if "embed" in name:
        return 0
    return n_layers + 1


def layerwise_param_groups(
    model: Any, learning_rate: float, decay: float, weight_decay: float, decayed: set[str]
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay (module docstring).

    ``decayed`` names the parameters that get weight decay: Trainer's own choice
    (``Trainer.get_decay_parameter_names``: not biases, not normalisation weights).
    """
    n_layers = int(model.config.num_hidden_layers)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth, decays = layer_depth(name, n_layers), name in decayed
        group = groups.setdefault(
            (depth, decays),
            {
                "params": [],
                "lr": learning_rate * decay ** (n_layers + 1 - depth),
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def layerwise_optimizer(trainer: Any, config: TrainingConfig) -> Any:
    """Fused AdamW over ``layerwise_param_groups`` of the trainer's model, with the trainer's weight-decay rule."""
    import torch

    model = trainer.model
    decayed = set(trainer.get_decay_parameter_names(model))
    groups = layerwise_param_groups(model, config.learning_rate, config.layer_lr_decay, config.weight_decay, decayed)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)
