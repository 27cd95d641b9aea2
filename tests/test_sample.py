"""Samplers are pure functions over logits: checked on hand-written arrays."""

import math

import mlx.core as mx
import numpy as np
import pytest

from gemma3_mlx.sample import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p
from gemma3_mlx.settings import make_sampler

NEG = float("-inf")
L = mx.array([[1.0, 3.0, 2.0, 0.5]])  # probs ~ [0.086, 0.636, 0.234, 0.052]


def kept(x):
    return np.isfinite(np.array(x)).tolist()


def test_top_k():
    assert kept(apply_top_k(L, 1)) == [[False, True, False, False]]
    assert kept(apply_top_k(L, 2)) == [[False, True, True, False]]
    assert kept(apply_top_k(L, 0)) == [[True] * 4]  # 0 disables
    assert np.array_equal(np.array(apply_top_k(L, 2))[0, 1:3], [3.0, 2.0])  # kept logits unchanged


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(apply_top_p(L, 0.5)) == [[False, True, False, False]]  # 0.636 >= 0.5
    assert kept(apply_top_p(L, 0.7)) == [[False, True, True, False]]  # 0.636 < 0.7 <= 0.870
    assert kept(apply_top_p(L, 0.9)) == [[True, True, True, False]]  # 0.870 < 0.9 <= 0.956
    assert kept(apply_top_p(L, 1.0)) == [[True] * 4]
    assert kept(apply_top_p(L, 1e-6)) == [[False, True, False, False]]  # never empty


def test_min_p_relative_to_top_probability():
    # threshold = min_p * 0.636: 0.3 -> 0.19 keeps 3.0 and 2.0; 0.1 -> 0.064 adds 1.0.
    assert kept(apply_min_p(L, 0.3)) == [[False, True, True, False]]
    assert kept(apply_min_p(L, 0.1)) == [[True, True, True, False]]


def test_repetition_penalty_is_pure_and_signed():
    x = mx.array([[2.0, -2.0, 1.0]])
    y = apply_repetition_penalty(x, [0, 1, 1], 2.0)
    assert np.array(y).tolist() == [[1.0, -4.0, 1.0]]
    assert np.array(x).tolist() == [[2.0, -2.0, 1.0]]  # input untouched


def test_greedy_and_seeded_sampling():
    assert int(make_sampler(temp=0)(L)[0]) == 1
    a = [int(make_sampler(temp=1.0, seed=7)(L)[0]) for _ in range(1)]
    s1, s2 = make_sampler(temp=1.0, seed=7), make_sampler(temp=1.0, seed=7)
    seq1 = [int(s1(L)[0]) for _ in range(30)]
    seq2 = [int(s2(L)[0]) for _ in range(30)]
    assert seq1 == seq2 and seq1[0] == a[0]
    assert len(set(seq1)) > 1  # it does sample


def test_sampled_frequencies_follow_filtered_distribution():
    s = make_sampler(temp=1.0, top_k=2, seed=0)
    draws = np.array([int(s(L)[0]) for _ in range(2000)])
    assert set(draws.tolist()) <= {1, 2}
    p1 = math.exp(3) / (math.exp(3) + math.exp(2))  # 0.731 after top-2 renormalization
    assert abs((draws == 1).mean() - p1) < 0.04


def test_temperature_sharpens():
    s = make_sampler(temp=0.25, seed=1)
    draws = np.array([int(s(L)[0]) for _ in range(500)])
    assert (draws == 1).mean() > 0.95


@pytest.mark.parametrize("kwargs", [{"temp": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 1.0}, {"top_k": -2},
                                    {"repetition_penalty": 0.0}])
def test_bad_values_raise(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**kwargs)
