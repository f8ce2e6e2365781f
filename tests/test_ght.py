"""Gavish and Donoho's exact optimal hard threshold (unknown noise), checked against values computed here with numpy."""
import math
import re

import numpy as np
import pytest
import torch

from toukit.ranks import ght_omega, optimal_hard_threshold_rank


def _lambda_star(beta: float) -> float:
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta ** 2 + 14 * beta + 1)))


def _cubic(beta: float) -> float:
    return 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43


def _omega_by_grid(beta: float, points: int = 2_000_001) -> float:
    """omega(beta) from the Marchenko-Pastur density integrated on a fine uniform grid in x (trapezoids, cumsum,
    interpolation): no scipy and no change of variables, so independent of toukit's quad + brentq path."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    x = np.linspace(lo, hi, points)
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0.0, None)) / (2 * np.pi * beta * x)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    assert abs(cdf[-1] - 1.0) < 1e-6  # the grid integrates the law to 1
    return _lambda_star(beta) / math.sqrt(np.interp(0.5, cdf, x))


def _omega_at_one() -> float:
    """omega(1) from the quarter-circle law of the singular values at beta = 1: density sqrt(4 - s^2) / pi on [0, 2],
    CDF (s sqrt(4 - s^2) / 2 + 2 asin(s / 2)) / pi, median by bisection; mu_1 is that median squared."""
    lo, hi = 0.0, 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        cdf = (mid * math.sqrt(4 - mid * mid) / 2 + 2 * math.asin(mid / 2)) / math.pi
        lo, hi = (mid, hi) if cdf < 0.5 else (lo, mid)
    return _lambda_star(1.0) / ((lo + hi) / 2)


def test_omega_at_one_is_the_published_value():
    assert round(ght_omega(1.0), 3) == 2.858
    assert ght_omega(1.0) == pytest.approx(_omega_at_one(), abs=1e-9)
    assert _lambda_star(1.0) == pytest.approx(4 / math.sqrt(3))


@pytest.mark.parametrize('beta', [0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
def test_omega_matches_an_independent_grid_integration(beta):
    assert ght_omega(beta) == pytest.approx(_omega_by_grid(beta), abs=1e-3)


def test_omega_tends_to_sqrt2_and_is_cached():
    assert ght_omega(1e-9) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert ght_omega(0.3) == ght_omega(0.3)
    assert ght_omega(np.float32(0.5)) == pytest.approx(ght_omega(0.5), abs=1e-6)


def test_cubic_approximation_is_within_their_stated_accuracy():
    betas = np.linspace(0.001, 1.0, 60)
    gaps = [abs(_cubic(b) - ght_omega(float(b))) for b in betas]
    assert max(gaps) < 0.02


def test_even_count_uses_the_mean_of_the_two_middle_values():
    s = torch.tensor([10.0, 3.0, 1.0, 0.1])  # median 2 (not the lower middle value 1): tau = 2.858 * 2 = 5.72
    assert optimal_hard_threshold_rank(s, (4, 4)) == 1  # the lower median would keep 3.0 too (tau = 2.86)
    assert optimal_hard_threshold_rank(s.flip(0), (4, 4)) == 1  # order does not matter
    odd = torch.tensor([10.0, 3.0, 1.0, 0.5, 0.1])  # median 1: tau = 2.858
    assert optimal_hard_threshold_rank(odd, (5, 5)) == 2


def test_exact_omega_not_the_cubic_decides_a_borderline_value():
    # beta = 0.01: exact omega 1.4371 (grid), cubic 1.4481; median 1, so 1.442 sits between the two thresholds
    assert _omega_by_grid(0.01) < 1.442 < _cubic(0.01)
    s = torch.tensor([5.0, 1.442] + [1.0] * 98)
    assert optimal_hard_threshold_rank(s, (100, 10_000)) == 2
    assert optimal_hard_threshold_rank(s, (10_000, 100)) == 2


def test_pure_noise_gets_the_minimum_rank():
    g = torch.Generator().manual_seed(0)
    for shape in [(300, 200), (256, 256), (100, 400)]:
        noise = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert optimal_hard_threshold_rank(torch.linalg.svdvals(noise), shape) == 1


def test_planted_low_rank_signal_is_recovered_exactly():
    g = torch.Generator().manual_seed(1)
    for (m, n), strengths in [((200, 120), [100.0, 90, 80, 70, 60]), ((150, 150), [120.0, 100, 80]),
                              ((64, 512), [200.0, 150, 120, 100, 90, 80, 70])]:
        k = len(strengths)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        signal = u @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ v.T
        noisy = signal + torch.randn(m, n, generator=g, dtype=torch.float64)  # bulk edge sqrt(m) + sqrt(n) < 31
        assert optimal_hard_threshold_rank(torch.linalg.svdvals(noisy), (m, n)) == k


@pytest.mark.parametrize('shape', [(0, 5), (5, 0), (-2, 3), (3,), (3, 4, 5), (2.5, 3), (True, 3), 'ab', None])
def test_bad_shape_is_a_value_error_naming_it(shape):
    with pytest.raises(ValueError, match=re.escape(f'shape={shape!r}')):
        optimal_hard_threshold_rank(torch.ones(3), shape)


@pytest.mark.parametrize('beta', [0.0, -0.5, 1.5, float('nan'), float('inf'), True, '0.5', None])
def test_bad_beta_is_a_value_error_naming_it(beta):
    with pytest.raises(ValueError, match=re.escape(f'beta={beta!r}')):
        ght_omega(beta)


def test_bad_singular_values_are_a_value_error():
    with pytest.raises(ValueError, match='non-empty 1-D'):
        optimal_hard_threshold_rank(torch.ones(0), (3, 4))
    with pytest.raises(ValueError, match='non-empty 1-D'):
        optimal_hard_threshold_rank(torch.ones(2, 2), (3, 4))
