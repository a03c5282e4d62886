"""The shipped paper recipes run end to end on CPU with tiny backbones: the protocol config as
shipped (mmseg pipeline, poly schedule, parameter groups, total batch), only the sizes and the
backbone's weights swapped for a tiny hub-layout checkpoint written by the test."""

from __future__ import annotations

import json

import pytest

from core.config import load_config
from segfactory.configs import resolve_config
from training.config import TrainConfig
from training.recipe import run_train


def _tiny(real, run, backbone, *extra: str) -> list[str]:
    """Small sizes for a 2-CPU box; everything else as the protocol ships it."""
    return [f"real.path={real}", f"output.path={run}", "iterations=6", "total_batch_size=4", "workers.num_workers=1",
            "workers.use_gpu=false", "workers.cpus_per_worker=0.5", "workers.torch_threads=1", "eval_interval=6",
            "log_interval=3", "eval_batch_size=8", "aug.crop_size=48", "aug.base_size=64", "aug.max_long_side=256",
            "model.backbone.resnet=resnet-tiny", f"model.backbone.local_path={backbone}", "model.deeplab.aspp_channels=16",
            "data.transform_batch_size=8", "ray.no_progress_timeout_s=240", *extra]


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_attn2mask_deeplabv3plus_recipe_trains_and_evaluates(train_ray, small_real, tmp_path, write_backbone):
    from training.evaluate import run_evaluate

    backbone = tmp_path / "bb"
    write_backbone("timm", backbone)
    cfg = load_config(TrainConfig, str(resolve_config("attn2mask-voc-deeplabv3plus-r50")),
                      _tiny(small_real, tmp_path / "run", backbone, "strategy=real_only"))
    assert cfg.optim.name == "sgd" and cfg.aug.photometric and cfg.aug.cat_max_ratio == 0.75 and cfg.batch_size == 4
    final = run_train(cfg)
    assert final["final_step"] == 6 and 0.0 <= final["miou"] <= 1.0
    saved = json.loads((tmp_path / "run" / "checkpoint_0000006" / "model" / "config.json").read_text())
    assert saved["architecture"] == "deeplab" and saved["plus"] is True and saved["backbone"] == "resnet-tiny"
    # the test scale is the training scale: short side 64, long side at most 256
    meta = json.loads((tmp_path / "run" / "checkpoint_0000006" / "segfactory.json").read_text())
    assert meta["eval"]["short_side"] == 64 and meta["eval"]["max_long_side"] == 256
    again = run_evaluate(tmp_path / "run", small_real, cpus_per_worker=0.5)
    assert again["miou"] == pytest.approx(final["miou"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_diffsynth_variant_recipe_replaces_real_rows_by_their_variants(train_ray, small_real, tmp_path, write_backbone,
                                                                        write_variants):
    """mix.mode=variant through Ray: only the real stream runs, its rows swapped for their own
    variants (every real train id has two here)."""
    import numpy as np

    from pipelines.source_index import index_source
    from training.variants import variant_index


    ids = [r["source_id"] for r in index_source(small_real, "voc", split="train").rows]
    files = write_variants(tmp_path / "syn" / "shards", ids)
    assert sum(len(v) for v in variant_index(files).values()) == 2 * len(ids)
    backbone = tmp_path / "bb"
    write_backbone("timm", backbone)
    cfg = load_config(TrainConfig, str(resolve_config("diffsynth-voc-deeplabv3-r50")),
                      _tiny(small_real, tmp_path / "run", backbone, f"synthetic.paths=[{tmp_path / 'syn'}]"))
    assert cfg.mix.mode == "variant" and cfg.p_aug == 0.4 and cfg.p_synthetic == 0.0
    final = run_train(cfg)
    assert final["final_step"] == 6 and np.isfinite(final["miou"])
    # replaced rows count as synthetic: ~alpha of 24 rows (the stream of synthetic batches never ran)
    assert 0.1 < final["synthetic_fraction"] < 0.75, final["synthetic_fraction"]
