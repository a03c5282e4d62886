"""Training runs on the shared 2-CPU local Ray: run directory, restart and resume, live
generation, pretrain→finetune, evaluation, and 2-worker DDP (gloo)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.config import ConfigError, load_config
from training.config import TrainConfig
from training.recipe import run_train

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "training" / "configs" / "toy.yaml"


def cfg_of(overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, TOY, overrides)


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def val_pixels(real: Path) -> int:
    from pipelines.source_index import index_source

    idx = index_source(real, "voc", split="val")
    return int(sum((idx.load(r)[1] != 255).sum() for r in idx.rows))


@pytest.fixture(scope="module")
def mix_run(train_ray, small_real, small_synthetic, quick, tmp_path_factory):
    """A 2-worker (DDP over gloo) mix run."""
    run = tmp_path_factory.mktemp("mix") / "run"
    final = run_train(cfg_of(quick(small_real, run, "strategy=mix", "p_aug=0.6", f"synthetic.paths=[{small_synthetic}]",
                                   "workers.num_workers=2")))
    return run, final


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_two_worker_mix_run_directory(mix_run, small_real):
    run, final = mix_run
    assert (run / "config.yaml").is_file() and yaml.safe_load((run / "config.yaml").read_text())["strategy"] == "mix"
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_0000006", "checkpoint_0000012"]
    for name in ("model/model.safetensors", "model/config.json", "train_state.pt", "segfactory.json"):
        assert (run / "checkpoint_0000012" / name).is_file()
    assert json.loads((run / "final.json").read_text()) == json.loads(json.dumps(final))
    assert final["restarts"] == 0 and final["failures"] == 0 and final["final_step"] == 12
    # the best checkpoint by val mIoU, besides the latest ones; metrics also in TensorBoard files
    best = json.loads((run / "best" / "segfactory.json").read_text())
    assert best["miou"] == pytest.approx(final["best_miou"]) and best["step"] in (6, 12)
    assert final["best_checkpoint"] == str(run / "best")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6, 9, 12]
    assert [e.value for e in acc.Scalars("eval/miou")] == pytest.approx([float(x["eval_miou"]) for x in rows(run) if x["eval_miou"]], rel=1e-5)
    r = rows(run)
    assert [int(x["step"]) for x in r] == [3, 6, 9, 12]
    assert list(r[0]) == ["step", "phase", "loss", "lr", "data_wait_fraction", "step_time_s", "steps_per_s",
                          "synthetic_fraction", "eval_miou", "eval_pixel_acc", "elapsed_s"]
    assert [bool(x["eval_miou"]) for x in r] == [False, True, False, True]
    for x in r:
        assert 0 <= float(x["data_wait_fraction"]) <= 1 and float(x["step_time_s"]) > 0 and float(x["loss"]) > 0
    # the mix sampler's realized share over the run (2 x 48 slots: loose bound; the unit test is tight)
    assert 0.35 <= final["synthetic_fraction"] <= 0.85
    assert 0 <= final["miou"] <= 1 and set(final["per_class_iou"]) == set(final["classes"])
    conf = np.array(final["confusion"])
    assert conf.shape == (6, 6) and conf.sum() == val_pixels(small_real)


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_one_worker_evaluate_matches_the_two_worker_eval(mix_run, small_real, tmp_path):
    """The final eval during training ran on 2 workers (each scored part of val, confusion
    matrices all-reduced); a 1-worker evaluate of the same checkpoint gives the same numbers."""
    from training.evaluate import run_evaluate

    run, final = mix_run
    out = tmp_path / "eval.json"
    result = run_evaluate(run, small_real, "voc", "val", num_workers=1, out=out)
    assert result["checkpoint"] == final["checkpoint"] and result["step"] == 12
    assert result["confusion"] == final["confusion"]
    assert result["miou"] == pytest.approx(final["miou"], abs=1e-9)
    saved = json.loads(out.read_text())
    assert saved["miou"] == result["miou"] and saved["samples"] == 24 and "per_class_iou" in saved


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_predict_pngs_score_what_evaluate_reports_and_best_loads_in_a_pipeline(mix_run, small_real, tmp_path):
    """``predict`` on the val images writes one PNG per image id; their mIoU against the
    labels, computed here from a confusion matrix, equals ``evaluate``'s for the same model.
    RUN/best is a transformers model directory with its image processor."""
    from PIL import Image

    from pipelines.source_index import index_source
    from training.evaluate import run_evaluate
    from training.metrics import summarize
    from training.predict import run_predict

    run, final = mix_run
    summary = run_predict(run / "best", small_real, tmp_path / "masks", format="voc", split="val")
    assert summary["checkpoint"] == str(run / "best") and summary["images"] == 24
    idx = index_source(small_real, "voc", split="val")
    conf = np.zeros((6, 6), np.int64)
    for row in idx.rows:
        pred = np.asarray(Image.open(tmp_path / "masks" / f"{row['source_id']}.png"))
        truth = idx.load(row)[1]
        assert pred.shape == truth.shape and pred.dtype == np.uint8
        keep = truth != 255
        conf += np.bincount(truth[keep].astype(np.int64) * 6 + pred[keep], minlength=36).reshape(6, 6)
    result = run_evaluate(run / "best", small_real, "voc", "val", num_workers=1, out=tmp_path / "eval.json")
    assert conf.tolist() == result["confusion"]
    assert summarize(conf, final["classes"])["miou"] == pytest.approx(result["miou"], abs=1e-12)
    assert result["miou"] == pytest.approx(json.loads((run / "best" / "segfactory.json").read_text())["miou"], abs=1e-9)

    from transformers import AutoImageProcessor, pipeline

    assert AutoImageProcessor.from_pretrained(run / "best").image_mean == pytest.approx([0.485, 0.456, 0.406])
    seg = pipeline("image-segmentation", model=str(run / "best"))
    first = idx.rows[0]
    out = seg(Image.open(first["source_path"]).convert("RGB"))
    assert out and {o["label"] for o in out} <= set(final["classes"])
    ours = np.asarray(Image.open(tmp_path / "masks" / f"{first['source_id']}.png"))
    theirs = np.full(ours.shape, -1)
    for o in out:
        theirs[np.asarray(o["mask"]) > 0] = final["classes"].index(o["label"])
    assert (theirs == ours).mean() > 0.98  # same model, same normalisation; float rounding aside


def consumed_rows(run: Path) -> list[int]:
    """Every row the run's steps consumed, all ranks (debug.record_rows; a step redone after a
    restart counts once, as last done)."""
    by_step: dict[tuple[str, int], list[int]] = {}
    for f in sorted(run.glob("rows-rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[(f.name, rec["step"])] = rec["rows"]  # a redone step: its last try
    return sorted(k for rows_ in by_step.values() for k in rows_)


@pytest.mark.timeout(600, method="thread")
def test_restarts_and_resumes_consume_exactly_the_rows_of_an_uninterrupted_run(train_ray, small_real, small_synthetic,
                                                                                quick, tmp_path):
    """Two workers, 47 real rows (no even split), a mix of real and synthetic. Rank 0 dies at
    step 5: FailureConfig (max_failures=1) restarts the workers from the step-3 checkpoint. It
    dies again at step 8: out of retries, the run fails. ``resume=true`` continues from the
    step-6 checkpoint to the same final step, metrics continuing. The rows consumed over the
    whole run are those of a run that never stopped. A resume to a larger budget then trains to
    it, and final.json, its checkpoint, evaluate and predict all mean the last step."""
    common = ["strategy=mix", "p_aug=0.5", f"synthetic.paths=[{small_synthetic}]", "real.limit=47",
              "workers.num_workers=2", "debug.record_rows=true", "checkpoint_interval=3"]
    whole = run_train(cfg_of(quick(small_real, tmp_path / "whole", *common)))
    assert whole["final_step"] == 12
    want = consumed_rows(tmp_path / "whole")
    assert len(want) == 12 * 4 * 2  # 12 steps x batch 4 x 2 ranks

    run = tmp_path / "run"
    args = quick(small_real, run, *common, "debug.fail_at_steps=[5, 8]", "max_failures=1")
    with pytest.raises(Exception, match="simulated worker failure at step 8"):
        run_train(cfg_of(args))
    first = rows(run)
    assert [int(x["step"]) for x in first] == [3, 6]  # steps 4-5 ran twice; no row is duplicated
    with pytest.raises(ConfigError, match="already has checkpoints"):
        run_train(cfg_of(args))
    final = run_train(cfg_of([*args, "resume=true"]))
    # from Ray Train's own reports: 2 worker-group failures, 1 restart from a checkpoint (the
    # second failure ended the fit), 1 resume by hand
    assert final["final_step"] == 12
    assert (final["failures"], final["restarts"], final["resumes"]) == (2, 1, 1)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["failure", "failure", "run_failed", "resumed"]
    assert "simulated worker failure at step 5" in events[0]["errors"]["0"]
    r = rows(run)
    assert [int(x["step"]) for x in r] == [3, 6, 9, 12]
    assert r[:2] == first  # the rows before the checkpoint are kept, not rewritten
    assert consumed_rows(run) == want  # the same samples (in their epochs), none twice, none skipped
    # the schedule continued from step 6: lr at step 9 is the poly value there (not a restart)
    cfg = cfg_of(args)
    from training.loop import poly_lambda

    assert float(r[2]["lr"]) == pytest.approx(cfg.optim.lr * poly_lambda(cfg, 12)(8), rel=1e-4)

    # a larger budget: trained to, and named, everywhere (evaluate scores resolve_checkpoint's model)
    from training.predict import resolve_model
    from training.recipe import resolve_checkpoint

    more = run_train(cfg_of([*args, "resume=true", "iterations=15"]))
    assert more["final_step"] == 15 and more["checkpoint"].endswith("checkpoint_0000015")
    assert json.loads((run / "final.json").read_text())["final_step"] == 15
    assert resolve_checkpoint(run).name == "checkpoint_0000015"
    assert resolve_model(run)[1]["step"] == 15


@pytest.mark.timeout(300, method="thread")
def test_live_generation_source_finishes_on_two_cpus(train_ray, small_real, quick, tmp_path):
    live = ["toy.resolution=64", "imgsyn.samples_per_source=1", "masksyn.samples_per_caption=1",
            "cpu.batch_size=8", "text2mask.resources.batch_size=8", "mask2img.resources.batch_size=8"]
    final = run_train(cfg_of(quick(small_real, tmp_path / "run", "strategy=mix", "p_aug=0.5", "iterations=8",
                                   "eval_interval=8", "synthetic.live.config=pipelines/configs/seggen-toy.yaml",
                                   f"synthetic.live.overrides={json.dumps(live)}")))
    assert final["final_step"] == 8
    assert 0.2 <= final["synthetic_fraction"] <= 0.8  # generated samples did reach the trainer


@pytest.mark.timeout(300, method="thread")
def test_pretrain_then_finetune_outlasts_the_stall_timeout(train_ray, small_real, small_synthetic, quick, tmp_path):
    """Each phase runs longer than ray.no_progress_timeout_s: the fine-tune (real) stream
    starts when its phase does, so it is not left idle through pre-training."""
    run, timeout = tmp_path / "run", 6
    final = run_train(cfg_of(quick(small_real, run, "strategy=pretrain_finetune", f"synthetic.paths=[{small_synthetic}]",
                                   "iterations=200", "pretrain.iterations=200", "eval_interval=200", "log_interval=50",
                                   f"ray.no_progress_timeout_s={timeout}")))
    assert final["strategy"] == "pretrain_finetune" and final["final_step"] == 400 and final["iterations"] == 400
    assert final["pretrain"]["synthetic_fraction"] == 1.0 and final["finetune"]["synthetic_fraction"] == 0.0
    r = rows(run)
    assert [(int(x["step"]), x["phase"], bool(x["eval_miou"])) for x in r] == [
        (50, "pretrain", False), (100, "pretrain", False), (150, "pretrain", False), (200, "pretrain", True),
        (250, "finetune", False), (300, "finetune", False), (350, "finetune", False), (400, "finetune", True)]
    elapsed = [float(x["elapsed_s"]) for x in r]
    assert elapsed[3] > timeout and elapsed[7] - elapsed[3] > timeout, elapsed  # each phase outlasted the guard
    # fine-tuning starts a fresh optimizer and poly schedule: same lr 50 steps into each phase
    assert float(r[4]["lr"]) == pytest.approx(float(r[0]["lr"]), rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_toy_real_only_reaches_half_miou(train_ray, tmp_path):
    """The acceptance bar: the toy config, real only, a few hundred steps on CPU: mIoU >= 0.5."""
    from pipelines.toy_data import make_toy_dataset

    real = make_toy_dataset(tmp_path / "toy")
    final = run_train(cfg_of([f"real.path={real}", "strategy=real_only", f"output.path={tmp_path / 'run'}"]))
    assert final["final_step"] == 400
    assert final["miou"] >= 0.5, final["per_class_iou"]
