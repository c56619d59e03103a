"""ONNX export and its parity gate (one core for every head), and the onnxruntime scorer that serving uses.

One tiny classifier and one tiny bi-encoder are exported once per module; the tests read those
files or tampered copies, or change the head's code after the export.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from finetune_flows.plugins import HEADS, SCENARIOS, ConfigError, ParityError
from finetune_flows.plugins.heads import bi_encoder
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.model_source import tokenizer_hash
from finetune_flows.tasks.export.model_export import check_head_parity, export_head, parity_texts
from finetune_flows.tasks.export.onnx_graph import PARITY_BATCH_SIZES, ExportResult
from finetune_flows.tasks.serving.classifier import OnnxTextClassifier
from finetune_flows.tasks.serving.encoder import SentenceEncoder

if TYPE_CHECKING:
    import torch

# torch.onnx (dynamo) warns that the input axes sharing one constraint keep a single name.
pytestmark = pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")

ID2LABEL = {0: "negative", 1: "positive"}
MAX_LENGTH = 64
CLASSIFIER, BI_ENCODER = "sequence-classification", "bi-encoder"

_OPENINGS = ["", "honestly ,", "i think", "from the first scene ,", "overall ,", "to be fair ,", "sadly ,"]
_SUBJECTS = ["the film", "this movie", "the plot", "the cast", "the script", "the soundtrack", "the ending"]
_VERDICTS = [
    "is a gorgeous , witty delight", "is a dull , lifeless mess", "works", "falls flat",
    "is one of the best of the year", "never finds its footing", "is warm , funny and moving",
    "feels cold and tedious", "is smart , tender and hilarious", "is clumsy , cruel and unfunny",
]  # fmt: skip
_ASIDES = [
    "despite a slow start", "thanks to a terrific lead performance", "even if the middle act drags",
    "with a score that soars", "though the dialogue is wooden", "and the pacing is relentless",
    "while the camera work is stunning", "because nobody seems to care",
]  # fmt: skip


def review_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` review-like texts from a handful of words to past MAX_LENGTH tokens (seeded)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
            words = [rng.choice(_OPENINGS), rng.choice(_SUBJECTS), rng.choice(_VERDICTS)]
            words += rng.sample(_ASIDES, rng.randint(0, 2))
            sentences.append(" ".join(w for w in words if w) + rng.choice([" .", " !", ""]))
        texts.append(" ".join(sentences) if rng.random() > 0.1 else rng.choice(_SUBJECTS))
    return texts


@pytest.fixture(scope="module")
def onnx_path(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_head(tiny_classifier_dir, CLASSIFIER, out, MAX_LENGTH, tokenizer_hash(tiny_classifier_dir))


def check_parity(
    onnx_path: Path, model_dir: Path, texts: list[str], tolerance: float = 1e-4, min_texts: int = 256
) -> ExportResult:
    """The classifier's parity gate, as the export stage runs it."""
    return check_head_parity(onnx_path, model_dir, CLASSIFIER, texts, tolerance, min_texts)


def torch_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Reference logits: each text scored alone by the PyTorch checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        rows = [
            model(**tokenizer(t, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")).logits[0].numpy()
            for t in texts
        ]
    return np.stack(rows)


# -- the parity gate --------------------------------------------------------------------------------
def test_parity_passes_on_varied_texts_and_batch_shapes(onnx_path: Path, tiny_classifier_dir: Path) -> None:
    texts = review_texts(300)

    result = check_parity(onnx_path, tiny_classifier_dir, texts)

    assert result.labels_agree
    assert result.max_abs_diff <= 1e-4
    assert result.parity_texts == 300
    assert result.onnx_path == str(onnx_path)
    batch_sizes = {shape[0] for shape in result.parity_shapes}
    widths = {shape[1] for shape in result.parity_shapes}
    assert set(PARITY_BATCH_SIZES) <= batch_sizes
    assert len(widths) > 1
    assert max(widths) == MAX_LENGTH  # some texts were long enough to be truncated
    # Premise: the model does not give every text the same label, so "labels agree" means something.
    assert len(set(OnnxTextClassifier(onnx_path, tiny_classifier_dir / "tokenizer.json").predict(texts)["label"])) == 2


def _tamper(onnx_path: Path, out: Path, rows: slice) -> Path:
    """A copy of the graph with 0.05 added to some rows of the classifier weight."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path))
    weight = next(i for i in graph.graph.initializer if i.name.endswith("classifier.weight"))
    original = numpy_helper.to_array(weight)
    changed = original.copy()
    changed[rows] += 0.05
    weight.CopyFrom(numpy_helper.from_array(changed, weight.name))
    onnx.save(graph, str(out))
    saved = next(i for i in onnx.load(str(out)).graph.initializer if i.name == weight.name)
    assert not np.array_equal(numpy_helper.to_array(saved), original)
    return out


def test_tampered_graph_fails_on_logit_difference(onnx_path: Path, tiny_classifier_dir: Path, tmp_path: Path) -> None:
    # The same shift on both rows moves both logits equally: labels still agree, logits do not.
    tampered = _tamper(onnx_path, tmp_path / "tampered.onnx", slice(None))

    with pytest.raises(ParityError, match=r"max \|logit difference\| .* \(allowed 0.0001\), predicted labels agree"):
        check_parity(tampered, tiny_classifier_dir, review_texts(256))


def test_tampered_graph_fails_on_labels_even_within_tolerance(
    onnx_path: Path, tiny_classifier_dir: Path, tmp_path: Path
) -> None:
    # Shifting only the "negative" row flips labels near the boundary; a loose tolerance does not help.
    tampered = _tamper(onnx_path, tmp_path / "tampered.onnx", slice(0, 1))

    with pytest.raises(ParityError, match=r"ONNX parity failed .*predicted labels DIFFER .*nothing was published"):
        check_parity(tampered, tiny_classifier_dir, review_texts(256), tolerance=10.0)


def test_parity_needs_enough_texts(onnx_path: Path, tiny_classifier_dir: Path) -> None:
    with pytest.raises(ParityError, match="at least 256 eval texts, got 255"):
        check_parity(onnx_path, tiny_classifier_dir, review_texts(255))
    with pytest.raises(ParityError, match="at least 10 eval texts, got 9"):
        check_parity(onnx_path, tiny_classifier_dir, review_texts(9), min_texts=10)


def test_parity_texts_take_eval_first_then_train(sentiment_files: tuple[Path, Path], tmp_path: Path) -> None:
    import pandas as pd

    data = ingest_files(*sentiment_files, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    folder = Path(data.dataset_dir)
    eval_texts = pd.read_parquet(folder / "eval.parquet")["text"].tolist()
    train_texts = pd.read_parquet(folder / "train.parquet")["text"].tolist()
    assert (len(eval_texts), len(train_texts)) == (24, 96)

    assert parity_texts(folder, 10) == eval_texts[:10]
    assert parity_texts(folder, 50) == eval_texts + train_texts[:26]
    assert parity_texts(folder, 500) == eval_texts + train_texts  # all there is


def test_parity_texts_of_a_pair_head_take_both_columns_row_by_row(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"query": ["q0", "q1"], "item": ["i0", "i1"]}).to_parquet(tmp_path / "eval.parquet")
    pd.DataFrame({"query": ["q2", "q3"], "item": ["i2", "i3"], "other": ["x", "y"]}).to_parquet(
        tmp_path / "train.parquet"
    )

    assert parity_texts(tmp_path, 3, ("query", "item")) == ["q0", "i0", "q1"]
    assert parity_texts(tmp_path, 7, ("query", "item")) == ["q0", "i0", "q1", "i1", "q2", "i2", "q3"]


# -- the exported file ------------------------------------------------------------------------------
def test_metadata_carries_labels_max_length_and_tokenizer(onnx_path: Path, tiny_classifier_dir: Path) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}

    assert json.loads(meta["id2label"]) == {"0": "negative", "1": "positive"}
    assert meta["max_length"] == str(MAX_LENGTH)
    assert meta["tokenizer_hash"] == tokenizer_hash(tiny_classifier_dir)
    scorer = OnnxTextClassifier(onnx_path, tiny_classifier_dir / "tokenizer.json")
    assert scorer.labels == ["negative", "positive"]
    assert scorer.max_length == MAX_LENGTH
    assert scorer.tokenizer_hash == tokenizer_hash(tiny_classifier_dir)


@pytest.mark.parametrize(("batch", "seq"), [(3, 40), (1, 5)])
def test_dynamic_batch_and_sequence_axes(onnx_path: Path, tiny_classifier_dir: Path, batch: int, seq: int) -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    rng = np.random.default_rng(batch * 100 + seq)
    inputs = {
        "input_ids": rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }
    inputs["attention_mask"][0, seq // 2 :] = 0  # one padded row
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    (logits,) = session.run(["logits"], inputs)

    assert logits.shape == (batch, 2)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier_dir)).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


# -- the serving scorer -----------------------------------------------------------------------------
def test_scorer_predicts_labels_and_probabilities_in_input_order(onnx_path: Path, tiny_classifier_dir: Path) -> None:
    texts = review_texts(40, seed=1)
    scorer = OnnxTextClassifier(onnx_path, tiny_classifier_dir / "tokenizer.json")

    frame = scorer.predict(texts, batch_size=8)  # batches are formed by length, out of input order

    assert list(frame.columns) == ["label", "score", "prob_negative", "prob_positive"]
    assert len(frame) == len(texts)
    probs = frame[["prob_negative", "prob_positive"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(frame["score"], probs.max(axis=1), atol=1e-12)
    assert frame["label"].tolist() == [ID2LABEL[i] for i in probs.argmax(axis=1)]
    # Row i belongs to text i: compare with each text scored alone by PyTorch.
    reference = torch_logits(tiny_classifier_dir, texts).astype(np.float64)
    reference = np.exp(reference - reference.max(axis=1, keepdims=True))
    reference /= reference.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, reference, atol=1e-4)
    assert frame["label"].nunique() == 2  # premise of the order check: both labels occur


def test_scorer_encode_pads_to_longest_and_truncates(onnx_path: Path, tiny_classifier_dir: Path) -> None:
    scorer = OnnxTextClassifier(onnx_path, tiny_classifier_dir / "tokenizer.json")
    long_text = " ".join(["the film is a gorgeous , witty delight"] * 20)

    short = scorer.encode(["good film", "the film was very good"])  # 4 and 7 tokens
    capped = scorer.encode([long_text, "good film"])

    assert short["input_ids"].shape == (2, 7)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert (short["input_ids"][0, 4:] == 0).all()
    assert capped["input_ids"].shape == (2, MAX_LENGTH)
    assert capped["attention_mask"][0].sum() == MAX_LENGTH


# -- the bi-encoder: the same core, the head's own pooling ------------------------------------------
@pytest.fixture(scope="module")
def encoder_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    return export_head(tiny_model_dir, BI_ENCODER, out, MAX_LENGTH, tokenizer_hash(tiny_model_dir))


def cls_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's embedding, unit length: another head's idea of a sentence embedding."""
    import torch

    return torch.nn.functional.normalize(hidden[:, 0], p=2.0, dim=1)


def max_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The largest value of each feature over the unpadded tokens, unit length."""
    import torch

    masked = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf"))
    return torch.nn.functional.normalize(masked.max(dim=1).values, p=2.0, dim=1)


def test_bi_encoder_parity_passes_through_the_same_loop(encoder_onnx: Path, tiny_model_dir: Path) -> None:
    texts = review_texts(300)

    result = check_head_parity(encoder_onnx, tiny_model_dir, BI_ENCODER, texts)

    assert result.max_abs_diff <= 1e-4
    assert result.labels_agree is None  # embeddings have no labels to compare
    assert result.parity_texts == 300
    assert set(PARITY_BATCH_SIZES) <= {shape[0] for shape in result.parity_shapes}
    assert max(shape[1] for shape in result.parity_shapes) == MAX_LENGTH
    # Premise: the graph is the served encoder, with unit-length rows that differ between texts.
    rows = SentenceEncoder(encoder_onnx, tiny_model_dir / "tokenizer.json").encode(texts[:5])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.abs(rows[0] - rows[1]).max() > 1e-2


@pytest.mark.parametrize("pooling", [cls_pooling, max_pooling], ids=["cls", "max"])
def test_changing_the_heads_pooling_after_export_fails_parity(
    encoder_onnx: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, pooling: Callable[..., torch.Tensor]
) -> None:
    # The graph still mean-pools; the head now pools differently, so serving would diverge from it.
    monkeypatch.setattr(bi_encoder, "pool", pooling)

    with pytest.raises(ParityError, match=r"ONNX parity failed for .*encoder\.onnx: max \|embedding difference\| "):
        check_head_parity(encoder_onnx, tiny_model_dir, BI_ENCODER, review_texts(40), min_texts=1)


def test_a_nan_output_fails_parity(encoder_onnx: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bi_encoder, "pool", lambda hidden, mask: hidden[:, 0] * float("nan"))

    with pytest.raises(ParityError, match=r"max \|embedding difference\| nan \(allowed 0.0001\)"):
        check_head_parity(encoder_onnx, tiny_model_dir, BI_ENCODER, review_texts(8), min_texts=1)


def test_training_and_export_embed_with_the_heads_one_pooling(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    head = HEADS.get(BI_ENCODER)
    trained, exported = head.build_model(str(tiny_model_dir), {}).eval(), head.export_module(tiny_model_dir)
    batch = {
        "input_ids": torch.tensor([[101, 2204, 2143, 102, 0], [101, 1037, 11771, 3185, 102]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
    }
    with torch.inference_mode():
        mean = exported(**batch)
        torch.testing.assert_close(trained.embed(**batch), mean, atol=1e-5, rtol=0)
        monkeypatch.setattr(bi_encoder, "pool", cls_pooling)
        cls = exported(**batch)
        torch.testing.assert_close(trained.embed(**batch), cls, atol=1e-5, rtol=0)
    assert (mean - cls).abs().max() > 1e-2  # the patch changed both: they share the head's pooling


def test_bi_encoder_metadata_carries_the_heads_scale(encoder_onnx: Path, tiny_model_dir: Path) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(encoder_onnx)).metadata_props}

    assert float(meta["score_scale"]) == HEADS.get(BI_ENCODER).scale == 20.0
    assert (meta["pooling"], meta["normalize"], meta["embedding_dim"]) == ("mean", "l2", "32")
    assert meta["max_length"] == str(MAX_LENGTH)
    assert meta["tokenizer_hash"] == tokenizer_hash(tiny_model_dir)


def test_bi_encoder_refuses_a_folder_that_does_not_mean_pool(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "cls-pooled")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )

    with pytest.raises(ConfigError, match=r"cls-pooled does not use mean pooling .*only mean pooling is exported"):
        export_head(folder, BI_ENCODER, tmp_path / "encoder.onnx", MAX_LENGTH, tokenizer_hash(folder))
    assert not (tmp_path / "encoder.onnx").exists()
