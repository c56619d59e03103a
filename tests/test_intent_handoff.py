"""The hand-off policy of intent models (issue 12, item 2): temperature scaling recovers a known temperature, the
threshold is the lowest that keeps the answered messages at the target accuracy, out-of-scope recall and precision,
and the served scorer answers "handoff" below the threshold."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_flows.tasks.classification.handoff import (
    answer_curve,
    answered_precision,
    choose_threshold,
    fit_temperature,
    out_of_scope_rates,
    softmax,
)


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(6000, 5))
    probs = softmax(logits, 2.5)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.08)
    assert fit_temperature(logits / 2.5, labels) == pytest.approx(1.0, rel=0.08)  # already calibrated


def test_the_threshold_is_the_lowest_that_keeps_the_answered_at_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, True, True, False, True, False, False])
    thresholds, coverage, precision = answer_curve(confidence, correct)
    assert precision.tolist() == pytest.approx([1, 1, 1, 1, 0.8, 5 / 6, 5 / 7, 5 / 8])
    assert coverage[-1] == 1.0 and thresholds[0] == 0.99
    assert choose_threshold(confidence, correct, 0.95) == 0.8  # the four above 0.8 are right; 0.7 is wrong
    assert choose_threshold(confidence, correct, 0.8) == 0.6  # 5 of 6 answered right
    assert answered_precision(confidence, correct, 0.6) == (0.75, pytest.approx(5 / 6))
    nothing = choose_threshold(np.array([0.9, 0.8]), np.array([False, False]), 0.95)
    assert nothing > 0.9 and answered_precision(np.array([0.9, 0.8]), np.array([False, False]), nothing) == (0.0, 1.0)


def test_out_of_scope_recall_and_precision_of_the_handoff() -> None:
    confidence = np.array([0.9, 0.3, 0.2, 0.8, 0.1, 0.95])
    out_of_scope = np.array([False, True, True, True, False, False])
    recall, precision = out_of_scope_rates(confidence, out_of_scope, threshold=0.5)
    assert recall == pytest.approx(2 / 3) and precision == pytest.approx(2 / 3)  # handed off: 0.3, 0.2 (oos), 0.1
    assert out_of_scope_rates(confidence, np.zeros(6, dtype=bool), 0.5) == (0.0, 0.0)
