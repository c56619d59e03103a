"""HF Trainer whose checkpoints resume without pickles, and are marked complete when fully written.

Trainer saves the optimizer, the scheduler and the random-number states with ``torch.save`` and loads
them back with ``torch.load(weights_only=True)``: a restricted unpickler, but an unpickler all the same,
reading files anyone who can write the run folder could replace. ``ResumableTrainer`` keeps
Trainer's own resume (``train(resume_from_checkpoint=...)``: model, optimizer, scheduler, RNG, the
trainer state and stateful callbacks such as early stopping) and changes only the file formats:

- ``optimizer.safetensors`` (every state tensor) + ``optimizer.json`` (param groups, other values);
- ``scheduler.json`` (the scheduler's state dict is numbers);
- ``rng_state[_<rank>].safetensors`` (torch CPU and CUDA generator states) + ``.json`` (Python, NumPy).

The model itself is saved with safetensors as before, and Trainer's ``training_args.bin`` (a pickle
nobody reads back) is left out of checkpoints. Each checkpoint ends with the completion marker of
``finetune_flows.tasks.core.checkpoints``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from finetune_flows.tasks.core.checkpoints import refuse_pickles, write_marker

OPTIMIZER = "optimizer"
SCHEDULER = "scheduler.json"
TRAINING_ARGS = "training_args.bin"


def split_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state dict as (tensors by dotted key, everything else as JSON-ready values)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            inner_tensors, inner_rest = split_state(value, f"{name}.")
            tensors.update(inner_tensors)
            rest[str(key)] = inner_rest
        else:
            rest[str(key)] = list(value) if isinstance(value, tuple) else value
    return tensors, rest


def optimizer_state(folder: Path) -> dict[str, Any]:
    """The optimizer state dict saved by ``ResumableTrainer`` in ``folder``, for ``Optimizer.load_state_dict``."""
    saved = json.loads((folder / f"{OPTIMIZER}.json").read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in saved["state"].items()}
    for key, tensor in load_file(folder / f"{OPTIMIZER}.safetensors").items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


class ResumableTrainer(Trainer):
    """``Trainer`` with pickle-free optimizer, scheduler and RNG states, and a completion marker per checkpoint."""

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        assert self.optimizer is not None and self.lr_scheduler is not None, "train() made them"
        folder = Path(output_dir)
        tensors, rest = split_state(self.optimizer.state_dict())
        save_file(tensors, str(folder / f"{OPTIMIZER}.safetensors"))
        (folder / f"{OPTIMIZER}.json").write_text(json.dumps(rest), encoding="utf-8")
        (folder / SCHEDULER).write_text(json.dumps(self.lr_scheduler.state_dict()), encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / f"{OPTIMIZER}.json").is_file():
            return
        assert self.optimizer is not None and self.lr_scheduler is not None, "train() made them"
        folder = Path(checkpoint)
        refuse_pickles(folder)
        self.optimizer.load_state_dict(optimizer_state(folder))
        self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text(encoding="utf-8")))

    def _save_rng_state(self, output_dir: str) -> None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)  # another rank may arrive before the main one made it
        version, internal, gauss = random.getstate()
        name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
        values = {"python": [version, list(internal), gauss],
                  "numpy": [name, np.asarray(keys).tolist(), int(position), int(has_gauss), float(cached)]}  # fmt: skip
        tensors = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.random.get_rng_state_all())})
        save_file(tensors, str(folder / f"{self._rng_name()}.safetensors"))
        (folder / f"{self._rng_name()}.json").write_text(json.dumps(values), encoding="utf-8")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / f"{self._rng_name()}.json").is_file():
            return
        folder = Path(checkpoint)
        values = json.loads((folder / f"{self._rng_name()}.json").read_text(encoding="utf-8"))
        version, internal, gauss = values["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = values["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        tensors = load_file(folder / f"{self._rng_name()}.safetensors")
        torch.random.set_rng_state(tensors["cpu"])
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.random.set_rng_state_all(cuda)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # every rank's RNG file is written
        if self.args.should_save:
            (folder / TRAINING_ARGS).unlink(missing_ok=True)
            write_marker(folder, self.state.global_step)
