"""Tests for the pure parts of benchmarks/label_noise.py: noise injection, scoring and the oracle ceiling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import label_noise as bench  # noqa: E402


def test_inject_noise_flips_exactly_the_rate_to_another_class():
    y = np.repeat(np.arange(5), 40)
    noisy = bench.inject_noise(y, 5, 0.2, seed=3)
    assert (noisy != y).sum() == 40  # round(0.2 * 200), and a flipped label never lands on its own class
    assert noisy.min() >= 0 and noisy.max() < 5
    assert np.array_equal(noisy, bench.inject_noise(y, 5, 0.2, seed=3))  # fixed seed, same noise
    assert not np.array_equal(noisy, bench.inject_noise(y, 5, 0.2, seed=4))


def test_score_counts_restored_and_broken_labels():
    truth = np.array([0, 0, 1, 1, 2])
    noisy = np.array([1, 0, 1, 1, 0])  # rows 0 and 4 are wrong
    final = np.array([0, 2, 1, 1, 0])  # row 0 restored, row 1 broken, row 4 still wrong
    s = bench.score(truth, noisy, final)
    assert s["noisy_rows"] == 2 and s["rows_changed"] == 2 and s["clean_broken"] == 1
    assert s["correction_precision"] == 0.5 and s["correction_recall"] == 0.5 and s["final_accuracy"] == 0.6


def test_oracle_rule_is_never_worse_than_leaving_the_labels_alone():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    noisy = bench.inject_noise(truth, 4, 0.3, seed=0)
    proba = np.full((300, 4), 0.05)
    proba[np.arange(300), truth] = 0.85  # a classifier that is right and sure on every row
    labels, at = bench.oracle_rule(truth, noisy, proba)
    assert (labels == truth).all() and at["max_self_confidence"] >= 0.05
    wrong = proba.copy()
    wrong[np.arange(300), truth], wrong[np.arange(300), (truth + 1) % 4] = 0.05, 0.85  # sure and always wrong
    labels, _ = bench.oracle_rule(truth, noisy, wrong)
    assert (labels == truth).mean() >= (noisy == truth).mean()
