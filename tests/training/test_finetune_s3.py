"""``segfactory finetune`` with its run directory on s3:// (moto's S3 server): the same run
directory module as ``train`` (checkpoints, metrics.csv, events.jsonl, TensorBoard, final.json),
a failed fit resumed with ``--resume`` from the checkpoint in the bucket, the exported model and
the sample grids in the bucket, and textual inversion's bank there too (resumed the same way).
Nothing lands locally."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from core import storage

ROOT = Path(__file__).resolve().parents[2]


def _files(uri: str) -> dict[str, int]:
    """Every object under a URI: relative key -> size."""
    loc = storage.resolve(uri)
    return {i.path[len(loc.path) + 1:]: i.size for i in storage.iter_file_infos(loc) if i.type == pafs.FileType.File}


def _text(uri: str) -> str:
    return storage.read_text(storage.resolve(uri))


@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_text2mask_run_directory_on_s3_fails_then_resumes_the_step_count(
        ray_local, s3_bucket, toy_source, tmp_path_factory, monkeypatch):
    from segfactory.cli import main

    run = f"{s3_bucket}/t2m"
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # any local file the command made would land here
    argv = ["finetune", "--config", str(ROOT / "training" / "configs" / "text2mask-tiny.yaml"),
            f"source.path={toy_source}", f"output.path={run}", "source.limit=12", "iterations=4",
            "validation.interval=2", "validation.samples=1", "log_interval=2", "debug.fail_at_steps=[3]",
            "max_failures=0", "ray.no_progress_timeout_s=300"]
    assert main(argv) == 1  # rank 0 died at step 3, no restart allowed: the fit failed
    files = _files(run)
    assert "checkpoint_0000002/train_state.pt" in files and "final.json" not in files
    assert main([*argv, "--resume"]) == 0
    files = _files(run)
    final = json.loads(_text(f"{run}/final.json"))
    assert final["final_step"] == 4 and (final["failures"], final["restarts"], final["resumes"]) == (1, 0, 1)
    assert final["checkpoint"] == f"{run}/checkpoint_0000004" and final["model"] == f"{run}/model"
    assert final["val_loss_final"] is not None and 0.0 <= final["val_fidelity"] <= 1.0
    for name in ("config.yaml", "checkpoint_0000004/trained.safetensors", "checkpoint_0000004/segfactory.json",
                 "model/model_index.json", "model/segfactory.json", "samples/step_0000004.png", "cache/key.json",
                 ".failed_at_3"):
        assert name in files, name
    assert any(k.startswith("tb/events.out.tfevents") for k in files)
    events = [json.loads(x)["event"] for x in _text(f"{run}/events.jsonl").splitlines()]
    assert events == ["failure", "run_failed", "resumed"]
    steps = [line.split(",")[0] for line in _text(f"{run}/metrics.csv").splitlines()]
    assert steps == ["step", "0", "2", "4"]  # step 2 kept from the failed fit, step 4 trained after the resume
    assert json.loads(_text(f"{run}/model/segfactory.json"))["palette_name"] == "voc"
    assert sorted(p.name for p in Path(".").rglob("*")) == []


@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")
def test_textual_inversion_bank_records_and_resume_on_s3(ray_local, s3_bucket, toy_source, tmp_path_factory, monkeypatch):
    from actors.textual_inversion import load_bank
    from core.config import load_config
    from training.finetune.config import FinetuneConfig
    from training.finetune.run import run_finetune

    run = f"{s3_bucket}/ti"
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    cfg = load_config(FinetuneConfig, ROOT / "training" / "configs" / "textual-inversion-tiny.yaml",
                      [f"source.path={toy_source}", f"output.path={run}", "iterations=6", "log_interval=3",
                       "workers.num_workers=1"])
    final = run_finetune(cfg)
    assert final["bank"] == f"{run}/bank.safetensors" and final["final_step"] == 6
    entries, embeddings, _ = load_bank(final["bank"])
    assert final["instances"] == len(entries) and embeddings[0].shape[0] == len(entries)
    files = _files(run)
    for name in ("config.yaml", "final.json", "checkpoint_0000006/bank.safetensors", "checkpoint_0000006/train_state.pt"):
        assert name in files, name
    assert [line.split(",")[0] for line in _text(f"{run}/metrics.csv").splitlines()] == ["step", "0", "3", "6"]
    # --resume continues from step 6 (the bank and optimizer state read back from the bucket)
    more = run_finetune(cfg.model_copy(update={"iterations": 9, "resume": True}))
    assert more["final_step"] == 9 and more["resumes"] == 1
    assert more["val_loss_initial"] == final["val_loss_initial"]  # the step-0 loss, kept in the checkpoint
    assert [line.split(",")[0] for line in _text(f"{run}/metrics.csv").splitlines()] == ["step", "0", "3", "6", "9"]
    _, again, _ = load_bank(more["bank"])
    assert not (again[0] == embeddings[0]).all()  # trained on from where it was
    assert sorted(p.name for p in Path(".").rglob("*")) == []
