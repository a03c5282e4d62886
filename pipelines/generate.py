"""The driver of a generation run: index the source, stream the graph, write, summarize."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import schema as S
from core import storage
from core.runtime import actor_restarts, init_ray
from core.storage import Location
from pipelines.commits import (
    adopt_legacy_shards,
    committed_shards,
    complete_shards,
    summarize_output,
)
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, get_graph, stage_plan
from pipelines.graphs.base import build_dataset, stage_label
from pipelines.sources import SourceError
from pipelines.stages import SIBLINGS
from pipelines.writer import REJECTED_SCHEMA, prepare_output, write_manifest

if TYPE_CHECKING:
    from pipelines.lease import Lease

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


def _require_source(cfg: GenerateConfig) -> None:
    if not cfg.source.path.strip():
        raise SourceError("source.path: required (a local directory or a URI such as s3://bucket/prefix)")


def index_rows(cfg: GenerateConfig):
    """The source's index and its rows (an Arrow table sorted by id, ``source.limit`` applied),
    each row tagged with its shard."""
    from pipelines.source_index import index_source

    _require_source(cfg)
    index = index_source(cfg.source.path, cfg.source.format, split=cfg.source.split, classes=cfg.source.classes,
                         require_masks=get_graph(cfg.pipeline).needs_masks)
    rows = index.table.slice(0, cfg.source.limit) if cfg.source.limit else index.table
    index.table = index.table.schema.empty_table()  # the index travels to the driver without rows
    if not rows.num_rows:
        why = f"; {len(index.problems)} row(s) rejected, e.g. {index.problems[0][2]} ({index.problems[0][1]})" \
            if index.problems else ""
        raise SourceError(f"source.path={cfg.source.path}: no usable rows (format={cfg.source.format}"
                          f"{', split=' + cfg.source.split if cfg.source.split else ''}){why}")
    shards = np.arange(rows.num_rows, dtype=np.int64) // cfg.shard_rows()
    return index, rows.append_column(S.SHARD, pa.array(shards))


def _problems_table(problems: list[tuple[str, str, str]]) -> pa.Table:
    """Rows the source index could not use (duplicates, missing masks), as rejected rows."""
    rows = [{S.SAMPLE_ID: f"{sid}/source", S.SOURCE_ID: sid, S.METHOD: "source", S.DROP_REASON: reason,
             S.SOURCE_PATH: where} for sid, where, reason in problems]
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


def _write_problems(problems: pa.Table, out_uri: str, config_hash: str) -> None:
    """The index's rejected rows, committed like a shard's (a record named ``...-index``)."""
    from pipelines.commits import commit_record_of_rejects

    out = storage.resolve(out_uri, "output.path")
    path = out / "rejected" / f"part-{config_hash}-index.parquet"
    record = out / "_commits" / f"part-{config_hash}-index.json"
    if problems.num_rows:
        storage.write_parquet(problems, path)
        storage.write_text(record, commit_record_of_rejects(path, config_hash, problems))
    else:
        storage.remove(record)
        storage.remove(path)


def write_index_problems(problems_ref, out: Location, config_hash: str) -> None:
    """The index's problems go to rejected/ from a Ray task: the table stays off the driver."""
    import ray

    # an absolute path: a worker's working directory need not be the driver's
    where = storage.local_path(out) or out.uri
    ray.get(ray.remote(_write_problems).options(num_cpus=0).remote(problems_ref, where, config_hash))


@dataclass
class IndexSummary:
    """What the driver keeps of the source index: no rows, only counts and object refs."""

    index: Any  # SourceIndex with an empty table: classes, palette hint, background
    n_rows: int
    uncaptioned: int  # rows of unfinished shards without a caption (0: no captioner pool)
    todo_shards: list[int]
    problems: int = 0  # source rows the index rejected (missing masks, duplicates): rejected/ too


def _index_task(cfg: GenerateConfig, done: set[int]):
    """Runs in a Ray task: index the source, then yield an :class:`IndexSummary`, the index's
    problems (a rejected-rows table) and the rows of unfinished shards in slices (owned by the
    driver, held in the object store: the driver process never holds the index)."""
    from pipelines.source_index import iter_slices

    index, rows = index_rows(cfg)
    problems, index.problems = _problems_table(index.problems), []
    shard = rows.column(S.SHARD)
    todo = rows.filter(pc.invert(pc.is_in(shard, pa.array(sorted(done), pa.int64())))) if done else rows
    captions = pc.fill_null(todo.column(S.CAPTION), "")
    yield IndexSummary(index, rows.num_rows, int(pc.sum(pc.equal(captions, "")).as_py() or 0),
                       pc.unique(todo.column(S.SHARD)).to_pylist(), problems.num_rows)
    yield problems
    del rows, problems
    # blocks of <= 10k rows (~200 for a small source, as Ray Data's own from_items would make)
    yield from iter_slices(todo, min(10_000, max(1, -(-todo.num_rows // 200))))


def index_in_ray(cfg: GenerateConfig, done: set[int]):
    """:func:`_index_task` in a Ray task; returns the summary, the ref of its problems table and
    the refs of the unfinished rows. The task runs on the driver's node (see below). No CPU is
    reserved: a one-off task must not wait behind a head node started with ``num-cpus: 0``. A
    source error is re-raised as itself (one line, exit 2), not as Ray's wrapped traceback."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node always: its rows (the run's input blocks) must outlive any worker
    # node (a task with max_retries=0 cannot be reconstructed); a local source exists only there.
    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
    source = storage.resolve(cfg.source.path, "source.path")
    if source.is_local:  # absolute paths: a worker's working directory need not be the driver's
        cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": source.path})})
    refs = ray.remote(_index_task).options(**options).remote(cfg, done)
    try:
        summary = ray.get(next(refs))
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None
    return summary, next(refs), list(refs)


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    """Run one generation; rerunning with the same config resumes where it stopped.

    The driver handles one small completion record per shard: the source index is built in a
    Ray task (its rows go to the object store) and image and mask bytes go from the graph's
    workers to writer actors (:mod:`pipelines.sink`). The run holds the output's lease
    (:mod:`pipelines.lease`) from before it reads what is done until the manifest is written.
    """
    from pipelines.lease import Lease

    started = time.time()
    out = storage.resolve(cfg.output.path, "output.path")
    _require_source(cfg)  # before Ray starts
    storage.check_writable_root(out)
    lease = Lease(out, cfg.output.lease_ttl_s).acquire()
    try:
        return _run(cfg, out, started, lease)
    finally:
        lease.release()


def _run(cfg: GenerateConfig, out: Location, started: float, lease: Lease) -> GenerateResult:
    config_hash = cfg.config_hash()
    adopt_legacy_shards(out, config_hash)  # a dataset begun before commit records: kept, not redone
    done = complete_shards(out, config_hash)  # read only: prepare_output writes, after the checks
    init_ray(cfg.ray)
    summary, problems, todo = index_in_ray(cfg, done)
    index, n_rows = summary.index, summary.n_rows
    ctx = resolve_context(cfg, index)
    ctx.uncaptioned = summary.uncaptioned
    graph = get_graph(cfg.pipeline)
    if graph.check_context:  # before anything is written (a rerun may change the config)
        graph.check_context(cfg, ctx)
    prepare_output(out, config_hash, cfg.model_dump(mode="json"), cfg.output.overwrite)
    write_index_problems(problems, out, config_hash)
    total_shards = -(-n_rows // cfg.shard_rows())
    log.info("%s in %s of %s; %s already complete; output %s", _n(n_rows, "source row"),
             _n(total_shards, "shard"), _n(cfg.shard_rows(), "row"), _n(len(done), "shard"), out)
    streamed = Streamed()  # a rerun that skips every shard generates nothing
    if summary.todo_shards:
        streamed = _stream(cfg, ctx, out, config_hash, todo, summary, (total_shards, len(done)), lease)
    del todo
    stage_seconds, per_node, made_now, streamed_s = streamed.stage_seconds, streamed.per_node, streamed.rows, streamed.seconds
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
                    "rows_this_run": made_now,  # kept + rejected rows generated by this run
                    "stream_s": round(streamed_s, 3),  # from the first row streamed to the last shard
                    # the progress line's rate: rows made over the stream's time (start-up apart)
                    "samples_per_s": round(made_now / streamed_s, 4) if streamed_s else 0.0,
                    "shards_per_writer_node": per_node},  # this run's shards, by the node that wrote them
        "restarts": actor_restarts(since=started),  # this run's actor processes Ray restarted (lost, or a broken device)
        "columns": {"per_row_extra_in_rejected": [S.SOURCE_PATH], "siblings": SIBLINGS},
    }
    write_manifest(out, manifest)
    return GenerateResult(out, manifest, fraction, fraction > cfg.validation.max_rejected_fraction)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass
class Streamed:
    """What one run's stream did: busy time per stage, shards per writer node, rows it generated
    (kept + rejected) and the seconds from the first row streamed to the last shard."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    per_node: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    seconds: float = 0.0


def _stream(cfg: GenerateConfig, ctx: RunContext, out: Location, config_hash: str, todo: list, summary,
            counts: tuple[int, int], lease: Lease) -> Streamed:
    """Stream the unfinished shards' rows through the graph into the writers."""
    from pipelines.prefetch import prefetch_models  # real presets: weights once per node
    from pipelines.progress import Progress
    from pipelines.resources import check_cluster
    from pipelines.sink import make_writers, route_to_writers, write_stage_kwargs

    names = {s.name for s in stage_plan(cfg, ctx, cfg.source.format)}
    cfg = check_cluster(cfg, names)  # the resources profile; exit 2 now rather than wait for GPUs
    plan = stage_plan(cfg, ctx, cfg.source.format)
    prefetch_models(cfg, stage_names=names)
    writers = make_writers(out, config_hash, summary.n_rows, cfg.shard_rows(), cfg.output, cfg.faults)
    ds = build_dataset(todo, plan).map_batches(route_to_writers, **write_stage_kwargs(writers))
    # the index's rejected rows count in the progress line as they do in the summary
    progress = Progress(*counts, cfg.output.progress_interval_s, rejected_before=summary.problems).start()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rec in batch.to_pylist():
                progress.record(rec)
            if lease.lost.is_set():  # another run took the output over (our renewals failed): stop
                from pipelines.lease import LeaseHeld

                raise LeaseHeld(f"{out}: the lease was taken by another run while this one was writing")
    finally:
        progress.stop()
    # a retried routing task may have lost a record whose shard was committed: the records decide
    missing = sorted(set(summary.todo_shards) - committed_shards(out, config_hash))
    if missing:
        raise RuntimeError(f"shards {missing[:20]} never completed: rows were lost in the graph")
    return Streamed(_stage_seconds(ds, plan), dict(sorted(progress.shards_per_node.items())),
                    progress.kept + progress.rejected - summary.problems, progress.elapsed())


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
