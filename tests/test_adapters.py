"""LoRA adapters as a training method of every head (issue 13): only the adapter and the head's new layers train,
the merged model is a plain checkpoint that exports and passes the parity gate, the registered version keeps the
adapter and names its base, and a killed LoRA run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.models import Model
from safetensors.torch import load_file

from finetune_flows.flows.finetune import finetune
from finetune_flows.plugins import HEADS, ConfigError
from finetune_flows.tasks.core.adapters import (
    ADAPTER_FILES,
    AdapterConfig,
    TrainingMethod,
    merge_adapter,
    read_base,
    save_adapter,
    trainable_parameters,
    weights_sha256,
    wrap_with_adapter,
)
from finetune_flows.tasks.core.checkpoints import MARKER
from finetune_flows.tasks.core.config import FinetuneConfig
from tests.conftest import start_script
from tests.test_flow import config_for, files  # noqa: F401  (files: the flow tests' fixture)

LORA = AdapterConfig(method=TrainingMethod.LORA)
LABELS = {0: "negative", 1: "positive"}


def batch_for(head_name: str) -> dict[str, torch.Tensor]:
    """A random batch of 4 texts of 8 tokens in the shape ``head_name``'s model takes, with labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 8), generator=generator)
    mask = torch.ones_like(ids)
    if head_name == "bi-encoder":
        items = torch.randint(1000, 2000, (4, 8), generator=generator)
        return {"query_input_ids": ids, "query_attention_mask": mask, "item_input_ids": items,
                "item_attention_mask": mask}  # fmt: skip
    labels = {
        "sequence-classification": torch.tensor([0, 1, 0, 1]),
        "token-classification": torch.randint(0, 2, (4, 8), generator=generator),
        "multi-label": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
    }[head_name]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encoder_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the pretrained encoder inside ``model`` (a head's model, adapted or not), by plain name."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name or "classifier" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        weights[plain] = tensor.detach().clone()
    return weights


@pytest.mark.parametrize("head_name", ["sequence-classification", "token-classification", "multi-label", "bi-encoder"])
def test_lora_trains_only_the_adapter_and_the_new_layers_and_merges(head_name, tiny_model_dir, tmp_path) -> None:
    head = HEADS.get(head_name)
    torch.manual_seed(0)
    model = head.build_model(str(tiny_model_dir), LABELS)
    base = encoder_weights(model)
    adapted = wrap_with_adapter(model, head, LORA)
    trained, total = trainable_parameters(adapted)
    assert 0 < trained < total / 10
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    new_layers = [n for n in names if "lora_" not in n]
    assert all(".modules_to_save." in n and ".classifier." in n for n in new_layers), new_layers
    assert bool(new_layers) == (head_name != "bi-encoder")  # the bi-encoder adds no layer of its own
    classifier = {n: p.detach().clone() for n, p in adapted.named_parameters() if n in new_layers}

    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    for _ in range(3):
        optimizer.zero_grad()
        adapted(**batch_for(head_name))["loss"].backward()
        optimizer.step()
    adapted.eval()

    now = encoder_weights(adapted)
    assert now.keys() == base.keys()
    assert all(torch.equal(now[name], base[name]) for name in base)  # the encoder is frozen until the merge
    changed = dict(adapted.named_parameters())
    assert all(not torch.equal(changed[n], classifier[n]) for n in new_layers)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in changed.items() if "lora_B" in n)  # B starts at 0

    save_adapter(adapted, tmp_path / "adapter", "tiny", weights_sha256(tiny_model_dir))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(ADAPTER_FILES)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k or "classifier" in k for k in saved) and sum(t.numel() for t in saved.values()) <= trained
    assert read_base(tmp_path / "adapter") == {"source": "tiny", "weights_sha256": weights_sha256(tiny_model_dir)}

    inputs = {k: v for k, v in batch_for(head_name).items() if k != "labels"}
    with torch.no_grad():
        before = adapted(**inputs)["logits"]
    merged = merge_adapter(adapted)
    assert type(merged) is type(model)  # the head's own model: saved, exported and served as before
    with torch.no_grad():
        assert torch.allclose(merged(**inputs)["logits"], before, atol=1e-5)
    after = encoder_weights(merged)
    assert after.keys() == base.keys()
    differ = {name for name in base if not torch.equal(after[name], base[name])}
    assert differ and all(".query." in n or ".value." in n for n in differ), sorted(differ)

    out = tmp_path / "model"
    out.mkdir()
    head.save_trained(merged, tiny_model_dir, out)
    if head_name != "bi-encoder":  # the saved checkpoint is what export loads, with the trained classifier in it
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            assert torch.allclose(head.export_module(out)(ids, mask), merged(**inputs)["logits"], atol=1e-5)


def test_lora_options_are_checked(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match=r"adapter\.rank: Input should be greater than or equal to 1"):
        FinetuneConfig.for_scenario("sentiment", {"adapter.method": "lora", "adapter.rank": 0})
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: .*one or more comma-separated"):
        FinetuneConfig.for_scenario("sentiment", {"adapter.target_modules": " , "})
    config = FinetuneConfig.for_scenario("sentiment", {"adapter.method": "lora", "adapter.target_modules": "query, a"})
    assert config.adapter.target_modules == "query,a"  # an unknown name is found when the model is built

    head = HEADS.get("sequence-classification")
    model = head.build_model(str(tiny_model_dir), LABELS)
    with pytest.raises(ConfigError, match=r"\['qkv'\] is not a linear layer .* are \['classifier', 'dense', 'key', "
                       r"'query', 'value'\]"):  # fmt: skip
        wrap_with_adapter(model, head, LORA.model_copy(update={"target_modules": "query,qkv"}))
    with pytest.raises(ConfigError, match=r"train_modules: \['scorer'\] not in the sequence-classification model"):
        wrap_with_adapter(model, head, LORA.model_copy(update={"train_modules": "scorer"}))
    with pytest.raises(ConfigError, match=r"\['classifier'\] is trained in full already"):
        wrap_with_adapter(model, head, LORA.model_copy(update={"target_modules": "query,classifier"}))

    with_norms = wrap_with_adapter(model, head, LORA.model_copy(update={"train_layer_norm": True, "rank": 4}))
    trained = [n for n, p in with_norms.named_parameters() if p.requires_grad]
    assert any("LayerNorm.modules_to_save" in n for n in trained)
    without = wrap_with_adapter(
        head.build_model(str(tiny_model_dir), LABELS), head, LORA.model_copy(update={"rank": 4})
    )
    assert trainable_parameters(with_norms)[0] > trainable_parameters(without)[0]


@pytest.mark.usefixtures("prefect_harness")
def test_a_lora_run_exports_passes_parity_and_registers_its_adapter(state_dir, tiny_model_dir, files) -> None:  # noqa: F811
    config = config_for(tiny_model_dir, files, max_steps=10).model_copy(update={"adapter": LORA})
    summary = finetune(config)
    assert Path(summary.onnx_path).is_file()  # the merged model exported and passed the parity gate

    client = mlflow.MlflowClient()
    version = client.get_model_version("sentiment", summary.version)
    assert version.tags["adapter.method"] == "lora" and version.tags["adapter.base"] == str(tiny_model_dir)
    assert float(version.tags["onnx_max_abs_diff"]) <= config.export.tolerance
    local = Path(mlflow.artifacts.download_artifacts(f"models:/sentiment/{summary.version}"))
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    adapter = local / artifacts["adapter"]["path"]
    assert sorted(p.name for p in adapter.iterdir()) == sorted(ADAPTER_FILES)
    assert read_base(adapter) == {"source": str(tiny_model_dir), "weights_sha256": weights_sha256(tiny_model_dir)}
    merged = load_file(local / artifacts["hf_model"]["path"] / "model.safetensors")
    first = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(merged["bert.encoder.layer.0.attention.self.query.weight"],
                           first["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    assert torch.equal(merged["bert.encoder.layer.0.attention.self.key.weight"],
                       first["encoder.layer.0.attention.self.key.weight"])  # fmt: skip

    full = finetune(config_for(tiny_model_dir, files, max_steps=1))
    tags = client.get_model_version("sentiment", full.version).tags
    assert tags["adapter.method"] == "full" and "adapter.base" not in tags
    local = Path(mlflow.artifacts.download_artifacts(f"models:/sentiment/{full.version}"))
    assert "adapter" not in Model.load(str(local)).flavors["python_function"]["artifacts"]


# A LoRA training that a test kills (a subprocess, so that SIGKILL is real); STEP_DELAY slows each step down.
TRAIN_SCRIPT = """
import json, logging, os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from finetune_flows.tasks.core.adapters import AdapterConfig
from finetune_flows.tasks.core.config import TrainingConfig
from finetune_flows.tasks.core.training import train_model

logging.basicConfig(level=logging.INFO, force=True)
job = json.loads(sys.argv[1])

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(float(os.environ.get("STEP_DELAY", "0")))

result = train_model(Path(job["tokens"]), Path(job["model"]), "sequence-classification", {0: "negative", 1: "positive"},
                     TrainingConfig.model_validate(job["training"]), Path(job["run"]), "accuracy",
                     callbacks=[Slow()], resume=job["resume"], adapter=AdapterConfig(method="lora"),
                     base_source="tiny")
print("RESULT", result.model_dump_json())
"""
TRAINING = dict(max_steps=12, batch_size=8, eval_every_steps=2, learning_rate=1e-2, warmup_ratio=0.1,
                early_stopping_patience=100, keep_checkpoints="all")  # fmt: skip


def start(job: dict[str, object], **env: str) -> subprocess.Popen[str]:
    return start_script(TRAIN_SCRIPT, job, **env)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out, err


@pytest.mark.slow  # default suite: test_resume kills and resumes a full fine-tune
def test_a_killed_lora_run_resumes_to_the_weights_of_an_uninterrupted_one(
    sentiment_tokens: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = {"tokens": str(sentiment_tokens), "model": str(tiny_model_dir), "training": TRAINING, "resume": False}
    out, log = finish(start({**job, "run": str(tmp_path / "straight")}))
    straight = json.loads(out.split("RESULT ", 1)[1])
    assert 0 < straight["trained_parameters"] < straight["total_parameters"] / 10
    assert f"LoRA adapter: {straight['trained_parameters']} of {straight['total_parameters']} parameters train" in log

    run = tmp_path / "killed"
    killed = start({**job, "run": str(run)}, STEP_DELAY="0.4")
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "checkpoint-4" / MARKER).is_file():  # kill -9 once step 4 is saved
        assert killed.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL and not (run / "model").exists() and not (run / "adapter").exists()
    saved = sorted(p.name for p in (run / "checkpoints" / "checkpoint-4").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved  # checkpoints hold the adapter
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pth"))]

    _, log = finish(start({**job, "run": str(run), "resume": True}))
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-4'}" in log
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        first, again = load_file(tmp_path / "straight" / name), load_file(run / name)
        assert first.keys() == again.keys()
        for key, tensor in first.items():
            assert torch.equal(tensor, again[key]), (name, key)
    first = load_file(tiny_model_dir / "model.safetensors")["encoder.layer.0.attention.self.value.weight"]
    assert not torch.equal(first, load_file(run / "model" / "model.safetensors")[
        "bert.encoder.layer.0.attention.self.value.weight"])  # fmt: skip
    assert read_base(run / "adapter")["source"] == "tiny"
