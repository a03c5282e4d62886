"""Fitting mIoU against synthetic volume: a saturating power law, with uncertainty.

    mIoU(N) = a − b · (N + N0)^(−c)

``a`` is the asymptote, ``N0`` shifts the curve so N = 0 (real data only) is finite. Fitted
with scipy's ``curve_fit`` on the per-volume means, weighted by the spread of the repeats;
uncertainty of the derived quantities comes from a bootstrap over the repeats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import curve_fit


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


def _fit_once(volumes: np.ndarray, means: np.ndarray, sigma: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    span = max(volumes.max(), 1.0)
    p0 = [means.max() + 0.02, max(means.max() - means.min(), 0.01) * span**0.5, 0.5, span / 10]
    bounds = ([0.0, 0.0, 0.01, 1e-3 * span], [1.5, np.inf, 5.0, 10 * span])
    params, cov = curve_fit(saturating_power_law, volumes, means, p0=p0, sigma=sigma, bounds=bounds,
                            maxfev=20000)
    return params, cov


def fit_scaling(volumes, miou, *, bootstrap: int = 200, seed: int = 0) -> ScalingFit:
    """Fit the law to (volume, mIoU) points, several per volume when repeats exist."""
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
    (a, b, c, n0), cov = _fit_once(levels, means, sigma)
    errs = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.isfinite(cov).all() else np.full(4, np.nan)

    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(bootstrap if all(len(g) > 1 for g in groups) else 0):
        resampled = np.array([rng.choice(g, size=len(g)).mean() for g in groups])
        try:
            _, _, bc, bn0 = _fit_once(levels, resampled, sigma)[0]
        except RuntimeError:
            continue
        gains.append(volume_for_fraction_of_gain(bc, bn0))
    ci = tuple(float(x) for x in np.percentile(gains, [16, 84])) if gains else (float("nan"),) * 2
    return ScalingFit(a=float(a), b=float(b), c=float(c), n0=float(n0), a_std=float(errs[0]),
                      c_std=float(errs[2]), n95_asymptote=volume_for_fraction_of_asymptote(a, b, c, n0),
                      n95_gain=volume_for_fraction_of_gain(c, n0), n95_gain_ci=ci, points=len(miou))
