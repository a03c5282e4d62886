"""A fine-tuning run's records, shared by the recipe loop and textual inversion: checkpoints,
``metrics.csv`` (truncated on resume), the metrics callback on the Train controller and the
rejected rows of the source index."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from training.finetune.config import FinetuneConfig
from training.finetune.worker import STATE_FILE

log = logging.getLogger("segfactory.finetune")

CSV_COLUMNS = ["step", "loss", "lr", "data_wait_fraction", "step_time_s", "steps_per_s", "val_loss",
               "val_fidelity", "elapsed_s"]


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return sorted((p for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file()), key=lambda p: p.name)


def build_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
    """Arguments of ``models.build_components`` (the same base for the cache and the workers)."""
    return {"preset": cfg.preset, "family": cfg.resolved_family, "model_id": cfg.model.id,
            "revision": cfg.model.revision, "local_path": cfg.model.local_path, "seed": cfg.seed}


def metric_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def truncate_metrics(path: Path, after_step: int) -> None:
    """Keep rows up to ``after_step`` (a resumed or restarted run re-does later steps)."""
    rows = [r for r in metric_rows(path) if int(r["step"]) <= after_step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def append_metrics(path: Path, m: dict[str, Any]) -> None:
    rows = metric_rows(path)
    if rows and int(rows[-1]["step"]) >= m["step"]:
        truncate_metrics(path, m["step"] - 1)
    with path.open("a", newline="") as f:
        csv.DictWriter(f, CSV_COLUMNS).writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in m.items() if k in CSV_COLUMNS})


def metrics_callback(run_dir: Path):
    from core.compat import ray_api

    UserCallback = ray_api("UserCallback")

    class MetricsLog(UserCallback):
        """On the Train controller: metrics.csv and progress lines, like ``segfactory train``."""

        def after_report(self, run_context, metrics, checkpoint):
            if not log.handlers and not logging.getLogger().handlers:  # the controller's own process
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                log.addHandler(handler)
                log.setLevel(logging.INFO)
            m = metrics[0]
            if "step" not in m:
                return
            append_metrics(run_dir / "metrics.csv", m)
            msg = f"[finetune] step {m['step']}/{m['iterations']}"
            if "loss" in m:
                msg += (f" loss {m['loss']:.4f} lr {m['lr']:.2e} {m['steps_per_s']:.2f} it/s "
                        f"data-wait {m['data_wait_fraction']:.0%}")
            if "val_loss" in m:
                msg += f" | val loss {m['val_loss']:.4f}"
            if "val_fidelity" in m:
                msg += f" colour fidelity {m['val_fidelity']:.3f}"
            log.info(msg)

    return MetricsLog()


def write_index_problems(run_dir: Path, problems: list[tuple[str, str, str]]) -> None:
    """Rows the source index could not use (no mask, duplicate id, bad captions.jsonl line) go
    to ``rejected/`` too, as ``generate`` does."""
    from core import storage
    from training.finetune.pairs import METHOD, rejected_table

    path = storage.resolve(run_dir) / "rejected" / f"part-{METHOD}-index.parquet"
    if not problems:
        storage.remove(path)
        return
    storage.write_parquet(rejected_table([{"source_id": sid, "source_path": where, "drop_reason": reason}
                                          for sid, where, reason in problems]), path)


def rejected_counts(run_dir: Path) -> dict[str, int]:
    """Rejected source rows per reason code (a row written twice counts once)."""
    import pyarrow.parquet as pq

    from pipelines.writer import drop_code

    files = sorted((run_dir / "rejected").glob("*.parquet"))
    seen = {}
    for f in files:
        t = pq.read_table(f, columns=["source_id", "source_path", "drop_reason"])
        for sid, where, reason in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            seen[(sid, where)] = drop_code(reason)
    counts: dict[str, int] = {}
    for code in seen.values():
        counts[code] = counts.get(code, 0) + 1
    return counts
