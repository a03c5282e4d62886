"""The saturating power-law fit recovers known parameters from noisy points."""

import numpy as np
import pytest

from training.scaling_fit import fit_scaling, saturating_power_law, volume_for_fraction_of_gain

TRUE = {"a": 0.72, "b": 2.0, "c": 0.6, "n0": 300.0}
VOLUMES = [0, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000]


def noisy_points(repeats: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    vols = np.repeat(VOLUMES, repeats)
    return vols, saturating_power_law(vols, **TRUE) + rng.normal(0, noise, len(vols))


def test_fit_recovers_known_parameters():
    vols, miou = noisy_points(repeats=3, noise=0.0015)
    fit = fit_scaling(vols, miou, bootstrap=100)
    assert fit.a == pytest.approx(TRUE["a"], abs=0.01)
    assert fit.c == pytest.approx(TRUE["c"], rel=0.3)
    true_n95 = volume_for_fraction_of_gain(TRUE["c"], TRUE["n0"])
    assert fit.n95_gain == pytest.approx(true_n95, rel=0.35)
    lo, hi = fit.n95_gain_ci
    assert lo < fit.n95_gain < hi
    grid = np.array([0, 100, 1000, 10000, 50000])
    assert np.abs(fit.predict(grid) - saturating_power_law(grid, **TRUE)).max() < 0.01
    assert fit.a_std > 0 and fit.points == len(vols)


def test_95_percent_of_asymptote_volume_is_consistent_with_the_curve():
    fit = fit_scaling(*noisy_points(repeats=2, noise=0.002, seed=1), bootstrap=0)
    n = fit.n95_asymptote
    assert fit.predict(n) == pytest.approx(0.95 * fit.a, abs=1e-6) or (n == 0 and fit.predict(0) >= 0.95 * fit.a)


def test_too_few_volumes_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4 distinct volumes"):
        fit_scaling([0, 10, 20], [0.1, 0.2, 0.3])
