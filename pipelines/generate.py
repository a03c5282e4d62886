"""The driver of a generation run: index the source, stream the graph, write, summarize."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines import storage
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, get_graph, stage_plan
from pipelines.graphs.base import build_dataset, stage_label
from pipelines.runtime import init_ray
from pipelines.stages import SIBLINGS
from pipelines.storage import Location
from pipelines.writer import (
    REJECTED_SCHEMA,
    complete_shards,
    prepare_output,
    summarize_output,
    write_manifest,
)

log = logging.getLogger(__name__)

@dataclass
class GenerateResult:
    out: Location
    manifest: dict[str, Any]
    rejected_fraction: float
    over_limit: bool


def resolve_context(cfg: GenerateConfig, index) -> RunContext:
    from pipelines.palettes import resolve_palette

    name = cfg.palette or index.palette_hint or "auto"
    palette = resolve_palette(name, list(index.classes), index.background_index, cfg.prompts.synonyms)
    return RunContext(classes=list(index.classes), palette=palette, background=index.background_index)


def _check_text2mask_palette(cfg: GenerateConfig, ctx: RunContext) -> None:
    """A fine-tuned Text2Mask records its palette: refuse one that differs, in one line."""
    from actors.diffusion_models import check_palette
    from pipelines.config import ConfigError

    if cfg.preset != "toy" and cfg.pipeline in ("masksyn", "seggen") and cfg.masksyn.samples_per_caption:
        try:
            check_palette(cfg.text2mask.model.local_path, ctx.palette)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def index_rows(cfg: GenerateConfig):
    """The source's rows in a stable order, each tagged with its shard."""
    from pipelines.sources import SourceError, index_source

    if not cfg.source.path.strip():
        raise SourceError("source.path: required (a local directory or a URI such as s3://bucket/prefix)")
    index = index_source(cfg.source.path, cfg.source.format, split=cfg.source.split, classes=cfg.source.classes,
                         require_masks=get_graph(cfg.pipeline).needs_masks)
    rows = sorted(index.rows, key=lambda r: r[S.SOURCE_ID])
    index.rows = []  # the sorted copy is the only one kept
    if cfg.source.limit:
        rows = rows[: cfg.source.limit]
    if not rows:
        why = f"; {len(index.problems)} row(s) rejected, e.g. {index.problems[0][2]} ({index.problems[0][1]})" \
            if index.problems else ""
        raise SourceError(f"source.path={cfg.source.path}: no usable rows (format={cfg.source.format}"
                          f"{', split=' + cfg.source.split if cfg.source.split else ''}){why}")
    for i, row in enumerate(rows):
        row[S.SHARD] = i // cfg.output.rows_per_shard
    return index, rows


def _write_index_problems(out: Location, config_hash: str, problems: list[tuple[str, str, str]]) -> None:
    """Rows the source index could not use (duplicates, missing masks) go to rejected/ too."""
    path = out / "rejected" / f"part-{config_hash}-index.parquet"
    if not problems:
        storage.remove(path)
        return
    rows = [{S.SAMPLE_ID: f"{sid}/source", S.SOURCE_ID: sid, S.METHOD: "source", S.DROP_REASON: reason,
             S.SOURCE_PATH: where} for sid, where, reason in problems]
    storage.write_parquet(pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA), path)


def _todo_table(rows: list[dict[str, Any]], done: set[int]) -> pa.Table:
    """The rows of unfinished shards as one Arrow table (columns, not a dict per row)."""
    return pa.Table.from_pylist([r for r in rows if r[S.SHARD] not in done])


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    """Run one generation; rerunning with the same config resumes where it stopped.

    The driver handles only the source index and one small completion record per shard: image
    and mask bytes go from the graph's workers to writer actors (:mod:`pipelines.sink`).
    """
    from pipelines.progress import Progress

    started = time.time()
    out = storage.resolve(cfg.output.path, "output.path")
    index, rows = index_rows(cfg)
    _check_text2mask_palette(cfg, resolve_context(cfg, index))  # before anything is written
    n_rows = len(rows)
    config_hash = cfg.config_hash()
    done = prepare_output(out, config_hash, cfg.model_dump(mode="json"), cfg.output.overwrite)
    _write_index_problems(out, config_hash, index.problems)
    todo = _todo_table(rows, done)
    del rows
    total_shards = -(-n_rows // cfg.output.rows_per_shard)
    ctx = resolve_context(cfg, index)
    captions = pc.fill_null(todo.column(S.CAPTION), "") if todo.num_rows else pa.array([], pa.string())
    ctx.uncaptioned = int(pc.sum(pc.equal(captions, "")).as_py() or 0)  # 0: no captioner pool
    log.info("%d source rows in %d shards; %d shards already complete; output %s", n_rows, total_shards,
             len(done), out)

    stage_seconds: dict[str, float] = {}
    per_node: dict[str, int] = {}
    if todo.num_rows:
        init_ray(cfg.ray)
        from pipelines.prefetch import prefetch_models  # real presets: weights once per node
        from pipelines.resources import check_cluster
        from pipelines.sink import make_writers, route_to_writers, write_stage_kwargs

        names = {s.name for s in stage_plan(cfg, ctx, cfg.source.format)}
        cfg = check_cluster(cfg, names)  # the resources profile; exit 2 now rather than wait for GPUs
        plan = stage_plan(cfg, ctx, cfg.source.format)
        prefetch_models(cfg, stage_names=names)
        todo_shards = set(todo.column(S.SHARD).to_pylist())
        writers = make_writers(out, config_hash, n_rows, cfg.output.rows_per_shard, cfg.output.writers,
                               cfg.output.writer_num_cpus, cfg.faults.hang_after_shards)
        ds = build_dataset(todo, plan).map_batches(route_to_writers, **write_stage_kwargs(writers))
        del todo
        progress = Progress(total_shards, len(done), cfg.output.progress_interval_s).start()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for rec in batch.to_pylist():
                    progress.record(rec)
        finally:
            progress.stop()
        # a retried routing task may have lost a record whose shard was written: the files decide
        missing = sorted(todo_shards - complete_shards(out, config_hash))
        if missing:
            raise RuntimeError(f"shards {missing[:20]} never completed: rows were lost in the graph")
        stage_seconds = _stage_seconds(ds, plan)
        per_node = dict(sorted(progress.shards_per_node.items()))

    summary = summarize_output(out)
    total = summary["rows"] + summary["rejected_rows"]
    # quality-filter drops are the filters doing their job; errors and bad input are not
    errors = summary["rejected_rows"] - summary["filtered_rows"]
    fraction = errors / total if total else 0.0
    wall = time.time() - started
    manifest = {
        "config_hash": config_hash,
        "config": cfg.model_dump(mode="json"),
        "classes": ctx.classes,
        "palette": ctx.palette.tolist(),
        "ignore_index": S.IGNORE_INDEX,
        "mask_dtype": ctx.mask_dtype,
        **summary,
        "rejected_fraction": round(fraction, 6),
        "source_rows": n_rows,
        "versions": _versions(),
        "timings": {"wall_s": round(wall, 3), "stage_busy_s": stage_seconds,
                    "samples_per_s": round(summary["rows"] / wall, 4) if wall else 0.0,
                    "shards_per_writer_node": per_node},  # this run's shards, by the node that wrote them
        "columns": {"per_row_extra_in_rejected": [S.SOURCE_PATH], "siblings": SIBLINGS},
    }
    write_manifest(out, manifest)
    return GenerateResult(out, manifest, fraction, fraction > cfg.validation.max_rejected_fraction)


def _stage_seconds(ds, plan) -> dict[str, float]:
    """Summed busy time per operator, from Ray Data's own stats (best effort), named by the
    plan's stages (``expand + text2mask`` for stages Ray fused into one operator)."""
    seconds: dict[str, float] = {}
    try:
        pending = [ds._get_stats_summary()]
        while pending:
            summary = pending.pop()
            for op in summary.operators_stats:
                if op.wall_time:
                    seconds[stage_label(op.operator_name, plan)] = round(op.wall_time.sum, 3)
            pending += summary.parents
    except Exception:  # noqa: BLE001 - stats are informative only
        log.debug("no Ray Data stats", exc_info=True)
    return dict(reversed(seconds.items()))  # collected from the last operator back: graph order


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("segfactory", "ray", "torch", "diffusers", "transformers", "pyarrow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
