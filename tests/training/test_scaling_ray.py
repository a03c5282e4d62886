"""The scaling sweep on Ray Tune: a SIGKILLed sweep resumes (``Tuner.restore``) without repeating
finished trials and the killed trial goes on from its checkpoint, a failing trial is retried
(``FailureConfig``) and does not stop the others, and missing synthetic samples are generated on
demand with the same ids and bytes one bigger generation run would have made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from core import schema as S
from core.config import load_config
from pipelines.config import GenerateConfig
from training.scaling import ScalingConfig, prepare_synthetic, run_sweep

ROOT = Path(__file__).resolve().parents[2]
TOY_SWEEP = ROOT / "training" / "configs" / "scaling-toy.yaml"
SEGGEN_TOY = ROOT / "pipelines" / "configs" / "seggen-toy.yaml"


def sweep_overrides(real: Path, syn: Path, out: Path, quick) -> list[str]:
    train = [f"train.{o}" for o in quick(real, out / "unused")
             if not o.startswith(("real.format", "output.path", "ray."))]
    # 20 steps, a checkpoint every 4: a window to kill a trial between its checkpoints
    return [*train, "train.iterations=20", "train.eval_interval=20", "train.checkpoint_interval=4",
            "volumes=[0,40,80]", "p_aug=[0.5]", "gaps=null", "seeds=[0]", f"synthetic={syn}", "generate=null",
            "toy_source=null", f"output={out}", "max_concurrent=1", "max_failures=1", "ray.no_progress_timeout_s=240"]


def _last_step(run: Path) -> int:
    rows = (run / "metrics.csv").read_text().splitlines()[1:] if (run / "metrics.csv").is_file() else []
    return max([int(r.split(",")[0]) for r in rows if r.count(",") == 10], default=0)  # whole rows only


def test_killed_sweep_resumes_without_repeating_finished_trials_and_isolates_a_failure(
        train_ray, small_real, small_synthetic, quick, tmp_path):
    from ray.tune import ExperimentAnalysis

    out = tmp_path / "sweep"
    overrides = sweep_overrides(small_real, small_synthetic, out, quick)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "scaling", "--config", str(TOY_SWEEP), *overrides],
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "trials" / "v0-real-s0" / "final.json"
    second = out / "trials" / "v40-p0.5-s0"
    deadline = time.time() + 400
    while time.time() < deadline and _last_step(second) < 9 and proc.poll() is None:
        time.sleep(0.1)  # step 9 reported: checkpoint 8 is written (a report waits for its upload), 12 not yet
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver, its Ray, Tune and the trial it was running
    proc.wait(timeout=60)
    assert first.is_file(), "the first trial must finish before the kill"
    assert not (second / "final.json").exists(), "the kill must land mid-trial"
    # the checkpoints the killed trial had (how far it got before the kill depends on the machine's load)
    saved = sorted(int(c.name.split("_")[1]) for c in second.glob("checkpoint_*") if (c / "train_state.pt").is_file())
    assert saved and saved[-1] < 20
    assert (out / "tune" / "tuner.pkl").is_file()  # Tune's experiment state, in the sweep directory
    before = (first.stat().st_mtime_ns, first.read_text(), (first.parent / "metrics.csv").read_text())

    # the last trial's only checkpoint is corrupt: that trial fails (and its retry), the sweep goes on
    broken = out / "trials" / "v80-p0.5-s0" / "checkpoint_0000004"  # (v80 had not started)
    broken.mkdir(parents=True)
    (broken / "train_state.pt").write_bytes(b"not a checkpoint")
    report = run_sweep(load_config(ScalingConfig, TOY_SWEEP, overrides))

    assert (first.stat().st_mtime_ns, first.read_text(), (first.parent / "metrics.csv").read_text()) == before
    resumed = [json.loads(line) for line in (second / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in resumed if e["event"] == "resumed"] == saved[-1:]  # the killed trial went on from its last checkpoint
    assert json.loads((second / "final.json").read_text())["final_step"] == 20
    assert report["failed"] == ["v80-p0.5-s0"] and report["finished"] == 2
    assert "train_state.pt" in (out / "trials" / "v80-p0.5-s0" / "error.txt").read_text()
    trials = {t.config["trial"]: t for t in ExperimentAnalysis(str(out / "tune")).trials}
    assert {n: t.status for n, t in trials.items()} == {"v0-real-s0": "TERMINATED", "v40-p0.5-s0": "TERMINATED",
                                                        "v80-p0.5-s0": "ERROR"}
    assert trials["v80-p0.5-s0"].num_failures == 2  # FailureConfig(max_failures=1): tried twice
    logs = out / "tune" / "v40-p0.5-s0"  # Tune's per-trial logs: the training steps it was sent, TensorBoard
    assert list(logs.glob("events.out.tfevents*")) and "train/loss" in (logs / "progress.csv").read_text()
    results = pd.read_csv(out / "results.csv")
    ok = results[results.status == "ok"]
    assert sorted(ok.volume) == [0, 40] and (ok.iterations == 20).all() and ok.miou.between(0, 1).all()
    assert (out / "scaling.png").stat().st_size > 10_000
    assert json.loads((out / "fit.json").read_text())["lines"]["0.5"]["fit"] is None  # 2 volumes cannot fit 4 parameters


def test_a_sweep_directory_holding_another_sweep_exits_2_naming_it(train_ray, small_real, small_synthetic, quick,
                                                                    tmp_path, capsys):
    from segfactory.cli import main

    out = tmp_path / "other-sweep"
    out.mkdir()
    other = {"fingerprint": "0123456789abcdef", "trials": [{"name": "v0-real-s0"}]}  # another recipe's sweep
    (out / "sweep.json").write_text(json.dumps(other))
    assert main(["scaling", "--config", str(TOY_SWEEP), *sweep_overrides(small_real, small_synthetic, out, quick)]) == 2
    err = capsys.readouterr().err
    assert f"output: {out} holds a sweep with another training recipe or synthetic dataset" in err
    assert json.loads((out / "sweep.json").read_text()) == other  # its state left as it was: no trials, no Tune
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def _ids_and_images(parts: list[str]) -> dict[str, bytes]:
    df = pd.concat([pd.read_parquet(Path(p) / "shards") for p in parts])
    return dict(zip(df[S.SAMPLE_ID], df[S.IMAGE], strict=True))


def test_missing_samples_are_generated_like_one_bigger_run(train_ray, toy_source, tmp_path):
    gen = [f"source.path={toy_source}", "source.limit=6", "ray.show_progress=false",
           "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1"]
    cfg = load_config(ScalingConfig, TOY_SWEEP, [
        f"generate.config={SEGGEN_TOY}", f"generate.overrides=[{','.join(gen)}]", "toy_source=null",
        f"synthetic={tmp_path / 'syn'}"])
    parts = prepare_synthetic(cfg, tmp_path, 12, None)  # generated from nothing: 6 sources x 2
    assert parts == [str(tmp_path / "syn")]
    parts = prepare_synthetic(cfg, tmp_path, 30, None)  # 18 more: 2 more copies of each branch
    assert parts == [str(tmp_path / "syn"), str(tmp_path / "syn" / "extensions" / "copies-1-2")]
    grown = _ids_and_images(parts)
    assert len(grown) >= 30

    k = max(int(i.rsplit("/", 1)[1]) for i in grown) + 1
    one_run = load_config(GenerateConfig, SEGGEN_TOY, [*gen, f"imgsyn.samples_per_source={k}",
                                                       f"masksyn.samples_per_caption={k}",
                                                       f"output.path={tmp_path / 'one-run'}"])
    from pipelines.generate import run_generate

    run_generate(one_run)
    assert _ids_and_images([str(tmp_path / "one-run")]) == grown
