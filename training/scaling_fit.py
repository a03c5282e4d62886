"""Fitting mIoU against synthetic volume: a saturating power law, with uncertainty.

    mIoU(N) = a − b · (N + N0)^(−c)

``a`` is the asymptote, ``N0`` shifts the curve so N = 0 (real data only) is finite. Fitted
with scipy's ``curve_fit`` on the per-volume means, weighted by the spread of the repeats;
uncertainty of the derived quantities comes from a bootstrap over the repeats.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


def saturating_power_law(n: np.ndarray, a: float, b: float, c: float, n0: float) -> np.ndarray:
    return a - b * np.power(np.asarray(n, dtype=float) + n0, -c)


@dataclass
class ScalingFit:
    a: float
    b: float
    c: float
    n0: float
    a_std: float
    c_std: float
    n95_asymptote: float  # volume where the fit reaches 95% of a (inf/0 when never/already)
    n95_gain: float  # volume that buys 95% of the gain from N=0 to N=∞
    n95_gain_ci: tuple[float, float]  # 16th–84th percentile over the bootstrap
    points: int
    volumes: int  # distinct volumes: with 4 (4 parameters) the curve interpolates the means
    gain_in_range: float  # fitted mIoU at the largest volume minus at 0
    at_bounds: list[str]  # parameters stuck at a bound: the law does not describe the data
    bootstrap_fits: int  # resamples that converged within the time budget

    def predict(self, n) -> np.ndarray:
        return saturating_power_law(np.asarray(n), self.a, self.b, self.c, self.n0)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def volume_for_fraction_of_asymptote(a: float, b: float, c: float, n0: float, fraction: float = 0.95) -> float:
    """Smallest N ≥ 0 with mIoU(N) ≥ fraction·a."""
    gap = (1 - fraction) * a
    if gap <= 0 or b <= 0:
        return float("inf")
    n = (gap / b) ** (-1 / c) - n0
    return max(0.0, float(n))


def volume_for_fraction_of_gain(c: float, n0: float, fraction: float = 0.95) -> float:
    """N where mIoU(N) − mIoU(0) = fraction · (a − mIoU(0))."""
    return float(n0 * ((1 - fraction) ** (-1 / c) - 1))


def _bounds(span: float) -> tuple[list[float], list[float]]:
    return [0.0, 0.0, 0.01, 1e-3 * span], [1.5, np.inf, 5.0, 10 * span]


def _fit_once(volumes: np.ndarray, means: np.ndarray, sigma: np.ndarray | None,
              p0: np.ndarray | None = None, max_nfev: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    span = max(volumes.max(), 1.0)
    bounds = _bounds(span)
    if p0 is None:
        p0 = [means.max() + 0.02, max(means.max() - means.min(), 0.01) * span**0.5, 0.5, span / 10]
    else:  # a warm start (bootstrap refits): nudged inside the bounds
        p0 = np.clip(p0, np.add(bounds[0], 1e-9), np.subtract(bounds[1], 1e-9))
    with warnings.catch_warnings():  # a covariance that cannot be estimated is reported as nan
        warnings.simplefilter("ignore", OptimizeWarning)
        params, cov = curve_fit(saturating_power_law, volumes, means, p0=p0, sigma=sigma, bounds=bounds,
                                max_nfev=max_nfev)
    return params, cov


def fit_scaling(volumes, miou, *, bootstrap: int = 200, seed: int = 0, time_budget_s: float = 10.0) -> ScalingFit:
    """Fit the law to (volume, mIoU) points, several per volume when repeats exist. Data the
    law cannot describe (flat, falling, noisy) make slow refits: the bootstrap stops at
    ``time_budget_s`` and says how many resamples it used."""
    volumes, miou = np.asarray(volumes, float), np.asarray(miou, float)
    levels = np.unique(volumes)
    if len(levels) < 4:
        raise ValueError(f"need at least 4 distinct volumes to fit 4 parameters, got {len(levels)}")
    groups = [miou[volumes == v] for v in levels]
    means = np.array([g.mean() for g in groups])
    spread = np.array([g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else np.nan for g in groups])
    sigma = None
    if np.isfinite(spread).all():
        sigma = np.maximum(spread, 1e-3)  # a zero spread would make that point infinitely heavy
    params, cov = _fit_once(levels, means, sigma)
    a, b, c, n0 = params
    errs = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.isfinite(cov).all() else np.full(4, np.nan)

    rng = np.random.default_rng(seed)
    gains = []
    deadline = time.monotonic() + time_budget_s
    for _ in range(bootstrap if all(len(g) > 1 for g in groups) else 0):
        if time.monotonic() > deadline:
            break
        resampled = np.array([rng.choice(g, size=len(g)).mean() for g in groups])
        try:
            _, _, bc, bn0 = _fit_once(levels, resampled, sigma, params, max_nfev=2000)[0]
        except RuntimeError:
            continue
        gains.append(volume_for_fraction_of_gain(bc, bn0))
    ci = tuple(float(x) for x in np.percentile(gains, [16, 84])) if gains else (float("nan"),) * 2
    return ScalingFit(a=float(a), b=float(b), c=float(c), n0=float(n0), a_std=float(errs[0]),
                      c_std=float(errs[2]), n95_asymptote=volume_for_fraction_of_asymptote(a, b, c, n0),
                      n95_gain=volume_for_fraction_of_gain(c, n0), n95_gain_ci=ci, points=len(miou), volumes=len(levels),
                      gain_in_range=float(saturating_power_law(levels[-1], *params) - saturating_power_law(0.0, *params)),
                      at_bounds=_at_bounds(params, levels.max()), bootstrap_fits=len(gains))


def _at_bounds(params: np.ndarray, span: float) -> list[str]:
    lo, hi = _bounds(max(span, 1.0))
    return [name for name, p, low, high in zip(("a", "b", "c", "n0"), params, lo, hi, strict=True)
            if np.isclose(p, low, rtol=1e-4, atol=1e-9) or (np.isfinite(high) and np.isclose(p, high, rtol=1e-4))]
