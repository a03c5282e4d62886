"""The end of ``segfactory demo``: the same short training, real only and mixed with the
synthetic data the demo just made, and both val mIoUs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("segfactory.train")

TOY_CONFIG = Path(__file__).parent / "configs" / "toy.yaml"


def train_real_vs_mix(real_dir: Path, synthetic_dir: Path, out_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Train the toy config ``real_only`` and ``mix`` (same budget, same seed) into
    ``out_dir/{real_only,mix}``; returns both final.json contents and their mIoUs. A rerun
    with finished runs returns their results without training again."""
    from core.config import load_config
    from training.config import TrainConfig
    from training.recipe import run_train

    results: dict[str, Any] = {}
    for strategy in ("real_only", "mix"):
        cfg = load_config(TrainConfig, TOY_CONFIG, [
            f"real.path={Path(real_dir).resolve()}", "real.format=voc",
            f"synthetic.paths=[{Path(synthetic_dir).resolve()}]", f"strategy={strategy}",
            f"output.path={Path(out_dir).resolve() / strategy}", "resume=true", *overrides])
        results[strategy] = run_train(cfg)
    summary = {"miou_real_only": results["real_only"]["miou"], "miou_mix": results["mix"]["miou"],
               "p_aug": cfg.p_aug, "iterations": cfg.iterations, "runs": results}
    log.debug("toy val mIoU: real_only %.4f, mix (p_aug=%.1f) %.4f", summary["miou_real_only"], cfg.p_aug,
             summary["miou_mix"])
    return summary
