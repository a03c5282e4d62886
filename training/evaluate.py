"""``segfactory evaluate``: a checkpoint on a real split, on one or more Ray Train workers.

Each worker scores its share of the split (Ray Data decodes and resizes it); the confusion
matrices are summed with an all-reduce, so any number of workers gives the same numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.config import ConfigError

log = logging.getLogger("segfactory.train")


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Load the checkpoint's model, score this worker's val shard, report the summary."""
    import ray.train
    import ray.train.torch

    from training.inference import evaluate_shard
    from training.metrics import summarize
    from training.models import load_model
    from training.recipe import model_dir
    from training.rundir import fetch_dir, locate

    meta = config["meta"]
    if config.get("torch_threads"):
        import torch

        torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    # a checkpoint on a URI is copied down to this node's cache once
    model = load_model(meta["arch"], fetch_dir(model_dir(locate(config["checkpoint"], "--checkpoint")))).to(device)
    conf = evaluate_shard(model, meta["arch"], ray.train.get_dataset_shard("val"), len(meta["classes"]), device,
                          config["batch_size"], config.get("precision", "auto"), config["eval"], meta["mean"], meta["std"])
    summary = summarize(conf, meta["classes"])
    # results travel back as a (tiny) checkpoint: Train keeps metrics only with checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / "eval.json").write_text(json.dumps(summary))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"miou": summary["miou"]}, checkpoint=ckpt)


def run_evaluate(checkpoint_dir: str | Path, data: str | Path, format: str = "voc", split: str = "val", *,
                 num_workers: int = 1, batch_size: int = 8, cpus_per_worker: float = 0.5, use_gpu: bool = False,
                 out: str | Path | None = None, ray_cfg=None, eval_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy and confusion matrix of a checkpoint (or a run
    directory's final/latest checkpoint) on ``data``'s ``split``, by the checkpoint's eval
    protocol (``eval_overrides`` replace keys of it: mode, short_side, flip, scales, ...);
    writes them as JSON (default ``<checkpoint>/eval-<split>.json``) and returns them."""
    from core import storage
    from core.runtime import init_ray
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError
    from training.config import DataConfig, TrainConfig
    from training.data import Sources, val_dataset
    from training.loop import META_FILE
    from training.recipe import make_trainer, resolve_checkpoint
    from training.rundir import writable

    ckpt = resolve_checkpoint(checkpoint_dir)
    meta = json.loads(storage.read_text(ckpt / META_FILE))
    dest = writable(out, "--out") if out else ckpt / f"eval-{split}.json"
    try:
        index = index_source(data, format, split=split)
    except SourceError as e:
        raise ConfigError(f"--data: {e}") from None
    if index.classes != meta["classes"]:
        raise ConfigError(f"--data: classes {index.classes} differ from the checkpoint's {meta['classes']}")
    if not index.rows:
        raise ConfigError(f"--split: no labelled rows in split {split!r} of {data}")
    from core.config import RayConfig

    init_ray(ray_cfg or RayConfig())
    from training.inference import eval_protocol

    spec = eval_protocol(meta, eval_overrides)
    cfg = TrainConfig(real={"path": str(data), "format": format}, data=DataConfig())
    rows = sorted(index.rows, key=lambda r: r["source_id"])
    ds = val_dataset(cfg, Sources(meta["classes"], [], [{k: r[k] for k in ("source_id", "source_path", "source_mask_path", "source_row")} for r in rows]))
    scratch = Path(tempfile.mkdtemp(prefix="segfactory-eval-"))
    try:
        trainer = make_trainer(eval_loop_per_worker, {"checkpoint": str(ckpt), "meta": meta, "batch_size": batch_size,
                                                      "eval": spec},
                               {"val": ds}, scratch / "eval", num_workers=num_workers, use_gpu=use_gpu,
                               cpus_per_worker=cpus_per_worker)
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            summary = json.loads((Path(d) / "eval.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"checkpoint": str(ckpt), "step": meta.get("step"), "data": str(data), "format": format,
              "split": split, "samples": len(rows), "num_workers": num_workers, "protocol": spec, **summary}
    storage.write_text(dest, json.dumps(result, indent=1))
    result["json"] = str(dest)
    log.info("evaluated %s on %s/%s: mIoU %.4f (%s)", ckpt, data, split, summary["miou"], dest)
    return result
