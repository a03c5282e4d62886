"""Training and evaluation reading their datasets from s3:// (moto's S3 server): the real source
and the synthetic shards are read by Ray workers straight from the bucket."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.config import ConfigError, load_config
from training.config import TrainConfig
from training.recipe import run_train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_inputs(s3_server, small_real, small_synthetic):
    s3, _ = pafs.FileSystem.from_uri("s3://train-in?allow_bucket_creation=true")
    s3.create_dir("train-in")
    for local, key in ((small_real, "real"), (small_synthetic, "syn")):
        pafs.copy_files(str(local), f"train-in/{key}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    return "s3://train-in/real", "s3://train-in/syn"


@pytest.mark.slow
@pytest.mark.timeout(800, method="thread")
def test_train_then_evaluate_with_datasets_on_s3(train_ray, s3_inputs, quick, tmp_path):
    from training.evaluate import run_evaluate

    real, syn = s3_inputs
    run = tmp_path / "run"
    cfg = load_config(TrainConfig, ROOT / "training" / "configs" / "toy.yaml",
                      quick(real, run, "strategy=mix", "p_aug=0.6", f"synthetic.paths=[{syn}]", "iterations=6",
                            "eval_interval=6"))
    final = run_train(cfg)
    assert final["final_step"] == 6 and 0 < final["synthetic_fraction"] < 1  # both buckets' rows were trained on
    result = run_evaluate(run, real, "voc", "val", num_workers=1, out=tmp_path / "eval.json")
    assert result["samples"] == 24 and result["data"] == real
    assert result["confusion"] == final["confusion"]  # same model, same val split read from S3


def test_a_run_directory_on_object_storage_is_a_clear_error(s3_server, small_real, quick):
    cfg = load_config(TrainConfig, ROOT / "training" / "configs" / "toy.yaml",
                      quick(small_real, "s3://train-in/run"))
    with pytest.raises(ConfigError, match="output.path=s3://train-in/run: a training run directory must be a local path"):
        run_train(cfg)


def test_a_checkpoint_on_object_storage_is_a_clear_error(s3_server):
    from training.recipe import resolve_checkpoint

    with pytest.raises(ConfigError, match="--checkpoint=s3://b/run: a training run directory must be a local path"):
        resolve_checkpoint("s3://b/run")
