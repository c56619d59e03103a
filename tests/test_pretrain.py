"""Flow ``pretrain`` on a tiny BERT: the MLM head built for an encoder without one (tied decoder, fresh transform),
whole-word masking, the corpus sources and their errors, the MLM loss falling on held-back text, and the registered
encoder fine-tuned from ``models:/<name>@champion``."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest

from finetune_flows.plugins import DataError
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.pretraining.config import CorpusKind, MaskedLMTraining, PretrainConfig
from finetune_flows.tasks.pretraining.corpus import build_corpus, read_texts, split_texts
from finetune_flows.tasks.pretraining.masking import mlm_collator, tokenize_corpus
from finetune_flows.tasks.pretraining.mlm_head import HEAD_FILE, masked_lm_from_encoder, save_adapted_encoder
from finetune_flows.tasks.pretraining.pretraining import PretrainRequest, train_masked_lm

# Few words, many repetitions: a tiny model learns to fill them in within a few dozen steps.
ANIMALS = ["cat", "dog", "bird", "horse", "fish", "sheep"]
PLACES = ["garden", "kitchen", "meadow", "river", "barn", "forest"]
CORPUS = [f"the {a} sleeps in the {p} every night" for a in ANIMALS for p in PLACES]
LONG_WORDS = "unbelievably antidisestablishmentarianism tokenization wonderfully extraordinary"


def corpus_config(path: Path, **training: object) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "corpus": {"kind": "file", "path": str(path), "held_back_fraction": 0.2},
            "training": {"mlm_probability": 0.15, **training},
        }
    )


def test_an_mlm_head_is_built_for_an_encoder_without_one(tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    model, built = masked_lm_from_encoder(tiny_model_dir)
    assert built
    embeddings = model.get_input_embeddings().weight
    decoder = model.get_output_embeddings()
    assert decoder.weight.data_ptr() == embeddings.data_ptr()  # tied: one tensor
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert embeddings.detach().equal(saved["embeddings.word_embeddings.weight"])
    assert model.bert.encoder.layer[1].output.dense.weight.detach().equal(saved["encoder.layer.1.output.dense.weight"])
    transform = model.cls.predictions.transform
    assert not any(name.startswith("cls.") or "predictions" in name for name in saved)  # nothing to load it from
    assert transform.LayerNorm.weight.detach().eq(1).all() and transform.LayerNorm.bias.detach().eq(0).all()
    assert model.cls.predictions.bias.detach().eq(0).all()


def test_the_adapted_encoder_fine_tunes_like_minilm_and_keeps_its_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from finetune_flows.plugins import HEADS

    model, _ = masked_lm_from_encoder(tiny_model_dir)
    with torch.no_grad():
        model.cls.predictions.transform.dense.weight.add_(1.0)  # a trained head differs from a fresh one
    out = save_adapted_encoder(model, tiny_model_dir, tmp_path / "adapted")
    assert (out / "model.safetensors").is_file() and (out / HEAD_FILE).is_file() and (out / "tokenizer.json").is_file()
    classifier = HEADS.get("sequence-classification").build_model(str(out), {0: "negative", 1: "positive"})
    assert classifier.bert.pooler is not None
    assert classifier.bert.embeddings.word_embeddings.weight.equal(model.get_input_embeddings().weight)
    again, built = masked_lm_from_encoder(out)
    assert not built
    assert again.cls.predictions.transform.dense.weight.equal(model.cls.predictions.transform.dense.weight)
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()


def masked_words(tiny_model_dir: Path, tmp_path: Path, whole_word: bool) -> tuple[int, int]:
    """(words with every piece masked, words with only some pieces masked) over many masking draws."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    folder = tmp_path / f"corpus-{whole_word}"
    folder.mkdir()
    pd.DataFrame({"text": [LONG_WORDS] * 4}).to_parquet(folder / "train.parquet")
    pd.DataFrame({"text": [LONG_WORDS]}).to_parquet(folder / "held_back.parquet")
    tokens = tokenize_corpus(folder, tiny_model_dir, "h", 64, True, tmp_path / "cache")
    rows = load_from_disk(str(Path(tokens.tokenized_dir) / "train"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    words = tokenizer(LONG_WORDS).word_ids()
    whole = partial = 0
    for seed in range(10):
        batch = mlm_collator(tokenizer, MaskedLMTraining(mlm_probability=0.4, whole_word=whole_word), seed)(
            [rows[i] for i in range(len(rows))]
        )
        for labels in batch["labels"].tolist():
            for word in {w for w in words if w is not None}:
                masked = [labels[i] != -100 for i, w in enumerate(words) if w == word]
                whole += all(masked) and len(masked) > 1
                partial += any(masked) and not all(masked)
    return whole, partial


def test_whole_word_masking_masks_all_pieces_of_a_word_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    whole, partial = masked_words(tiny_model_dir, tmp_path, whole_word=True)
    assert whole > 0 and partial == 0
    _, partial_tokens = masked_words(tiny_model_dir, tmp_path, whole_word=False)
    assert partial_tokens > 0  # token masking splits words: the check above can fail


def test_masked_positions_become_mask_and_only_they_carry_labels(tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    pd.DataFrame({"text": CORPUS}).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"text": CORPUS[:2]}).to_parquet(tmp_path / "held_back.parquet")
    tokens = tokenize_corpus(tmp_path, tiny_model_dir, "h", 32, True, tmp_path / "cache")
    rows = load_from_disk(str(Path(tokens.tokenized_dir) / "train"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batch = mlm_collator(tokenizer, MaskedLMTraining(), seed=0)([rows[i] for i in range(len(rows))])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    masked = batch["labels"] != -100
    assert masked.any()
    assert (batch["input_ids"][masked] == tokenizer.mask_token_id).all()
    assert not (batch["input_ids"][~masked] == tokenizer.mask_token_id).any()
    assert not (masked & (batch["attention_mask"] == 0)).any()  # padding is never masked


def test_a_file_corpus_is_validated_deduplicated_and_split(tmp_path: Path) -> None:
    path = tmp_path / "texts.csv"
    pd.DataFrame({"id": range(len(CORPUS) + 3), "text": [*CORPUS, *CORPUS[:3]]}).to_csv(path, index=False)
    result = build_corpus(corpus_config(path), tmp_path / "cache")
    assert (result.train_rows, result.held_back_rows, result.duplicates) == (29, 7, 3)
    train = pd.read_parquet(Path(result.corpus_dir) / "train.parquet")["text"].tolist()
    held = pd.read_parquet(Path(result.corpus_dir) / "held_back.parquet")["text"].tolist()
    assert not set(train) & set(held) and set(train) | set(held) == set(CORPUS)
    assert build_corpus(corpus_config(path), tmp_path / "cache").cached


def test_an_empty_text_names_file_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "texts.csv"
    path.write_text('id,body\n1,a fine text\n2,another one\n3,"  "\n', encoding="utf-8")
    config = PretrainConfig.model_validate({"corpus": {"kind": "file", "path": str(path), "text_column": "body"}})
    with pytest.raises(DataError, match=rf"empty text \(file {path}, row 3, column 'body'"):
        read_texts(config)


def test_a_missing_column_names_file_and_the_columns_found(tmp_path: Path) -> None:
    path = tmp_path / "texts.csv"
    path.write_text("id,body\n1,a fine text\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"missing column 'text'; columns found: \['id', 'body'\] \(file {path}"):
        read_texts(corpus_config(path))


def test_a_scenario_corpus_is_its_training_split_without_labels(sentiment_files: tuple[Path, Path]) -> None:
    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.data_preparation import data_files, ingest_options
    from finetune_flows.tasks.core.ingestion import ingest_files
    from finetune_flows.tasks.core.settings import get_settings

    train, _ = sentiment_files
    config = PretrainConfig.model_validate({"corpus": {"kind": "scenario", "path": str(train)}})
    texts, files = read_texts(config)
    sentences = set(pd.read_csv(train, sep="\t")["sentence"])
    assert files == [train] and set(texts) < sentences and "indeed" in texts[0]  # the sentence column, no labels
    # What `finetune-flows run sentiment --data train.tsv` evaluates on never reaches pre-training.
    finetune = FinetuneConfig.for_scenario("sentiment", {"data.train_path": str(train)})
    files_of_run = data_files(finetune.data, SCENARIOS.get("sentiment"))
    options = ingest_options(finetune.data, "sentiment", finetune.training.seed)
    dataset = Path(ingest_files(*files_of_run[:2], SCENARIOS.get("sentiment"), options, get_settings().cache_dir,
                                files_of_run[2]).dataset_dir)  # fmt: skip
    held_out = set(pd.read_parquet(dataset / "eval.parquet")["text"])
    assert held_out and not held_out & set(texts) and set(texts) | held_out == sentences
    assert config.model_name == "sentiment-encoder"


def test_the_monitor_corpus_reads_the_stored_texts(tmp_path: Path) -> None:
    from finetune_flows.tasks.monitoring.record_store import connect

    store = tmp_path / "monitor"
    with closing(connect(store / "records.sqlite")) as con:
        for ts, text in ((2, "shares fell sharply"), (1, "profits rose")):
            con.execute(
                "INSERT INTO records VALUES (?, ?, 's', 't', ?, 'topic', 'negative', 0.9, '1', 'b')", (text, ts, text)
            )
    config = PretrainConfig.model_validate({"corpus": {"kind": CorpusKind.MONITOR, "path": str(store)}})
    assert read_texts(config) == (["profits rose", "shares fell sharply"], [store / "records.sqlite"])
    missing = PretrainConfig.model_validate({"corpus": {"kind": "monitor", "path": str(tmp_path / "none")}})
    with pytest.raises(DataError, match="no monitor record store"):
        read_texts(missing)
    assert sqlite3.sqlite_version  # the store was read, not created, by the corpus


def test_at_least_one_text_is_held_back() -> None:
    train, held = split_texts(["a", "b", "c"], 0.1, seed=1)
    assert len(held) == 1 and sorted(train + held) == ["a", "b", "c"]
    with pytest.raises(DataError, match="1 distinct text"):
        split_texts(["a"], 0.1, seed=1)


def test_the_mlm_loss_on_held_back_text_falls(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": CORPUS}).to_csv(path, index=False)
    config = corpus_config(path, max_steps=40, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, whole_word=True)
    corpus = build_corpus(config, tmp_path / "cache")
    tokens = tokenize_corpus(Path(corpus.corpus_dir), tiny_model_dir, corpus.data_hash, 32, True, tmp_path / "cache")
    run = RunInfo(run_dir=str(tmp_path / "run"), run_id="r", experiment_id="0", tracking_uri_redacted="sqlite:///x")
    request = PretrainRequest(
        tokenized_dir=tokens.tokenized_dir, model_dir=str(tiny_model_dir), training=config.training, run=run
    )
    result = train_masked_lm(request)
    assert result.head_built and result.steps == 40
    assert result.loss_after < 0.7 * result.loss_before, (result.loss_before, result.loss_after)
    assert (Path(result.model_dir) / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "mlm_checkpoints").exists()  # removed once the encoder is saved


@pytest.mark.usefixtures("prefect_harness")
def test_pretrain_registers_an_encoder_that_fine_tuning_starts_from(
    state_dir: Path, tiny_model_dir: Path, sentiment_files: tuple[Path, Path], tmp_path: Path
) -> None:
    import mlflow
    import numpy as np
    from safetensors.torch import load_file

    from finetune_flows.flows.pretrain import pretrain
    from finetune_flows.plugins import HEADS
    from finetune_flows.tasks.core.config import FinetuneConfig
    from finetune_flows.tasks.core.model_source import resolve_model_source
    from finetune_flows.tasks.core.settings import get_settings

    values = {
        "scenario": "sentiment",
        "corpus": {"kind": "scenario", "path": str(sentiment_files[0]), "held_back_fraction": 0.2},
        "model": {"source": str(tiny_model_dir), "max_length": 32},
        "training": {"max_steps": 15, "batch_size": 16, "learning_rate": 3e-3, "warmup_ratio": 0.0},
    }
    summary = pretrain(PretrainConfig.model_validate(values))
    assert (summary.model_name, summary.version, summary.head_built) == ("sentiment-encoder", "1", True)
    assert "champion" in summary.aliases and summary.loss_after < summary.loss_before
    assert summary.perplexity_after == pytest.approx(np.exp(summary.loss_after))

    mlflow.set_tracking_uri(get_settings().tracking_uri)
    embeddings = mlflow.pyfunc.load_model("models:/sentiment-encoder@champion").predict(["a fine film", "a dull one"])
    assert np.asarray(embeddings).shape == (2, 32)
    assert np.linalg.norm(embeddings, axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)

    finetune_config = FinetuneConfig.for_scenario("sentiment", {"model.source": "models:/sentiment-encoder@champion"})
    folder = resolve_model_source(finetune_config.model.source, tmp_path / "download")
    classifier = HEADS.get("sequence-classification").build_model(str(folder), {0: "negative", 1: "positive"})
    adapted = load_file(str(folder / "model.safetensors"))["embeddings.word_embeddings.weight"]
    original = load_file(str(tiny_model_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert classifier.bert.embeddings.word_embeddings.weight.detach().equal(adapted)
    assert not adapted.equal(original)  # the MLM training changed the encoder that fine-tuning starts from

    model = {"source": "models:/sentiment-encoder@champion", "max_length": 32}
    again = pretrain(PretrainConfig.model_validate({**values, "model": model}))
    assert (again.version, again.head_built) == ("2", False)  # the head saved with version 1 continues ...
    assert again.loss_before == pytest.approx(summary.loss_after, rel=1e-4)  # ... from where version 1 ended
    assert again.decision.startswith(("promoted: -", "kept champion: -")), again.decision  # measured alike


def test_the_deployments_run_pretrain_and_its_training_stage_on_the_gpu_pool() -> None:
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text(encoding="utf-8"))
    deployments = {d["name"]: d for d in spec["deployments"]}
    pretrain, stage = deployments["pretrain"], deployments["mlm-train"]
    config = PretrainConfig.model_validate(pretrain["parameters"]["config"])
    assert config.corpus.kind is CorpusKind.SCENARIO and config.model_name == "sentiment-encoder"
    assert load_flow_from_entrypoint(str(root / pretrain["entrypoint"])).name == "pretrain"
    assert load_flow_from_entrypoint(str(root / stage["entrypoint"])).name == "train-mlm"
    assert stage["work_pool"]["name"] == "gpu" and "parameters" not in stage


@pytest.mark.slow  # default suite: test_distributed trains on two processes
def test_two_cpu_processes_train_one_masked_lm(
    state_dir: Path, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import re

    import mlflow

    from finetune_flows.tasks.core.config import InfrastructureConfig
    from finetune_flows.tasks.core.settings import get_settings
    from finetune_flows.tasks.pretraining.pretraining import launch_masked_lm

    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": CORPUS}).to_csv(path, index=False)
    config = corpus_config(path, max_steps=4, batch_size=8, learning_rate=3e-3, precision="fp32")
    corpus = build_corpus(config, tmp_path / "cache")
    tokens = tokenize_corpus(Path(corpus.corpus_dir), tiny_model_dir, corpus.data_hash, 32, True, tmp_path / "cache")
    tracking_uri = get_settings().tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id="0") as run:
        pass
    (tmp_path / "run").mkdir()
    request = PretrainRequest(
        tokenized_dir=tokens.tokenized_dir,
        model_dir=str(tiny_model_dir),
        training=config.training,
        infrastructure=InfrastructureConfig(processes=2),
        run=RunInfo(
            run_dir=str(tmp_path / "run"), run_id=run.info.run_id, experiment_id="0", tracking_uri_redacted=tracking_uri
        ),
    )
    with caplog.at_level(logging.INFO, logger="finetune_flows.tasks.core.launching"):  # torchrun output
        result = launch_masked_lm(request)
    assert result.world_size == 2 and result.steps == 4 and result.loss_after < result.loss_before
    ranks = dict(re.findall(r"rank (\d) of 2: 4 steps, weights checksum (-?[\d.]+)", caplog.text))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], caplog.text[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    logged = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id).data
    assert logged.tags["world_size"] == "2" and logged.metrics["mlm_loss_after"] == pytest.approx(result.loss_after)


def test_the_command_line_builds_the_config_from_dotted_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_flows.flows.cli.main import main

    assert main(["pretrain", "--set", "corpus.kind=file", "--set", "training.mlm_probability=2"]) == 2
    err = capsys.readouterr().err
    assert "training.mlm_probability: Input should be less than 1" in err
    assert "corpus.kind=file needs corpus.path" in err


def test_a_plain_text_file_is_one_text_per_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first note\n\nsecond note\n  \nthird\x00 note\n", encoding="utf-8")
    config = PretrainConfig.model_validate({"corpus": {"kind": "file", "path": str(path)}})
    with pytest.raises(DataError, match=rf"control character '\\x00' at position 5 \(file {path}, line 5,"):
        read_texts(config)
    path.write_text("first note\n\nsecond note\n", encoding="utf-8")
    assert read_texts(config) == (["first note", "second note"], [path])
