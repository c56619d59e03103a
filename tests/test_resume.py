"""A killed training resumes (issue 11, item 1): from the last complete checkpoint, to the same weights, loading
no pickles; a checkpoint cut off mid-write is set aside, never loaded."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.checkpoints import MARKER, incomplete_reason, resume_point, write_marker
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.resuming import reopen_run, resume_config
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tracking import (
    RUN_RECORD,
    RunInfo,
    RunRecord,
    folder_in_use,
    hold_run_folder,
    release_run_folder,
)
from tests.conftest import start_script

# The training a test kills: run in a subprocess, so that SIGKILL is real. STEP_DELAY slows each step down so the
# test can kill between checkpoints; KILL_IN_SAVE_AT makes the process SIGKILL itself while it writes the
# checkpoint of that step (the model written, the optimizer state half-written, no completion marker).
TRAIN_SCRIPT = """
import json, logging, os, signal, sys, time
from pathlib import Path
from transformers import TrainerCallback
from finetune_flows.tasks.core.config import TrainingConfig
from finetune_flows.tasks.core.resumable_trainer import ResumableTrainer
from finetune_flows.tasks.core.training import train_model

logging.basicConfig(level=logging.INFO, force=True)
job = json.loads(sys.argv[1])
delay, kill_at = float(os.environ.get("STEP_DELAY", "0")), int(os.environ.get("KILL_IN_SAVE_AT", "0"))

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(delay)

save_optimizer = ResumableTrainer._save_optimizer_and_scheduler
def killed_mid_save(self, output_dir):
    if self.state.global_step == kill_at:
        Path(output_dir, "optimizer.safetensors").write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    save_optimizer(self, output_dir)
ResumableTrainer._save_optimizer_and_scheduler = killed_mid_save

result = train_model(Path(job["tokens"]), Path(job["model"]), "sequence-classification", {0: "negative", 1: "positive"},
                     TrainingConfig.model_validate(job["training"]), Path(job["run"]), "accuracy",
                     callbacks=[Slow()], resume=job["resume"])
print("RESULT", result.model_dump_json())
"""

TRAINING = dict(max_steps=12, batch_size=8, eval_every_steps=2, learning_rate=1e-3, warmup_ratio=0.1,
                early_stopping_patience=100, keep_checkpoints="all")  # fmt: skip


def start(job: dict[str, object], **env: str) -> subprocess.Popen[str]:
    return start_script(TRAIN_SCRIPT, job, **env)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_a_run_killed_twice_resumes_to_the_weights_of_an_uninterrupted_one(
    sentiment_tokens: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = {"tokens": str(sentiment_tokens), "model": str(tiny_model_dir), "training": TRAINING, "resume": False}
    finish(start({**job, "run": str(tmp_path / "straight")}))

    run = tmp_path / "killed"
    killed = start({**job, "run": str(run)}, STEP_DELAY="0.4")
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "checkpoint-4" / MARKER).is_file():  # kill -9 once step 4 is saved
        assert killed.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL and not (run / "model").exists()

    # The resume is killed in turn, while writing a checkpoint two saves later: it must not be loaded.
    cut = start({**job, "run": str(run), "resume": True}, KILL_IN_SAVE_AT="8")
    cut.communicate(timeout=300)
    assert cut.returncode == -signal.SIGKILL
    assert incomplete_reason(run / "checkpoints" / "checkpoint-8") == "no completion marker (the save was cut off)"
    assert incomplete_reason(run / "checkpoints" / "checkpoint-6") is None

    log = finish(start({**job, "run": str(run), "resume": True}))
    assert "checkpoint-8 is incomplete (no completion marker (the save was cut off)): set aside as " in log
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-6'}" in log
    assert (run / "checkpoints" / "incomplete-checkpoint-8").is_dir()  # kept for a look, never loaded

    straight, resumed = weights(tmp_path / "straight"), weights(run)
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    first = load_file(tiny_model_dir / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert not torch.equal(first, resumed["bert.embeddings.word_embeddings.weight"])  # it did train


def test_checkpoints_hold_no_pickles_and_a_finished_training_keeps_only_models(
    sentiment_tokens: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = {"tokens": str(sentiment_tokens), "model": str(tiny_model_dir), "training": {**TRAINING, "max_steps": 4},
           "resume": False, "run": str(tmp_path / "run")}  # fmt: skip
    killed = start(job, KILL_IN_SAVE_AT="4")
    killed.communicate(timeout=300)
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", MARKER, "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_state.json", "rng_state.safetensors", "scheduler.json", "tokenizer.json",
                     "tokenizer_config.json", "trainer_state.json"]  # fmt: skip

    finish(start({**job, "resume": True}))
    for step in (2, 4):  # the training finished: the resume state is gone, the models stay, still marked complete
        kept = tmp_path / "run" / "checkpoints" / f"checkpoint-{step}"
        assert sorted(p.name for p in kept.iterdir()) == ["config.json", MARKER, "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json", "trainer_state.json"]  # fmt: skip
        assert incomplete_reason(kept) is None


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_checkpoint_with_a_pickle_in_it_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "rng_state.pth").write_bytes(pickle.dumps(Exploit()))
    write_marker(folder, 2)
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint-2 holds pickle files \(rng_state.pth\): "):
        resume_point(tmp_path / "checkpoints")
    assert not (tmp_path / "pwned").exists()


def test_a_file_changed_after_the_marker_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    folders = [tmp_path / f"checkpoint-{step}" for step in (2, 4, 6)]
    for folder in folders:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        write_marker(folder, int(folder.name[11:]))
    (folders[2] / "model.safetensors").write_bytes(b"truncat")  # same size: still complete
    assert incomplete_reason(folders[2]) is None
    (folders[2] / "model.safetensors").write_bytes(b"trunc")
    (folders[1] / MARKER).unlink()
    assert incomplete_reason(folders[2]) == "model.safetensors has 5 bytes, the marker says 7"
    assert resume_point(tmp_path) == folders[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2", "incomplete-checkpoint-4", "incomplete-checkpoint-6"
    ]  # fmt: skip


def _recorded_run(runs: Path, config: FinetuneConfig) -> Path:
    run_dir = runs / "sentiment-20261201T000000Z-abcdef"
    run_dir.mkdir(parents=True)
    info = RunInfo(run_dir=str(run_dir), run_id="0" * 32, experiment_id="1", tracking_uri_redacted="sqlite:///x.db")
    record = RunRecord(run=info, config=config.model_dump(mode="json"), flow_run_ids=[])
    (run_dir / RUN_RECORD).write_text(record.model_dump_json(), encoding="utf-8")
    return run_dir


def test_resume_refuses_a_changed_config_and_a_folder_a_live_process_holds(state_dir: Path) -> None:
    config = FinetuneConfig.for_scenario("sentiment", {"training.epochs": 1})
    run_dir = _recorded_run(get_settings().runs_dir, config)
    assert resume_config(run_dir.name).resume == run_dir.name and resume_config(str(run_dir)).training.epochs == 1

    changed = config.model_copy(update={"resume": run_dir.name, "training": config.training.model_copy(
        update={"epochs": 2.0, "seed": 7})})  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"differs from the run's own in training\.epochs, training\.seed; .*only export"
    ):
        reopen_run.fn(changed)

    hold_run_folder(run_dir)  # as the process that runs it does
    assert folder_in_use(run_dir)
    with pytest.raises(ConfigError, match=r"run folder .* is in use by a live process: it cannot be resumed now"):
        reopen_run.fn(resume_config(run_dir.name))
    # What only the stages after training read may change on a resume (a failed parity gate's tolerance, say).
    looser = resume_config(run_dir.name, {"export.tolerance": 3e-4, "registration.promotion_margin": 0.01})
    assert looser.export.tolerance == 3e-4
    with pytest.raises(ConfigError, match=r"is in use by a live process"):  # past the config check
        reopen_run.fn(looser)
    release_run_folder(RunInfo.model_validate(json.loads((run_dir / RUN_RECORD).read_text())["run"]))
    assert not folder_in_use(run_dir)
