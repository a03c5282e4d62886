"""Training, evaluation and prediction on s3:// (moto's S3 server): datasets read by Ray workers
straight from the bucket, run directories (checkpoints, records, best/, TensorBoard) written there,
checkpoints read back from it; and the one-line errors for a bucket that is not there."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml

from core import storage
from core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def _files(uri: str) -> dict[str, int]:
    """Every object under a URI: relative key -> size."""
    loc = storage.resolve(uri)
    return {i.path[len(loc.path) + 1:]: i.size for i in storage.iter_file_infos(loc) if i.type == pafs.FileType.File}


@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_generate_inspect_train_resume_evaluate_predict_with_every_path_on_s3(
        train_ray, s3_bucket, small_real, quick, tmp_path_factory, monkeypatch, capsys):
    """The whole user journey through the CLI with every path on s3://: generate from an S3
    source into S3, inspect it, train with the run directory on S3 (rank 0 dies at step 5, the
    fit fails; ``--resume`` finds the step-3 checkpoint in the bucket), evaluate and predict
    from the S3 run into S3. Nothing is written next to the driver: all of it is in the bucket."""
    from PIL import Image

    from pipelines.source_index import index_source
    from segfactory.cli import main
    from training.metrics import summarize

    real, syn, run = f"{s3_bucket}/real", f"{s3_bucket}/syn", f"{s3_bucket}/run"
    s3 = storage.resolve(s3_bucket).fs
    pafs.copy_files(str(small_real), real[5:], source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # any local file a command made would land here

    assert main(["generate", "--config", str(ROOT / "pipelines" / "configs" / "seggen-toy.yaml"), f"source.path={real}",
                 f"output.path={syn}", "source.limit=8", "output.rows_per_shard=4", "imgsyn.samples_per_source=1",
                 "masksyn.samples_per_caption=1", "toy.resolution=64", "ray.show_progress=false"]) == 0
    assert main(["inspect", syn]) == 0
    assert "rows: 16" in capsys.readouterr().out and "contact_sheet.png" in _files(syn)

    train = ["train", "--config", str(ROOT / "training" / "configs" / "toy.yaml"),
             *quick(real, run, "strategy=mix", "p_aug=0.5", f"synthetic.paths=[{syn}]", "iterations=6",
                    "eval_interval=6", "checkpoint_interval=3", "debug.fail_at_steps=[5]", "max_failures=0")]
    assert main(train) == 1  # rank 0 died at step 5 and no restart was allowed
    assert "checkpoint_0000003/train_state.pt" in _files(run) and "final.json" not in _files(run)
    assert main([*train, "--resume"]) == 0
    files = _files(run)
    final = json.loads(storage.read_text(storage.resolve(f"{run}/final.json")))
    assert final["final_step"] == 6 and (final["failures"], final["restarts"], final["resumes"]) == (1, 0, 1)
    assert final["checkpoint"] == f"{run}/checkpoint_0000006" and final["best_checkpoint"] == f"{run}/best"
    for name in ("config.yaml", "metrics.csv", "events.jsonl", "checkpoint_0000006/model/model.safetensors",
                 "checkpoint_0000006/segfactory.json", "best/model.safetensors", "best/preprocessor_config.json"):
        assert files.get(name), name
    events = [json.loads(x)["event"] for x in storage.read_text(storage.resolve(f"{run}/events.jsonl")).splitlines()]
    assert events == ["failure", "run_failed", "resumed"]
    steps = [line.split(",")[0] for line in storage.read_text(storage.resolve(f"{run}/metrics.csv")).splitlines()[1:]]
    assert steps == ["3", "6"]  # the step-3 row kept, step 6 trained after the resume
    assert any(k.startswith("tb/events.out.tfevents") for k in files)

    assert main(["evaluate", "--checkpoint", run, "--data", real, "--out", f"{s3_bucket}/eval.json"]) == 0
    result = json.loads(storage.read_text(storage.resolve(f"{s3_bucket}/eval.json")))
    assert result["checkpoint"] == final["checkpoint"] and result["samples"] == 24
    assert result["confusion"] == final["confusion"] and result["miou"] == pytest.approx(final["miou"], abs=1e-12)

    assert main(["predict", "--checkpoint", run, "--data", real, "--format", "voc", "--split", "val",
                 "--out", f"{s3_bucket}/masks"]) == 0
    idx = index_source(small_real, "voc", split="val")
    conf = np.zeros((6, 6), np.int64)
    for row in idx.rows:  # the PNGs in the bucket score what evaluate reports for best/
        pred = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.resolve(f"{s3_bucket}/masks/{row['source_id']}.png")))))
        truth = idx.load(row)[1]
        keep = truth != 255
        conf += np.bincount(truth[keep].astype(np.int64) * 6 + pred[keep], minlength=36).reshape(6, 6)
    best = json.loads(storage.read_text(storage.resolve(f"{run}/best/segfactory.json")))
    assert summarize(conf, final["classes"])["miou"] == pytest.approx(best["miou"], abs=1e-9)
    assert sorted(p.name for p in Path(".").rglob("*")) == []


@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_missing_bucket_exits_2_with_one_line_naming_it(s3_server, small_real, quick, capsys, command):
    from segfactory.cli import main

    out = "s3://no-such-bucket-here/out"
    if command == "generate":
        argv = ["generate", "--config", str(ROOT / "pipelines" / "configs" / "seggen-toy.yaml"),
                f"source.path={small_real}", f"output.path={out}"]
    else:
        argv = ["train", "--config", str(ROOT / "training" / "configs" / "toy.yaml"), *quick(small_real, out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{out}: bucket 'no-such-bucket-here' does not exist" in errors[0], err
    assert "Traceback" not in err


def test_a_checkpoint_uri_without_a_run_is_a_clear_error(s3_bucket):
    from training.recipe import resolve_checkpoint

    with pytest.raises(ConfigError, match=f"--checkpoint {s3_bucket}/nothing: no such directory"):
        resolve_checkpoint(f"{s3_bucket}/nothing")


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_a_scaling_sweep_with_its_directory_on_s3(train_ray, s3_bucket, quick, monkeypatch, tmp_path_factory):
    """The sweep directory is a URI: the toy source is made there, the trial's run directory,
    sweep.json, Tune's experiment state and logs and the report land in the bucket, and a rerun
    (Tuner.restore from the bucket) skips the finished trial."""
    from training.scaling import ScalingConfig, run_sweep

    out = f"{s3_bucket}/sweep"
    train = [f"train.{o}" for o in quick("unused", "unused", "iterations=3", "eval_interval=3")
             if not o.startswith(("real.", "output.path", "ray."))]
    overrides = [*train, "volumes=[0]", "gaps=null", "seeds=[0]", "generate=null", "toy_source.train=8",
                 "toy_source.val=4", "toy_source.size=64", f"output.path={out}", "ray.no_progress_timeout_s=240"]
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    report = run_sweep(load_config(ScalingConfig, ROOT / "training" / "configs" / "scaling-toy.yaml", overrides))
    assert report["finished"] == 1 and report["failed"] == [] and report["out"] == out
    files = _files(out)
    assert sum(k.startswith("toy-source/JPEGImages/") for k in files) == 12 and "toy-source/classes.txt" in files
    for name in ("sweep.json", "results.csv", "fit.json", "trials/v0-real-s0/final.json",
                 "trials/v0-real-s0/checkpoint_0000003/train_state.pt", "trials/v0-real-s0/config.yaml",
                 "tune/tuner.pkl", "tune/v0-real-s0/progress.csv"):
        assert files.get(name), name
    # Ray Tune's experiment state and the trial's TensorBoard log are in the bucket too
    assert any(k.startswith("tune/experiment_state-") for k in files)
    assert any(k.startswith("tune/v0-real-s0/events.out.tfevents") for k in files)
    final_loc = storage.resolve(f"{out}/trials/v0-real-s0/final.json")
    final = json.loads(storage.read_text(final_loc))
    assert final["final_step"] == 3 and final["checkpoint"] == f"{out}/trials/v0-real-s0/checkpoint_0000003"
    trained_on = yaml.safe_load(storage.read_text(storage.resolve(f"{out}/trials/v0-real-s0/config.yaml")))
    assert trained_on["real"]["path"] == f"{out}/toy-source"
    results = list(csv.DictReader(io.StringIO(storage.read_text(storage.resolve(f"{out}/results.csv")))))
    assert [(r["name"], r["status"], float(r["miou"])) for r in results] == [("v0-real-s0", "ok", pytest.approx(final["miou"], rel=1e-5))]
    assert storage.read_bytes(storage.resolve(f"{out}/scaling.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = final_loc.fs.get_file_info(final_loc.path).mtime_ns
    trial_logs = {k: v for k, v in files.items() if k.startswith("tune/v0-real-s0/")}
    again = run_sweep(load_config(ScalingConfig, ROOT / "training" / "configs" / "scaling-toy.yaml", overrides))
    assert again["finished"] == 1  # the trial was not trained again: final.json is the same object
    assert final_loc.fs.get_file_info(final_loc.path).mtime_ns == stamp and json.loads(storage.read_text(final_loc)) == final
    # restored from the bucket (Tuner.restore), not started over: the finished trial's Tune logs are as they were
    assert {k: v for k, v in _files(out).items() if k.startswith("tune/v0-real-s0/")} == trial_logs
    results_loc = storage.resolve(f"{out}/results.csv")
    storage.remove(results_loc)
    from segfactory.cli import main

    assert main(["scaling", "--report", out]) == 0 and storage.read_text(results_loc).startswith("volume,p_aug")
    assert sorted(p.name for p in Path(".").rglob("*")) == []


def test_predict_lists_a_folder_of_images_on_s3(s3_bucket):
    """``predict --format images --data s3://...``: every image under the prefix, ids relative to it."""
    from training.predict import image_rows

    s3 = storage.resolve(s3_bucket)
    for key in ("imgs/a.png", "imgs/sub/b.JPG", "imgs/notes.txt", "imgs/.hidden.png"):
        storage.write_bytes(s3 / key, b"x")
    rows = image_rows(f"{s3_bucket}/imgs", "images", None)
    assert rows == [{"id": "a", "path": f"{s3_bucket}/imgs/a.png", "format": "images"},
                    {"id": "sub/b", "path": f"{s3_bucket}/imgs/sub/b.JPG", "format": "images"}]
    with pytest.raises(ConfigError, match="--data: no images in"):
        image_rows(f"{s3_bucket}/nothing", "images", None)


def test_run_records_are_the_same_bytes_on_s3_as_on_disk(s3_bucket, tmp_path):
    """metrics.csv (appended, then truncated by a restart) and events.jsonl: appended in place on a
    disk, rewritten whole on S3 (objects cannot be appended to), with the same bytes."""
    from training.recipe import _read_rows, append_metrics
    from training.runlog import append_event, read_events

    rows = [{"step": s, "phase": "train", "loss": 1.0 / s, "lr": 0.01, "eval_miou": 0.5 if s == 4 else None}
            for s in (2, 4, 6, 4, 6)]  # a restart from step 3 re-reports steps 4 and 6
    for run in (tmp_path / "run", f"{s3_bucket}/run"):
        for m in rows:
            append_metrics(f"{run}/metrics.csv", m)
        append_event(run, "failure", ranks=[0])
        append_event(run, "resumed", step=3)
    local, remote = tmp_path / "run", storage.resolve(f"{s3_bucket}/run")
    assert (local / "metrics.csv").read_bytes() == storage.read_bytes(remote / "metrics.csv")
    assert [r["step"] for r in _read_rows(remote / "metrics.csv")] == ["2", "4", "6"]
    assert [e["event"] for e in read_events(remote)] == ["failure", "resumed"]
    assert [{k: v for k, v in e.items() if k != "time"} for e in read_events(local)] == \
        [{k: v for k, v in e.items() if k != "time"} for e in read_events(remote)]
