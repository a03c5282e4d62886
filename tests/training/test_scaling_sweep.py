"""The scaling sweep without training: the trial grid, trial configs, concurrency, config
errors, the synthetic-data check, and the report (results.csv, fit.json, a real PNG)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import ConfigError, load_config
from segfactory.cli import main
from training.scaling import (
    ScalingConfig,
    Trial,
    base_train_config,
    concurrency,
    plan_trials,
    prepare_synthetic,
    trial_config,
    trial_resources,
)
from training.scaling_fit import saturating_power_law
from training.scaling_report import fitted_curves, format_report, render_report

ROOT = Path(__file__).resolve().parents[2]
TOY_SWEEP = ROOT / "training" / "configs" / "scaling-toy.yaml"
CLASSES = ["background", "circle", "square"]


def sweep_config(*overrides: str) -> ScalingConfig:
    """The shipped toy sweep without its generator-quality axis (unless an override sets one)."""
    return load_config(ScalingConfig, TOY_SWEEP, ["gaps=null", *overrides])


def test_the_shipped_toy_sweep_has_a_gap_axis_and_volumes_its_budget_can_consume():
    cfg = load_config(ScalingConfig, TOY_SWEEP, [])
    trials = plan_trials(cfg)
    assert cfg.gaps == [0.0, 0.15, 0.3] and len(trials) == len(cfg.seeds) * (1 + 2 * 3)
    assert {t.name for t in trials if t.seed == 0} == {"v0-real-s0"} | {
        f"v{v}-p0.5-g{g:g}-s0" for v in (150, 600) for g in (0, 0.15, 0.3)}
    base = base_train_config(cfg)
    draws = base.iterations * base.batch_size * min(cfg.p_aug)
    assert max(cfg.volumes) <= draws  # every volume is (at least) seen once by a trial



def test_the_gap_axis_gives_each_trial_its_datasets_and_the_baseline_none(tmp_path):
    """The shipped sweep's gaps: volume 0 has no gap (it once failed with KeyError: None
    before any trial ran); a mixed trial trains on its gap's dataset at its volume."""
    from training.scaling import base_train_config, plan_trials, trial_configs

    cfg = load_config(ScalingConfig, TOY_SWEEP, [f"output={tmp_path}"])
    synthetic = {g: [str(tmp_path / f"synthetic-gap{g:g}")] for g in cfg.gaps}
    configs = trial_configs(base_train_config(cfg, real_path=str(tmp_path / "real")), plan_trials(cfg), synthetic, tmp_path)
    assert len(configs) == 14
    base = configs["v0-real-s1"]
    assert base.strategy == "real_only" and base.synthetic.paths == [] and base.seed == 1
    mixed = configs["v150-p0.5-g0.3-s0"]
    assert mixed.synthetic.paths == synthetic[0.3] and mixed.synthetic.volume == 150 and mixed.p_aug == 0.5

def test_grid_has_one_real_only_baseline_per_seed_and_seed_major_order():
    cfg = sweep_config("volumes=[1000,0,250,250]", "p_aug=[0.6,0.3]", "seeds=[0,1]")
    trials = plan_trials(cfg)
    assert cfg.volumes == [0, 250, 1000]
    assert [t.name for t in trials[:5]] == ["v0-real-s0", "v250-p0.3-s0", "v250-p0.6-s0", "v1000-p0.3-s0", "v1000-p0.6-s0"]
    assert len(trials) == 2 * (1 + 2 * 2) and len({t.name for t in trials}) == len(trials)
    assert [t for t in trials if t.volume == 0] == [Trial(0, None, 0), Trial(0, None, 1)]


def test_trial_configs_real_only_at_volume_zero_and_nested_subset_otherwise(tmp_path):
    base = base_train_config(sweep_config("train.iterations=77"), real_path=str(tmp_path / "real"))
    real = trial_config(base, Trial(0, None, 3), ["/syn"], tmp_path)
    mix = trial_config(base, Trial(500, 0.3, 1), ["/syn", "/syn/extensions/copies-2-3"], tmp_path)
    assert (real.strategy, real.synthetic.paths, real.synthetic.volume, real.seed) == ("real_only", [], None, 3)
    assert (mix.strategy, mix.p_aug, mix.synthetic.volume, mix.seed) == ("mix", 0.3, 500, 1)
    assert mix.synthetic.paths == ["/syn", "/syn/extensions/copies-2-3"]
    assert mix.iterations == real.iterations == 77 and mix.resume and real.resume
    assert Path(mix.output.path) == tmp_path / "trials" / "v500-p0.3-s1"
    assert mix.real.path == str(tmp_path / "real")


def test_concurrency_follows_cluster_resources():
    base = base_train_config(sweep_config())
    assert trial_resources(base) == (1.5, 0.0)  # a worker computing on 1 thread + one 0.5-CPU transform task
    assert concurrency({"CPU": 2.0}, 1.5, 0.0, None) == 1
    assert concurrency({"CPU": 16.0}, 1.5, 0.0, None) == 10
    assert concurrency({"CPU": 64.0, "GPU": 8.0}, 9.0, 2.0, None) == 4  # GPUs bind before CPUs here
    assert concurrency({"CPU": 64.0}, 1.0, 0.0, 3) == 3
    assert concurrency({"CPU": 0.5}, 1.0, 0.0, None) == 1  # never zero: one trial at a time


@pytest.mark.parametrize(("override", "message"), [
    ("volumes=[-1,100]", "volumes"),
    ("p_aug=[0.0]", "p_aug"),
    ("train.optim.nope=1", "train.optim.nope: unknown key"),
    ("train_config=missing.yaml", "train_config: no such file"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        base_train_config(sweep_config(override))


def test_too_few_synthetic_samples_stops_with_the_missing_count(tmp_path):
    from tests.training.conftest import write_synthetic

    syn = write_synthetic(tmp_path / "syn", n=30, size=16, shards=1)
    cfg = sweep_config(f"synthetic={syn}", "generate=null")
    assert prepare_synthetic(cfg, tmp_path, 30, None) == [str(syn)]
    with pytest.raises(ConfigError, match=r"has 30 samples; the largest volume \(50\) needs 20 more"):
        prepare_synthetic(cfg, tmp_path, 50, None)
    assert prepare_synthetic(sweep_config("generate=null"), tmp_path, 0, None) == []  # real-only sweep
    with pytest.raises(ConfigError, match="no finished dataset at .*nowhere"):
        prepare_synthetic(sweep_config(f"synthetic={tmp_path / 'nowhere'}", "generate=null"), tmp_path, 5, None)


# --- the report ---------------------------------------------------------------------------------

TRUE = {0.3: (0.62, 20.0, 1.0, 200.0), 0.6: (0.70, 40.0, 1.0, 200.0)}  # a, b, c, n0 per p_aug


def fake_sweep(out: Path, noise: float = 0.004, flat: bool = False) -> ScalingConfig:
    """A finished sweep whose mIoUs follow the law per p_aug (real-only from the 0.6 law);
    ``flat``: 0.6 at every volume, the noise alone."""
    cfg = sweep_config("volumes=[0,250,500,1000,2000,4000,8000]", "p_aug=[0.3,0.6]", "seeds=[0,1,2]", f"output={out}")
    trials = plan_trials(cfg)
    base = base_train_config(cfg)
    (out / "sweep.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"fingerprint": "x", "sweep": cfg.model_dump(mode="json"),
                                                "train": base.model_dump(mode="json"), "synthetic_paths": [],
                                                "trials": [asdict(t) | {"name": t.name} for t in trials]}))
    rng = np.random.default_rng(0)
    for t in trials:
        run = out / "trials" / t.name
        run.mkdir(parents=True)
        if t.name == "v8000-p0.3-s2":
            (run / "error.txt").write_text("RuntimeError: worker died\n")
            continue
        miou = float((0.6 if flat else saturating_power_law(t.volume, *TRUE[t.p_aug or 0.6])) + rng.normal(0, noise))
        (run / "final.json").write_text(json.dumps({
            "final_step": base.iterations, "miou": miou, "pixel_acc": 0.9, "classes": CLASSES,
            # as run_train writes it: {class: IoU}, None for a class absent from val
            "per_class_iou": dict(zip(CLASSES, [0.9, miou, None], strict=True)), "wall_s": 42.0, "synthetic_fraction": t.p_aug or 0.0}))
    return cfg


@pytest.mark.subprocess
def test_report_writes_results_fit_and_a_real_png(tmp_path):
    out = tmp_path / "sweep"
    fake_sweep(out)
    report = render_report(out)

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (1 + 6 * 2)
    assert {"volume", "p_aug", "seed", "miou", "iou_circle", "iterations", "wall_s"} <= set(rows[0])
    for r in rows:
        if r["status"] == "ok":  # per-class IoU columns hold the values, not the class names
            assert (float(r["iou_background"]), r["iou_square"]) == (0.9, "")
            assert float(r["iou_circle"]) == pytest.approx(float(r["miou"]), rel=1e-5)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["name"] for r in failed] == ["v8000-p0.3-s2"] and "worker died" in failed[0]["error"]
    assert report["failed"] == ["v8000-p0.3-s2"] and report["finished"] == len(rows) - 1

    fit = json.loads((out / "fit.json").read_text())
    hi, lo = fit["lines"]["0.6"]["fit"], fit["lines"]["0.3"]["fit"]
    assert hi["a"] == pytest.approx(0.70, abs=0.02) and lo["a"] == pytest.approx(0.62, abs=0.03)
    assert fit["lines"]["0.6"]["by_volume"]["0"]["n"] == 3  # the shared real-only baseline
    assert fit["lines"]["0.3"]["by_volume"]["8000"]["n"] == 2  # the failed trial is left out
    a, b, c, n0 = TRUE[0.6]
    assert hi["n95_gain"] == pytest.approx(n0 * (0.05 ** (-1 / c) - 1), rel=0.5)
    assert {v["p_aug"] for v in fit["best_p_aug_per_volume"].values()} == {0.6}
    assert fit["lines"]["0.6"]["synthetic_draws_per_trial"] == round(fit["iterations"] * 8 * 0.6)

    png = Image.open(out / "scaling.png").convert("RGB")
    assert png.size == (960, 600)
    pixels = np.asarray(png).reshape(-1, 3)
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])  # matplotlib's first two colours
    assert (np.abs(pixels - blue).sum(1) < 30).sum() > 500  # points, error bars and curve of each line
    assert (np.abs(pixels - orange).sum(1) < 30).sum() > 500


@pytest.mark.subprocess
def test_report_command_rerenders_and_rejects_a_non_sweep_dir(tmp_path, capsys):
    out = tmp_path / "sweep"
    fake_sweep(out)
    (out / "scaling.png").unlink(missing_ok=True)
    assert main(["scaling", "--report", str(out)]) == 1  # a failed trial: exit 1, everything still written
    printed = capsys.readouterr()
    assert "p_aug=0.6" in printed.out and "95% of the gain at N=" in printed.out and "v8000-p0.3-s2" in printed.out
    assert "1 trial(s) failed: v8000-p0.3-s2" in printed.err  # the exit names the failed trial
    assert (out / "scaling.png").is_file()
    assert main(["scaling", "--report", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    assert main(["scaling"]) == 2


@pytest.mark.subprocess
def test_report_has_one_curve_per_p_aug_and_gap(tmp_path):
    """With the generator-quality axis, each (p_aug, gap) is its own curve sharing the
    real-only baseline, and the best curve per volume names its gap."""
    out = tmp_path / "sweep"
    cfg = sweep_config("volumes=[0,150,600]", "p_aug=[0.5]", "gaps=[0,0.3]", "seeds=[0,1]", f"output={out}")
    trials = plan_trials(cfg)
    base = base_train_config(cfg)
    out.mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"fingerprint": "x", "sweep": cfg.model_dump(mode="json"),
                                                "train": base.model_dump(mode="json"), "synthetic_paths": {},
                                                "trials": [asdict(t) | {"name": t.name} for t in trials]}))
    for t in trials:
        run = out / "trials" / t.name
        run.mkdir(parents=True)
        miou = 0.6 + (0.0 if t.gap is None else (0.05 if t.gap == 0 else -0.1) * t.volume / 600) + 0.001 * t.seed
        (run / "final.json").write_text(json.dumps({
            "final_step": base.iterations, "miou": miou, "pixel_acc": 0.9, "classes": CLASSES,
            "per_class_iou": dict(zip(CLASSES, [0.9, miou, None], strict=True)), "wall_s": 1.0, "synthetic_fraction": 0.5}))
    report = render_report(out)
    assert set(report["lines"]) == {"0.5 gap=0", "0.5 gap=0.3"}
    assert report["lines"]["0.5 gap=0.3"]["by_volume"]["600"]["mean"] == pytest.approx(0.5005)
    assert report["lines"]["0.5 gap=0"]["by_volume"]["0"]["mean"] == pytest.approx(0.6005)  # the shared baseline
    assert report["best_p_aug_per_volume"]["600"]["gap"] == 0 and report["best_p_aug_per_volume"]["600"]["line"] == "0.5 gap=0"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["gap"] for r in rows}) == ["", "0", "0.3"]
    assert "0.5 gap=0.3" in format_report(report)


@pytest.mark.subprocess
def test_the_plot_draws_a_fit_only_where_it_resolved_and_only_over_the_points(tmp_path):
    law = render_report(fake_sweep(tmp_path / "law").output.path)
    curves = fitted_curves(law)
    assert set(curves) == {"0.3", "0.6"}
    x, y = curves["0.6"]
    assert (x.min(), x.max()) == (0, pytest.approx(8000))  # from the baseline to the largest volume, no further
    for v in (0, 1000, 8000):  # the curve passes through the seed means
        i = int(np.argmin(np.abs(x - v)))
        assert y[i] == pytest.approx(law["lines"]["0.6"]["by_volume"][str(v)]["mean"], abs=0.01)

    flat = render_report(fake_sweep(tmp_path / "flat", flat=True).output.path)
    assert all(not line["fit"] or not line["fit"]["rise_resolved"] for line in flat["lines"].values())
    assert fitted_curves(flat) == {}  # points and error bars only
    assert Image.open(tmp_path / "flat" / "scaling.png").size == (960, 600)
