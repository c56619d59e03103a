"""Head ``token-classification`` and scenario ``slots``: span alignment with word pieces (multi-byte characters,
pieces sharing characters, spans cut inside a token, CJK), decoding with BIO repair, span F1 arithmetic, the NLU++
reader and its fold protocol, the dictionary baseline, the served tagger's offsets, and one `finetune-flows run`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import HEADS, SCENARIOS, DataError
from finetune_flows.tasks.classification.slot_data import fold_files, prepare_slots_data, read_nlupp
from finetune_flows.tasks.classification.slots import DictionaryBaseline
from finetune_flows.tasks.classification.spans import (
    IGNORE,
    align_spans,
    bio_spans,
    decode_spans,
    slots_of,
    span_scores,
    tag_names,
    token_span_scores,
)
from finetune_flows.tasks.core.config import DataConfig
from tests.conftest import run_cli, services_environment

SCENARIO = "slots"
LABELS = tag_names(["amount", "place"])  # O, B-amount, I-amount, B-place, I-place
AMOUNT, PLACE = 0, 1


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir), use_fast=True)


def encode(tokenizer: Any, text: str) -> tuple[list[str], list[tuple[int, int]], list[int]]:
    enc = tokenizer(text, return_offsets_mapping=True).encodings[0]
    return enc.tokens, enc.offsets, enc.special_tokens_mask


def round_trip(tokenizer: Any, text: str, spans: list[tuple[int, int, int]]) -> list[tuple[str, str, int, int]]:
    """Align ``spans`` to the tokens of ``text``, then decode the tags back into character spans."""
    _, offsets, special = encode(tokenizer, text)
    tags = align_spans(text, spans, offsets, special)
    assert [t == IGNORE for t in tags] == [bool(s) for s in special]  # only special tokens are ignored here
    return decode_spans(text, offsets, [max(t, 0) for t in tags], LABELS, special)


# -- alignment and decoding -------------------------------------------------------------------------


def test_multibyte_characters_align_on_python_string_indices(tokenizer: Any) -> None:
    text = "café 25€ please"  # é and € are one str index each, two and three bytes in UTF-8
    place, amount = (PLACE, 0, text.index(" ")), (AMOUNT, text.index("2"), text.index("€") + 1)
    tokens, _, special = encode(tokenizer, text)
    assert tokens == ["[CLS]", "cafe", "25", "##€", "please", "[SEP]"]  # uncased: the accent is gone, offsets not
    tags = align_spans(text, [place, amount], encode(tokenizer, text)[1], special)
    assert [LABELS[t] if t != IGNORE else None for t in tags] == [None, "B-place", "B-amount", "I-amount", "O", None]
    assert round_trip(tokenizer, text, [place, amount]) == [("place", "café", 0, 4), ("amount", "25€", 5, 8)]


def test_a_span_over_several_word_pieces_comes_back_whole(tokenizer: Any) -> None:
    text = "send £1,200.50 now"
    start = text.index("£")
    tokens, offsets, special = encode(tokenizer, text)
    assert tokens[2:7] == ["£1", ",", "200", ".", "50"]
    tags = align_spans(text, [(AMOUNT, start, start + 9)], offsets, special)
    assert tags == [IGNORE, 0, 1, 2, 2, 2, 2, 0, IGNORE]
    assert round_trip(tokenizer, text, [(AMOUNT, start, start + 9)]) == [("amount", "£1,200.50", 5, 14)]


def test_a_span_cut_inside_a_token_takes_the_whole_token(tokenizer: Any) -> None:
    text = "send £1,200.50 now"
    # "1,200.5" starts inside "£1" and ends inside "50": the tokens it touches are tagged, their edges come back.
    assert round_trip(tokenizer, text, [(AMOUNT, 6, 13)]) == [("amount", "£1,200.50", 5, 14)]


def test_cjk_characters_align_and_round_trip(tokenizer: Any) -> None:
    text = "去东京 costs 25"
    tokens, _, _ = encode(tokenizer, text)
    assert len(tokens) == 7  # [CLS] 去 东(unknown) 京 costs 25 [SEP]: one token per CJK character
    spans = [(PLACE, 1, 3), (AMOUNT, text.index("25"), len(text))]
    assert round_trip(tokenizer, text, spans) == [("place", "东京", 1, 3), ("amount", "25", 10, 12)]


def test_word_pieces_sharing_characters_get_one_b_then_i() -> None:
    # A byte-level tokenizer splits one character into pieces with the same offsets (here "€" -> 2 pieces).
    text = "5€ ok"
    offsets = [(0, 0), (0, 1), (1, 2), (1, 2), (3, 5), (0, 0)]
    special = [True, False, False, False, False, True]
    tags = align_spans(text, [(AMOUNT, 0, 2)], offsets, special)
    assert tags == [IGNORE, 1, 2, 2, 0, IGNORE]
    assert decode_spans(text, offsets, [max(t, 0) for t in tags], LABELS, special) == [("amount", "5€", 0, 2)]


def test_two_spans_sharing_a_token_keep_the_first_and_a_span_outside_the_text_fails() -> None:
    text = "10am"
    offsets = [(0, 0), (0, 4), (0, 0)]
    assert align_spans(text, [(AMOUNT, 0, 2), (PLACE, 2, 4)], offsets, [True, False, True]) == [IGNORE, 1, IGNORE]
    with pytest.raises(ValueError, match=r"span \(2, 9\) is outside the text of 4 characters"):
        align_spans(text, [(AMOUNT, 2, 9)], offsets)


def test_bio_repair_an_i_without_b_starts_a_span_and_specials_end_one() -> None:
    assert bio_spans(["I-place", "I-place", "O", "B-amount", "I-amount", "I-place", "B-place", "B-place"]) == [
        ("place", 0, 2), ("amount", 3, 5), ("place", 5, 6), ("place", 6, 7), ("place", 7, 8),
    ]  # fmt: skip
    text = "ab cd"
    offsets = [(0, 0), (0, 2), (3, 5), (0, 0)]
    tags = [4, 4, 4, 4]  # I-place everywhere, specials included
    assert decode_spans(text, offsets, tags, LABELS, [True, False, False, True]) == [("place", "ab cd", 0, 5)]


# -- span scores ------------------------------------------------------------------------------------


def test_span_f1_is_exact_match_of_type_start_and_end() -> None:
    gold = [[("amount", 0, 3), ("place", 5, 8)], [("amount", 1, 2)], []]
    predicted = [[("amount", 0, 3), ("place", 5, 9)], [("amount", 1, 2), ("place", 3, 4)], [("amount", 0, 1)]]
    scores = span_scores(gold, predicted, ["amount", "place"])
    assert scores["span_precision"] == pytest.approx(2 / 5)
    assert scores["span_recall"] == pytest.approx(2 / 3)
    assert scores["span_f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    assert (scores["precision_amount"], scores["recall_amount"]) == (pytest.approx(2 / 3), 1.0)
    assert scores["f1_place"] == 0.0 and scores["support_place"] == 1.0
    assert scores["span_macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    # A span predicted twice matches its gold span once.
    assert span_scores([[("amount", 0, 3)]], [[("amount", 0, 3)] * 2], ["amount"])["span_precision"] == 0.5
    with pytest.raises(ValueError, match="2 gold rows but 1 predicted rows"):
        span_scores([[], []], [[]], ["amount"])


def test_training_metrics_decode_token_tags_and_skip_ignored_positions() -> None:
    labels = np.array([[IGNORE, 1, 2, 0, IGNORE], [IGNORE, 3, 0, IGNORE, IGNORE]])
    predicted = np.array([[0, 1, 2, 0, 3], [0, 0, 0, 3, 3]])  # row 1 exact; row 2 misses; pads predict noise
    logits = np.eye(len(LABELS))[predicted]
    scores = token_span_scores(logits, labels, LABELS)
    assert (scores["span_precision"], scores["span_recall"]) == (1.0, 0.5)
    assert scores["f1_amount"] == 1.0 and scores["f1_place"] == 0.0
    assert slots_of(LABELS) == ["amount", "place"]


# -- NLU++ data -------------------------------------------------------------------------------------


def example(text: str, **slots: tuple[int, int]) -> dict[str, Any]:
    return {
        "text": text,
        "intents": ["x"],
        "slots": {k: {"text": text[a:b], "span": [a, b]} for k, (a, b) in slots.items()},
    }


def write_folds(folder: Path, folds: int, rows: int) -> Path:
    """``folds`` NLU++ fold files of ``rows`` examples each, with an amount and a place in every text."""
    folder.mkdir(parents=True, exist_ok=True)
    for fold in range(folds):
        records = []
        for n in range(rows):
            text = f"send {fold * 100 + n} pounds to Zürich"
            amount = (5, text.index(" pounds"))
            records.append(example(text, amount_of_money=amount, place=(text.index("Zürich"), len(text))))
        (folder / f"fold{fold}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return folder


def test_the_fold_protocol_tests_on_the_last_tenth_of_the_folds(tmp_path: Path) -> None:
    big = prepare_slots_data(write_folds(tmp_path / "twenty", 20, 5), DataConfig(), 0, tmp_path / "cache")
    assert [Path(f).name for f in big.test_files] == ["fold18.json", "fold19.json"]
    assert (big.test_rows, big.train_rows + big.eval_rows, big.eval_rows) == (10, 90, 9)
    assert big.labels == ["O", "B-amount_of_money", "I-amount_of_money", "B-place", "I-place"]
    frame = pd.read_parquet(Path(big.dataset_dir) / "train.parquet")
    first = frame.iloc[0]
    text, spans, ids = first["text"], json.loads(first["spans"]), json.loads(first["span_ids"])
    assert [text[a:b] for _, a, b in spans][1] == "Zürich" and [i for i, _, _ in ids] == [0, 1]
    small = prepare_slots_data(write_folds(tmp_path / "four", 4, 80), DataConfig(), 0, tmp_path / "cache")
    assert [Path(f).name for f in small.test_files] == ["fold3.json"] and small.test_rows == 80
    again = prepare_slots_data(tmp_path / "four", DataConfig(), 0, tmp_path / "cache")
    assert again.cached and again.dataset_dir == small.dataset_dir
    one_file = prepare_slots_data(tmp_path / "four" / "fold0.json", DataConfig(test_fraction=0.2), 0, tmp_path / "c")
    assert (one_file.test_rows, one_file.test_files) == (16, [])
    domains = tmp_path / "domains"
    shutil.copytree(tmp_path / "four", domains / "banking")
    shutil.copytree(tmp_path / "four", domains / "hotels")
    assert [len(files) for files in fold_files(domains).values()] == [2, 2, 2, 2]  # joined by fold number


def test_bad_spans_fail_naming_file_row_column_and_value(tmp_path: Path) -> None:
    path = tmp_path / "fold0.json"
    path.write_text(json.dumps([example("ok 5", number=(3, 4)), example("pay 20", number=(4, 9))]), encoding="utf-8")
    where = rf"\(file {re.escape(str(path))}, row 2, column 'slots.number.span', value \[4, 9\]\)"
    with pytest.raises(DataError, match=rf"span outside the text of 6 characters \(or empty\) {where}"):
        read_nlupp(path)
    wrong = example("pay 20", number=(4, 6))
    wrong["slots"]["number"]["text"] = "2O"
    path.write_text(json.dumps([wrong]), encoding="utf-8")
    with pytest.raises(DataError, match=r"the span's text '2O' differs from the text at its offsets, '20' .*row 1, "
                       r"column 'slots.number.text'"):  # fmt: skip
        read_nlupp(path)
    with pytest.raises(DataError, match=r"larger than data.max_file_mb \(1e-06 MB\) \(file "):
        read_nlupp(path, max_file_mb=1e-6)
    path.write_text(json.dumps([{"text": "", "slots": {}}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"needs a non-empty text \(file .*, row 1, column 'text'"):
        read_nlupp(path)


def test_overlapping_spans_keep_the_longer_and_report_the_other(tmp_path: Path) -> None:
    path = tmp_path / "fold0.json"
    text = "only today"
    path.write_text(json.dumps([example(text, date_period=(0, 10), date=(5, 10))]), encoding="utf-8")
    rows, problems = read_nlupp(path)
    assert rows[0].spans == [("date_period", 0, 10)]
    (problem,) = problems
    assert (problem.row, problem.column, problem.value) == (1, "slots.date.span", "[5, 10]")
    assert problem.problem == "overlaps the longer span of date_period [0, 10]: left out"


def test_the_bundled_sample_is_nlupp_banking_and_enough_for_the_parity_gate(tmp_path: Path) -> None:
    sample = SCENARIOS.get(SCENARIO).sample()
    assert sample is not None and "CC BY 4.0" in sample.attribution and "Casanueva et al. 2022" in sample.attribution
    data = prepare_slots_data(sample.train, DataConfig(), 42, tmp_path)
    assert [Path(f).name for f in data.test_files] == ["fold3.json"]
    assert data.train_rows + data.eval_rows >= 256 and len(data.slots) == 13
    assert (
        SCENARIOS.get(SCENARIO).head == "token-classification" and SCENARIOS.get(SCENARIO).primary_metric == "span_f1"
    )


def test_the_dictionary_baseline_matches_whole_words_longest_first() -> None:
    baseline = DictionaryBaseline(
        ["pay 20 pounds", "in new york", "to york"], [[("amount", 4, 13)], [("place", 3, 11)], [("place", 3, 7)]]
    )
    assert baseline.spans("Send 20 POUNDS to New York, not yorkshire") == [
        ("amount", 5, 14), ("place", 18, 26),
    ]  # fmt: skip


# -- the served tagger ------------------------------------------------------------------------------


def rigged_tagger(tiny_model_dir: Path, folder: Path, tag: str) -> Any:
    """A tiny token classifier that answers ``tag`` for every token, exported to ONNX and loaded as served."""
    import torch

    from finetune_flows.tasks.export.model_export import export_head
    from finetune_flows.tasks.serving.slots import OnnxSlotTagger

    head = HEADS.get("token-classification")
    model = head.build_model(str(tiny_model_dir), dict(enumerate(LABELS)))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0 if label == tag else 0.0 for label in LABELS]))
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy2(tiny_model_dir / name, folder / name)
    onnx_path = export_head(folder, "token-classification", folder / "model.onnx", max_length=32, tokenizer_hash="t")
    return OnnxSlotTagger(onnx_path, folder / "tokenizer.json")


def test_the_served_tagger_reports_character_offsets_into_the_original_text(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    texts = ["café 25€", "去东京", "plain words here"]
    each_token = rigged_tagger(tiny_model_dir, tmp_path / "b", "B-amount")  # every token is a span of its own
    spans = each_token.spans(texts)
    assert [(s["text"], s["start"], s["end"]) for s in spans[0]] == [("café", 0, 4), ("25", 5, 7), ("€", 7, 8)]
    assert [s["text"] for s in spans[1]] == ["去", "东", "京"]
    assert all(s["slot"] == "amount" and 0.5 < s["score"] <= 1.0 for row in spans for s in row)
    whole = rigged_tagger(tiny_model_dir, tmp_path / "i", "I-place")  # one span over each text (BIO repair)
    served = whole.predict(texts)
    assert [json.loads(cell)[0]["text"] for cell in served["slots"]] == texts
    assert [json.loads(cell)[0]["end"] for cell in served["slots"]] == [len(t) for t in texts]


# -- one run from the command line ----------------------------------------------------------------


@pytest.mark.slow  # a full CLI run; the default suite keeps the served tagger's offsets test
def test_run_registers_a_slot_tagger_that_serves_spans(
    tiny_model_dir: Path, tmp_path: Path, prefect_harness: str
) -> None:
    state = tmp_path / "state"
    result = run_cli(
        services_environment(state, prefect_harness), "run", SCENARIO,
        "--set", f"model.source={tiny_model_dir}", "--set", "model.max_length=32",
        "--set", "training.learning_rate=5e-3", "--set", "training.max_steps=4", "--set", "training.eval_every_steps=2",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "version          : 1" in result.stdout

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version(SCENARIO, "1")
    assert version.tags["head"] == "token-classification"
    for key in ("eval.span_f1", "test.span_f1", "eval.baseline_span_f1", "test.baseline_span_f1"):
        assert 0.0 <= float(version.tags[key]) <= 1.0, key
    metrics = client.get_run(version.run_id).data.metrics
    assert {"final_span_f1", "test_span_f1", "final_f1_amount_of_money", "eval_span_f1"} <= set(metrics)
    assert metrics["final_baseline_span_f1"] > 0.1  # amounts and dates repeat across NLU++ banking texts

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{SCENARIO}/1")
        texts = ["I paid £1,200.50 to Café Zürich on 3 May", "去东京 tomorrow", "nothing"]
        out = served.predict(pd.DataFrame({"text": texts}))
        tagger = served.unwrap_python_model().scorer
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(out.columns) == ["slots"] and len(out) == 3
    assert type(tagger).__module__ == "finetune_flows_serving.slots"  # the copy shipped with the model
    assert tagger.labels[0] == "O" and len(tagger.labels) == 27  # O, then B- and I- of the 13 banking slots
    for text, cell in zip(texts, out["slots"], strict=True):
        for span in json.loads(cell):
            assert text[span["start"] : span["end"]] == span["text"] and span["slot"] in slots_of(tagger.labels)
