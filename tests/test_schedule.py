"""Linear warm-up then cosine decay to zero (study-spec §5)."""

import math

import pytest

from vitplasticity.schedule import learning_rate

LR, WARMUP, TOTAL = 0.03, 10, 110  # 100 decay steps


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    assert learning_rate(0, LR, WARMUP, TOTAL) == pytest.approx(LR / WARMUP)
    assert learning_rate(4, LR, WARMUP, TOTAL) == pytest.approx(LR * 5 / WARMUP)
    assert learning_rate(WARMUP - 1, LR, WARMUP, TOTAL) == pytest.approx(LR)


def test_cosine_starts_at_lr_and_halves_at_its_midpoint():
    assert learning_rate(WARMUP, LR, WARMUP, TOTAL) == pytest.approx(LR)
    assert learning_rate(WARMUP + 50, LR, WARMUP, TOTAL) == pytest.approx(LR / 2)
    assert learning_rate(WARMUP + 25, LR, WARMUP, TOTAL) == pytest.approx(LR * (1 + math.cos(math.pi / 4)) / 2)


def test_last_step_is_almost_zero_and_never_negative():
    last = learning_rate(TOTAL - 1, LR, WARMUP, TOTAL)
    assert last == pytest.approx(LR * (1 + math.cos(math.pi * 99 / 100)) / 2)
    assert 0 < last < LR * 1e-3
    assert learning_rate(TOTAL, LR, WARMUP, TOTAL) == pytest.approx(0.0, abs=1e-18)
    assert learning_rate(TOTAL + 50, LR, WARMUP, TOTAL) == pytest.approx(0.0, abs=1e-18)


def test_monotone_after_warmup():
    values = [learning_rate(s, LR, WARMUP, TOTAL) for s in range(WARMUP, TOTAL)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    warm = [learning_rate(s, LR, WARMUP, TOTAL) for s in range(WARMUP)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))


def test_no_warmup_starts_at_lr():
    assert learning_rate(0, LR, 0, 100) == pytest.approx(LR)
    assert learning_rate(50, LR, 0, 100) == pytest.approx(LR / 2)


def test_paper_protocol_values():
    """2,000 warm-up steps of 10,000 at lr 0.01."""
    assert learning_rate(0, 0.01, 2000, 10000) == pytest.approx(5e-6)
    assert learning_rate(1999, 0.01, 2000, 10000) == pytest.approx(0.01)
    assert learning_rate(6000, 0.01, 2000, 10000) == pytest.approx(0.005)


def test_warmup_as_long_as_training_does_not_divide_by_zero():
    assert learning_rate(4, LR, 5, 5) == pytest.approx(LR)
    assert learning_rate(5, LR, 5, 5) == pytest.approx(LR)  # progress 0 of a 1-step decay
