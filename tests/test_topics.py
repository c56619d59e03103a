"""Topic assignment: the taxonomy file, the torch-free sentence encoder, its export and parity gate.

The tiny BERT (random weights, MiniLM's tokenizer) is exported once per module for the fast
tests; the slow tests export the real all-MiniLM-L6-v2 once and check that topics come out right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from finetune_flows.plugins import ConfigError, ParityError
from finetune_flows.tasks.export.model_export import check_head_parity, export_sentence_encoder
from finetune_flows.tasks.monitoring.taxonomy import DEFAULT_TAXONOMY, load_taxonomy
from finetune_flows.tasks.serving import topics as served_topics
from finetune_flows.tasks.serving.errors import ModelFilesError
from finetune_flows.tasks.serving.topics import (
    ENCODER_FILE,
    TAXONOMY_FILE,
    TOKENIZER_FILE,
    SentenceEncoder,
    Taxonomy,
    Topic,
    TopicAssigner,
    load_topic_assigner,
    pick_topics,
)

# torch.onnx (dynamo) warns that the input axes sharing one constraint keep a single name.
pytestmark = pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Operating profit rose to EUR 2.4 mn from EUR 1.6 mn a year earlier .",
    "ok",
    "The company will cut 120 jobs at its plant in Finland , the union said on Tuesday after talks .",
    "Dividend payable on 1 February .",
    "",
    "The board of directors proposes that no dividend be paid for the financial year , citing the weak market "
    "outlook , the costs of the restructuring programme and the need to keep cash for the planned acquisitions .",
    "Shares rose 3 % in Helsinki .",
]


def write_taxonomy(folder: Path, data: object, name: str = "topics.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def encoder_parity(onnx_path: Path, model_dir: Path, texts: list[str]) -> float:
    """Max |embedding difference| of the exported sentence encoder, from the one parity gate."""
    return check_head_parity(onnx_path, model_dir, "bi-encoder", texts, min_texts=1).max_abs_diff


def topic(name: str, *examples: str) -> dict:
    return {"name": name, "description": f"texts about {name}", "examples": list(examples) or [f"about {name}"]}


# -- the taxonomy file -------------------------------------------------------------------------------
def test_shipped_taxonomy_loads() -> None:
    taxonomy = load_taxonomy(DEFAULT_TAXONOMY)

    assert taxonomy.names == [
        "earnings", "guidance", "mergers_acquisitions", "layoffs_restructuring", "legal_regulatory",
        "dividends_buybacks", "contracts_orders", "macro_markets",
    ]  # fmt: skip
    assert taxonomy.other == "other"
    assert all(4 <= len(t.examples) <= 8 for t in taxonomy.topics)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"taxonomy file .*nowhere\.json does not exist"):
        load_taxonomy(tmp_path / "nowhere.json")


def test_invalid_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"topics": [', encoding="utf-8")

    with pytest.raises(ConfigError, match=r"broken\.json is not valid UTF-8 JSON"):
        load_taxonomy(path)


def test_duplicate_topic_names_are_an_error(tmp_path: Path) -> None:
    path = write_taxonomy(tmp_path, {"threshold": 0.3, "topics": [topic("earnings"), topic("m&a"), topic("earnings")]})

    with pytest.raises(ConfigError, match=r"topics\.json is invalid: duplicate topic names \['earnings'\]"):
        load_taxonomy(path)


def test_every_problem_is_reported_with_the_topic_it_belongs_to(tmp_path: Path) -> None:
    data = {
        "threshold": 1.5,
        "topics": [topic("earnings"), {"name": "layoffs", "description": "job cuts", "examples": []}],
    }
    path = write_taxonomy(tmp_path, data)

    with pytest.raises(ConfigError) as caught:
        load_taxonomy(path)

    message = str(caught.value)
    assert str(path) in message
    assert "topics[1] ('layoffs').examples: List should have at least 1 item" in message
    assert "threshold: Input should be less than or equal to 1" in message


def test_blank_examples_and_a_topic_named_like_other_are_errors(tmp_path: Path) -> None:
    blank = write_taxonomy(tmp_path, {"threshold": 0.3, "topics": [topic("earnings", "profit rose", "  ")]}, "a.json")
    clash = write_taxonomy(tmp_path, {"threshold": 0.3, "topics": [topic("other")]}, "b.json")

    with pytest.raises(ConfigError, match=r"a\.json is invalid: topics\[0\] \('earnings'\)\.examples: examples at pos"):
        load_taxonomy(blank)
    with pytest.raises(ConfigError, match=r"b\.json is invalid: topic 'other' is also the name of 'other'"):
        load_taxonomy(clash)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    path = write_taxonomy(tmp_path, {"threshold": 0.3, "treshold": 0.5, "topics": [topic("earnings")]})

    with pytest.raises(ConfigError, match=r"treshold: Extra inputs are not permitted"):
        load_taxonomy(path)


def test_served_models_check_the_taxonomy_without_finetune_flows_errors(tmp_path: Path) -> None:
    """The served copy raises its own ModelFilesError; finetune-flows turns it into a ConfigError."""
    path = write_taxonomy(tmp_path, {"threshold": 0.3, "topics": []})
    problem = r"topics\.json is invalid: topics: List should have at least 1 item"

    with pytest.raises(ModelFilesError, match=problem):
        served_topics.load_taxonomy(path)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_taxonomy(path)
    assert isinstance(caught.value.__cause__, ModelFilesError)


# -- the torch-free encoder, on the tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_sentence_encoder(tiny_model_dir, tmp_path_factory.mktemp("encoder") / "tiny.onnx", max_length=64)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_onnx: Path, tiny_model_dir: Path) -> SentenceEncoder:
    return SentenceEncoder(tiny_onnx, tiny_model_dir / "tokenizer.json")


def test_embeddings_have_unit_length_and_the_graph_its_metadata(tiny_encoder: SentenceEncoder) -> None:
    out = tiny_encoder.encode(TEXTS)

    assert out.shape == (len(TEXTS), 32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.max_length == 64  # read from the graph's metadata
    assert tiny_encoder.encode([]).shape == (0, 32)


def test_rows_come_back_in_input_order_whatever_the_batching(tiny_encoder: SentenceEncoder) -> None:
    alone = np.stack([tiny_encoder.encode([t])[0] for t in TEXTS])

    batched = tiny_encoder.encode(TEXTS, batch_size=3)  # sorted by length inside, padded per batch

    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert np.abs(alone[0] - alone[2]).max() > 1e-2  # different texts: the check above is not vacuous


def test_graph_matches_a_torch_mean_pooling_reference(tiny_encoder: SentenceEncoder, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModel.from_pretrained(str(tiny_model_dir)).eval()
    reference = []
    with torch.inference_mode():
        for text in TEXTS:  # one text at a time: no padding at all on the reference side
            inputs = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            tokens = model(**inputs).last_hidden_state[0]
            mean = tokens.mean(dim=0)
            reference.append((mean / mean.norm()).numpy())

    np.testing.assert_allclose(tiny_encoder.encode(TEXTS), np.stack(reference), atol=1e-5)


def test_a_long_text_is_truncated_to_max_length(tiny_encoder: SentenceEncoder) -> None:
    batch = tiny_encoder.tokenize([" ".join(["profit"] * 500)])

    assert batch["input_ids"].shape == (1, 64)


def test_encoder_needs_an_embedding_output(tmp_path: Path, tiny_onnx: Path, tiny_model_dir: Path) -> None:
    import onnx

    graph = onnx.load(str(tiny_onnx))
    graph.graph.output[0].name = "pooled"
    graph.graph.node[-1].output[0] = "pooled"
    onnx.save(graph, str(tmp_path / "renamed.onnx"))

    with pytest.raises(ModelFilesError, match=r"has no output 'embedding' \(outputs: \['pooled'\]\)"):
        SentenceEncoder(tmp_path / "renamed.onnx", tiny_model_dir / "tokenizer.json")


# -- the parity gate ------------------------------------------------------------------------------------
def test_parity_passes_for_a_faithful_export(tiny_onnx: Path, tiny_model_dir: Path) -> None:
    worst = encoder_parity(tiny_onnx, tiny_model_dir, TEXTS * 20)

    assert 0.0 <= worst <= 1e-4


def test_parity_fails_on_a_tampered_graph(tmp_path: Path, tiny_onnx: Path, tiny_model_dir: Path) -> None:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tiny_onnx))
    (weights,) = [i for i in graph.graph.initializer if i.name.endswith("word_embeddings.weight")]
    values = numpy_helper.to_array(weights)
    noise = np.random.default_rng(0).normal(0.0, 0.05, values.shape).astype(values.dtype)
    weights.CopyFrom(numpy_helper.from_array(values + noise, weights.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(graph, str(tampered))

    with pytest.raises(ParityError, match=r"ONNX parity failed for .*tampered\.onnx: max \|embedding difference\|"):
        encoder_parity(tampered, tiny_model_dir, TEXTS)


def test_parity_needs_texts(tiny_onnx: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ParityError, match="at least 1 eval texts, got 0"):
        encoder_parity(tiny_onnx, tiny_model_dir, [])


# -- the assigner's mechanics (tiny model: only exact matches are meaningful) -----------------------------
def test_pick_topics_uses_the_threshold() -> None:
    taxonomy = Taxonomy(topics=[Topic(**topic("a")), Topic(**topic("b"))], threshold=0.5)
    sims = np.array([[0.9, 0.1], [0.2, 0.6], [0.4, 0.3], [0.5, 0.5]], dtype=np.float32)

    names, best = pick_topics(sims, taxonomy)

    assert names == ["a", "b", "other", "a"]  # at the threshold counts; a tie goes to the first topic
    np.testing.assert_allclose(best, [0.9, 0.6, 0.4, 0.5])
    assert pick_topics(sims, taxonomy, threshold=0.95)[0] == ["other"] * 4


def test_a_text_equal_to_an_example_gets_its_topic(tiny_encoder: SentenceEncoder) -> None:
    taxonomy = Taxonomy(
        topics=[Topic(**topic("earnings", "net profit rose")), Topic(**topic("layoffs", "the plant will close"))],
        threshold=0.999,
    )
    assigner = TopicAssigner(tiny_encoder, taxonomy, top_k=1)

    names, best = assigner.scores(["the plant will close", "net profit rose", "a cat on a mat"])

    assert names[:2] == ["layoffs", "earnings"]
    assert best[0] == pytest.approx(1.0, abs=1e-5)
    assert names[2] == "other"
    assert assigner.assign([]) == []


def test_top_k_is_checked(tiny_encoder: SentenceEncoder) -> None:
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        TopicAssigner(tiny_encoder, load_taxonomy(), top_k=0)


def test_assigner_folder_loads_and_names_what_is_missing(tmp_path: Path, tiny_onnx: Path, tiny_model_dir: Path) -> None:
    shutil.copy2(tiny_onnx, tmp_path / ENCODER_FILE)
    shutil.copy2(tiny_model_dir / "tokenizer.json", tmp_path / TOKENIZER_FILE)
    with pytest.raises(ModelFilesError, match=rf"lacks \['{TAXONOMY_FILE}'\]"):
        load_topic_assigner(tmp_path)
    shutil.copy2(DEFAULT_TAXONOMY, tmp_path / TAXONOMY_FILE)

    assigner = load_topic_assigner(tmp_path)

    assert len(assigner.assign(TEXTS)) == len(TEXTS)


def test_scoring_imports_no_torch(tiny_onnx: Path, tiny_model_dir: Path) -> None:
    """Serving processes score topics with onnxruntime and tokenizers only: torch must never load."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        from finetune_flows.tasks.serving.topics import SentenceEncoder, TopicAssigner, load_taxonomy
        encoder = SentenceEncoder({str(tiny_onnx)!r}, {str(tiny_model_dir / "tokenizer.json")!r})
        rows = encoder.encode(["Net profit rose 12 %", "The company cut 500 jobs"])
        topics = TopicAssigner(encoder, load_taxonomy({str(DEFAULT_TAXONOMY)!r})).assign(["Net profit rose 12 %"])
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print(rows.shape, len(topics), loaded, sys.modules["torch"])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 32) 1 ['torch'] None"


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_onnx(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_sentence_encoder(minilm_dir, tmp_path_factory.mktemp("minilm") / "minilm.onnx")


@pytest.fixture(scope="module")
def minilm_encoder(minilm_onnx: Path, minilm_dir: Path) -> SentenceEncoder:
    return SentenceEncoder(minilm_onnx, minilm_dir / "tokenizer.json")


FINANCE_TAXONOMY = Taxonomy(
    topics=[
        Topic(
            name="earnings",
            description="Reported profit, revenue and sales of a quarter or year.",
            examples=["Net profit increased in the third quarter", "Revenue fell 5 % year on year"],
        ),
        Topic(
            name="layoffs",
            description="Job cuts, lay-offs and plant closures.",
            examples=["The firm will lay off 200 workers", "The factory is to close with the loss of jobs"],
        ),
        Topic(
            name="dividends",
            description="Dividends paid to shareholders and share buybacks.",
            examples=["The board proposed a dividend of EUR 0.40 per share"],
        ),
    ],
    threshold=0.3,
)
EXPECTED = {
    "The company cut 500 jobs": "layoffs",
    "Quarterly net profit rose 12%": "earnings",
    "Shareholders will receive a payout of 1 euro per share": "dividends",
    "The cat sat on the mat": "other",
}


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2])
def test_minilm_assigns_financial_topics(minilm_encoder: SentenceEncoder, top_k: int) -> None:
    assigner = TopicAssigner(minilm_encoder, FINANCE_TAXONOMY, top_k=top_k)

    names, best = assigner.scores(list(EXPECTED))

    assert dict(zip(EXPECTED, names, strict=True)) == EXPECTED
    assert best[-1] < FINANCE_TAXONOMY.threshold < best[:-1].min()


@pytest.mark.slow
def test_minilm_with_the_shipped_taxonomy(minilm_encoder: SentenceEncoder) -> None:
    assigner = TopicAssigner(minilm_encoder, load_taxonomy())

    names = assigner.assign(["The company cut 500 jobs", "Quarterly net profit rose 12%", "The cat sat on the mat"])

    assert names == ["layoffs_restructuring", "earnings", "other"]


@pytest.mark.slow
def test_minilm_export_matches_pytorch(minilm_onnx: Path, minilm_dir: Path) -> None:
    assert encoder_parity(minilm_onnx, minilm_dir, TEXTS * 5) <= 1e-4
