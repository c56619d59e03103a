"""Which checkpoints a killed training can resume from: the completion marker, and folders never to load.

Every checkpoint the training stage writes (``ResumableTrainer``) ends with a marker file,
``finetune-flows-complete.json``, naming each file in the folder with its size; it is written last,
atomically (a temporary name, then ``os.replace``). A folder without a marker, or whose files no
longer match it, was cut off by the kill: ``resume_point`` moves it aside (``incomplete-checkpoint-N``,
so Trainer's rotation and a later save of the same step never touch it) and resumes from the newest
complete one. A checkpoint that holds pickle files (``*.pt``, ``*.pth``, ``*.bin``, ``*.pkl``) was not
written by finetune-flows, and is refused: model weights load from safetensors, and the optimizer,
scheduler and random-number states from safetensors and JSON.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.core.housekeeping import checkpoint_folders

logger = logging.getLogger(__name__)

MARKER = "finetune-flows-complete.json"
RESUME_STATE = ("optimizer.", "scheduler.", "rng_state")
"""Name prefixes of the files that only serve a resume (``resumable_trainer`` writes them)."""
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle"})


def write_marker(folder: Path, step: int) -> Path:
    """Mark ``folder`` complete: every file in it with its size, written last and atomically."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    marker = folder / MARKER
    partial = folder / f".{MARKER}.partial"
    partial.write_text(json.dumps({"step": step, "files": files}, indent=2), encoding="utf-8")
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, marker)
    return marker


def incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (no marker, a missing or resized file), or None when it is complete."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no completion marker (the save was cut off)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable completion marker ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker says {size}"
    return None


def refuse_pickles(folder: Path) -> None:
    """Raise ConfigError when ``folder`` holds a pickle file: finetune-flows loads checkpoints from safetensors only."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"checkpoint {folder} holds pickle files ({', '.join(pickles)}): finetune-flows never loads pickles "
            "(a pickle can run code); this checkpoint was not written by finetune-flows -- remove it to resume "
            "from an earlier one"
        )


def set_aside(folder: Path) -> Path:
    """Rename ``folder`` to ``incomplete-<name>`` (with a number when that is taken); never deleted, never loaded."""
    target = folder.with_name(f"incomplete-{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"incomplete-{folder.name}-{n}")
    folder.rename(target)
    return target


def resume_point(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under ``checkpoints`` (None: none); incomplete ones are set aside first."""
    complete: list[Path] = []
    for folder in checkpoint_folders(checkpoints):
        reason = incomplete_reason(folder)
        if reason is None:
            complete.append(folder)
            continue
        moved = set_aside(folder)
        logger.warning("%s is incomplete (%s): set aside as %s, not loaded", folder.name, reason, moved.name)
    if not complete:
        return None
    refuse_pickles(complete[-1])
    return complete[-1]


def drop_resume_state(checkpoints: Path) -> int:
    """Remove the optimizer, scheduler and RNG states from the complete checkpoints of a finished training (they
    only serve a resume), keeping their models; re-marks each folder. Returns the bytes freed."""
    freed = 0
    for folder in checkpoint_folders(checkpoints):
        if incomplete_reason(folder) is not None:
            continue
        state = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(RESUME_STATE)]
        for path in state:
            freed += path.stat().st_size
            path.unlink()
        if state:
            write_marker(folder, int(folder.name.rsplit("-", 1)[1]))
    return freed
