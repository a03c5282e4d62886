"""What a scaling sweep found: ``results.csv``, ``fit.json`` and ``scaling.png``.

A sweep renders them from its Tune ResultGrid (each trial's last report: its ``final.json``, or
its error); ``segfactory scaling --report DIR`` rebuilds them from the trial directories
(``trials/<name>/final.json``, ``error.txt``): a finished sweep, or a running one so far.

- ``results.csv``: one row per trial: volume, p_aug (empty for the real-only baseline), seed,
  status, miou, pixel_acc, iou_<class>..., iterations, wall_s, synthetic_fraction, error.
- ``fit.json``: per p_aug, the saturating power law fitted to the baseline and that line's
  points (:mod:`training.scaling_fit`), N95, the samples a trial can draw; the best p_aug per
  volume; per-volume mean/std/n.
- ``scaling.png``: mIoU against volume (symlog x so the baseline at 0 is shown), mean ± std
  over seeds as error bars, every trial as a faint dot; the fitted curve (over the points'
  volumes) and its N95 only for a line whose fit resolved a rise.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from typing import Any

import numpy as np

from core import storage
from core.storage import Location
from training.rundir import locate, read_json, read_text

log = logging.getLogger("segfactory.scaling")
TRIALS = "trials"  # the sweep directory's folder of trial run directories


def collect(out: str | os.PathLike | Location, results: dict[str, dict[str, Any]] | None = None
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per planned trial (finished, failed or not run yet) and the class names.
    ``results``: per trial name, the sweep's Tune ResultGrid entry (``final``: what final.json
    holds, or ``error``); trials without one (``--report``, a sweep from before Tune) are read
    from their run directories."""
    out = locate(out, "output.path")
    sweep = read_json(out / "sweep.json")
    iterations = sweep["train"]["iterations"]
    rows, classes = [], []
    for t in sweep["trials"]:
        run = out / TRIALS / t["name"]
        row: dict[str, Any] = {"volume": t["volume"], "p_aug": t["p_aug"], "gap": t.get("gap"), "seed": t["seed"],
                               "name": t["name"], "line": line_key(t["p_aug"], t.get("gap"))}
        result = (results or {}).get(t["name"]) or {}
        final = result.get("final") if result else read_json(run / "final.json")
        error = result.get("error") if result else read_text(run / "error.txt")
        if final and final.get("final_step") == iterations:
            classes = final["classes"]
            row |= {"status": "ok", "miou": final["miou"], "pixel_acc": final["pixel_acc"],
                    "iterations": final["final_step"], "wall_s": final["wall_s"],
                    "synthetic_fraction": final.get("synthetic_fraction"),
                    **{f"iou_{c}": final["per_class_iou"].get(c) for c in classes}}  # {class: IoU}
        elif error is not None:
            row |= {"status": "failed", "error": error.strip()[:500]}
        else:
            row |= {"status": "not_run"}
        rows.append(row)
    return rows, classes


def write_results(rows: list[dict[str, Any]], classes: list[str], path: str | os.PathLike | Location) -> None:
    columns = ["volume", "p_aug", "gap", "seed", "status", "miou", "pixel_acc", *[f"iou_{c}" for c in classes],
               "iterations", "wall_s", "synthetic_fraction", "name", "error"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    storage.write_text(locate(path), buf.getvalue())


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def line_key(p_aug: float | None, gap: float | None) -> str | None:
    """The curve a trial belongs to: its p_aug, and its generator's toy.gap when the sweep has
    that axis (None: the real-only baseline, shared by every curve)."""
    if p_aug is None:
        return None
    return f"{p_aug:g}" if gap is None else f"{p_aug:g} gap={gap:g}"


def analyse(rows: list[dict[str, Any]], sweep: dict[str, Any]) -> dict[str, Any]:
    """Per-p_aug curves and fits, and the best p_aug at each volume."""
    from training.scaling_fit import fit_scaling

    ok = [r for r in rows if r["status"] == "ok"]
    train = sweep["train"]
    per_step = train["batch_size"] * train["grad_accum"] * train["workers"]["num_workers"]
    lines: dict[str, Any] = {}
    specs = [(p, g) for p in sweep["sweep"]["p_aug"] for g in (sweep["sweep"].get("gaps") or [None])]
    for p, g in specs:
        key = line_key(p, g)
        pts = [r for r in ok if r["p_aug"] is None or r["line"] == key]
        by_volume = {v: _stats([r["miou"] for r in pts if r["volume"] == v]) for v in sorted({r["volume"] for r in pts})}
        line: dict[str, Any] = {"p_aug": p, "gap": g, "by_volume": {str(v): s for v, s in by_volume.items()},
                                "synthetic_draws_per_trial": round(train["iterations"] * per_step * p)}
        try:
            line["fit"] = fit_scaling([r["volume"] for r in pts], [r["miou"] for r in pts]).to_dict()
        except (ValueError, RuntimeError) as exc:  # too few volumes, or no convergence: say so
            line["fit"], line["fit_error"] = None, str(exc)
        base, top = by_volume.get(0), by_volume[max(by_volume)] if by_volume else None
        if base and top is not base:  # is the fitted rise bigger than the noise of the two ends?
            line["standard_error_ends"] = math.hypot(base["std"] / math.sqrt(base["n"]), top["std"] / math.sqrt(top["n"]))
        if line["fit"]:  # resolved: no parameter at a bound, and a rise of 2 standard errors (~95%)
            line["fit"]["rise_resolved"] = (not line["fit"]["at_bounds"]
                                            and line["fit"]["gain_in_range"] > 2 * line.get("standard_error_ends", 0.0))
        lines[key] = line
    best = {}
    for v in sorted({r["volume"] for r in ok if r["volume"] > 0}):
        means = {k: line["by_volume"][str(v)]["mean"] for k, line in lines.items() if str(v) in line["by_volume"]}
        top = max(means, key=means.get)
        best[str(v)] = {"p_aug": lines[top]["p_aug"], "gap": lines[top]["gap"], "line": top, "miou": means[top], "all": means}
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    not_run = [r["name"] for r in rows if r["status"] == "not_run"]
    return {"iterations": train["iterations"], "samples_per_step": per_step, "trials": len(rows),
            "finished": len(ok), "failed": failed, "not_run": not_run, "lines": lines,
            "best_p_aug_per_volume": best, "fit_formula": "miou(N) = a - b * (N + n0) ** (-c)"}


def fitted_curves(analysis: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(volume, mIoU) of each line's fitted law, for the lines whose fit resolved a rise
    (:func:`analyse`'s ``rise_resolved``), over the volumes the line has points at."""
    curves = {}
    for key, line in analysis["lines"].items():
        fit = line.get("fit")
        vols = sorted(int(v) for v in line["by_volume"])
        if not (fit and fit.get("rise_resolved")) or len(vols) < 2:
            continue
        first = min(v for v in vols if v > 0)
        grid = np.concatenate([np.linspace(0, first, 20, endpoint=False) if vols[0] == 0 else [],
                               np.geomspace(first, vols[-1], 200)])
        curves[key] = (grid, fit["a"] - fit["b"] * np.power(grid + fit["n0"], -fit["c"]))
    return curves


def plot(analysis: dict[str, Any], rows: list[dict[str, Any]], path: str | os.PathLike | Location) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    nonzero = sorted({r["volume"] for r in ok if r["volume"] > 0})
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max(nonzero or [1])
    curves = fitted_curves(analysis)
    for i, (key, line) in enumerate(analysis["lines"].items()):
        color = colors[i % len(colors)]
        vols = np.array([int(v) for v in line["by_volume"]])
        mean = np.array([s["mean"] for s in line["by_volume"].values()])
        std = np.array([s["std"] for s in line["by_volume"].values()])
        pts = [r for r in ok if r["p_aug"] is None or r["line"] == key]
        dodge = 1 + 0.04 * (i - (len(analysis["lines"]) - 1) / 2)  # side by side, not on top of each other
        ax.scatter([r["volume"] * dodge for r in pts], [r["miou"] for r in pts], s=10, color=color, alpha=0.35)
        fit = line.get("fit")
        # no curve where the fit did not resolve: one the data do not support would read as a finding
        note = "" if key in curves else " (no fit resolved)" if fit else " (too few volumes to fit)"
        ax.errorbar(vols * dodge, mean, yerr=std, fmt="o", color=color, capsize=4, label=f"p_aug={key}: mean ± std{note}")
        if key in curves:
            ax.plot(*curves[key], color=color, lw=1.5,
                    label=f"fit: a={fit['a']:.3f}, c={fit['c']:.2f}, N95(gain)={fit['n95_gain']:.0f}")
            if 0 < fit["n95_gain"] < top * 2:
                ax.axvline(fit["n95_gain"], color=color, ls=":", lw=1)
    if nonzero:
        ax.set_xscale("symlog", linthresh=nonzero[0])
    ax.set_xlim(left=-0.1 * (nonzero[0] if nonzero else 1))  # the real-only points off the axis line
    ax.set_xlabel("synthetic volume (samples; 0 = real only; symlog axis)")
    ax.set_ylabel("val mIoU")
    ax.set_title(f"mIoU vs synthetic volume at {analysis['iterations']} iterations "
                 f"({analysis['finished']}/{analysis['trials']} trials)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # where it hides the fewest points
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(locate(path), buf.getvalue())


def render_report(out: str | os.PathLike | Location, results: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write results.csv, fit.json and scaling.png for the sweep in ``out`` (a directory or a
    URI), from ``results`` (the sweep's ResultGrid, see :func:`collect`) or the trial directories;
    returns fit.json's content."""
    out = locate(out, "--report")
    sweep = read_json(out / "sweep.json")
    if sweep is None:
        from core.config import ConfigError

        raise ConfigError(f"--report: {out} is not a sweep directory (no sweep.json)")
    rows, classes = collect(out, results)
    write_results(rows, classes, out / "results.csv")
    analysis = analyse(rows, sweep)
    storage.write_text(out / "fit.json", json.dumps(_finite(analysis), indent=1))
    plot(analysis, rows, out / "scaling.png")
    return analysis | {"out": str(out)}


def _finite(v: Any) -> Any:
    """JSON has no inf/nan: write null (an N95 the fit never reaches, a CI without repeats)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def format_report(analysis: dict[str, Any]) -> str:
    """The console summary: mean mIoU per volume and p_aug, the fits, the best p_aug."""
    lines = [f"{analysis['finished']}/{analysis['trials']} trials finished at {analysis['iterations']} iterations"
             + (f"; failed: {', '.join(analysis['failed'])}" if analysis["failed"] else "")
             + (f"; not run: {len(analysis['not_run'])}" if analysis["not_run"] else "")]
    for key, line in analysis["lines"].items():
        lines.append(f"p_aug={key} (a trial draws ~{line['synthetic_draws_per_trial']} synthetic samples):")
        for v, s in line["by_volume"].items():
            lines.append(f"  volume {int(v):>8}  mIoU {s['mean']:.4f} ± {s['std']:.4f}  (n={s['n']})")
        base, top = line["by_volume"].get("0"), line["by_volume"][max(line["by_volume"], key=int)]
        if base and top is not base:
            noise = math.hypot(base["std"] / math.sqrt(base["n"]), top["std"] / math.sqrt(top["n"]))
            lines.append(f"  largest volume vs real only: {top['mean'] - base['mean']:+.4f} (standard error {noise:.4f})")
        fit = line.get("fit")
        if fit and not fit["rise_resolved"]:
            why = f"{', '.join(fit['at_bounds'])} at a bound" if fit["at_bounds"] else "no rise of 2 standard errors"
            lines.append(f"  the law does not describe these points ({why}): no N95 "
                         f"(fitted gain over the range {fit['gain_in_range']:+.4f})")
        elif fit:
            if fit["volumes"] <= 4:
                lines.append("  4 volumes for 4 parameters: the curve interpolates the means; N95 is not constrained")
            ci = fit["n95_gain_ci"]
            lines.append(f"  fit a={fit['a']:.4f}±{fit['a_std']:.4f} b={fit['b']:.4g} c={fit['c']:.3f} n0={fit['n0']:.4g}; "
                         f"95% of asymptote at N={fit['n95_asymptote']:.0f}; 95% of the gain at N={fit['n95_gain']:.0f} "
                         f"(bootstrap 16–84% over {fit['bootstrap_fits']} resamples: {ci[0]:.0f}–{ci[1]:.0f})")
        else:
            lines.append(f"  no fit: {line.get('fit_error')}")
    if analysis["best_p_aug_per_volume"]:
        lines.append("best p_aug per volume: " + ", ".join(
            f"{v}: {b.get('line') or b['p_aug']} ({b['miou']:.4f})" for v, b in analysis["best_p_aug_per_volume"].items()))
    return "\n".join(lines)
