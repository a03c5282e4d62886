"""``train_loop_per_worker``: what each Ray Train worker runs.

DDP via ``ray.train.torch.prepare_model``; bf16 autocast on CUDA; AdamW or SGD with the
poly schedule (optional linear warm-up); an iteration budget with gradient accumulation;
periodic evaluation on the real val split (confusion matrix all-reduced); ``ray.train.report``
every ``log_interval`` steps, with a checkpoint at each eval/checkpoint step. On start it
restores the latest checkpoint (after a worker failure, or ``resume=true``): model,
optimizer, scheduler, step and each rank's stream positions, so the data continues exactly
where the checkpoint was taken (training.epochs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from training.accel import (
    autocast,
    grad_scaler,
    maybe_compile,
    maybe_sync_batchnorm,
    to_model_input,
)
from training.config import TrainConfig
from training.data import Mixer, rank_stream
from training.inference import evaluate_shard
from training.metrics import all_reduce_, summarize
from training.models import build_model, load_model, loss, preload, save_image_processor, save_model
from training.steps import due, fail_if_asked, report, restore_dir
from training.transforms import AUG_KEY, LABELS, PIXELS, SYNTHETIC

log = logging.getLogger("segfactory.train")

MODEL_DIR, STATE_FILE, META_FILE = "model", "train_state.pt", "segfactory.json"


def primed(it):
    """``it`` with its first batch already being fetched in a background thread, so the
    start-up of several streams overlaps instead of adding up."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="prime")
    first = pool.submit(next, it, None)
    pool.shutdown(wait=False)

    def gen():
        batch = first.result()
        if batch is not None:
            yield batch
            yield from it

    return gen()


def poly_lambda(cfg: TrainConfig, iterations: int):
    """lr multiplier at a step: linear warm-up, then (1 - step/iterations) ** power."""
    o = cfg.optim
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if step < o.warmup_iters:
            return (step + 1) / o.warmup_iters
        return max(floor, (1.0 - min(step, iterations) / iterations) ** o.poly_power)

    return f


def make_optimizer(cfg: TrainConfig, model, lr: float):
    """AdamW or SGD over parameter groups: a pretrained backbone at ``lr x backbone_lr_mult``,
    norms and embeddings without weight decay when ``optim.no_decay_norm_embed``."""
    import torch

    from training.accel import param_groups

    o = cfg.optim
    mult = o.backbone_lr_mult or (0.1 if cfg.model.preset in ("pretrained", "backbone") else 1.0)
    groups = param_groups(model, cfg.model.arch, lr, mult, o.weight_decay, o.no_decay_norm_embed)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)


def _sum(values: list[float], device) -> list[float]:
    """Element-wise sum over workers."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_(t)
    return t.tolist()


def _restore(cfg: TrainConfig, meta: dict[str, Any]):
    """(checkpoint dir or None) to resume from: Ray's latest (failure restart / same run),
    else the driver's choice for resume=true."""
    return restore_dir(meta.get("resume_from"))


def _save(tmp: Path, model, opt, sched, step: int, consumed: dict[str, int], extra: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch

    save_model(model, tmp / MODEL_DIR)
    cm = meta["checkpoint_meta"]
    save_image_processor(cm["arch"], tmp / MODEL_DIR, cm["eval"], cm["mean"], cm["std"])
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "consumed": consumed, **extra}, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({**meta["checkpoint_meta"], "step": step}, indent=1))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train per ``config["cfg"]`` (a TrainConfig dump). ``config["meta"]`` from the driver
    has the class list, run directory, stream names, resume checkpoint and the phases: one
    ``train`` phase, or ``pretrain`` (synthetic only) then ``finetune`` (real only), each
    ``{"name", "start", "iterations", "p", "lr"}`` with ``p`` the synthetic share."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.model_validate(config["cfg"])
    importing = preload(cfg.model.arch)
    meta = config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.workers.torch_threads:
        torch.set_num_threads(cfg.workers.torch_threads)
    device = ray.train.torch.get_device()
    classes, arch = meta["classes"], cfg.model.arch
    torch.manual_seed(cfg.seed)
    resume = _restore(cfg, meta)
    step, consumed, extra, state = 0, {"real": 0, "synthetic": 0}, {"best_miou": 0.0, "elapsed_s": 0.0}, None
    if resume:
        state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=True)
        step, consumed = state["step"], dict(state["consumed"])
        extra = {k: state.get(k, v) for k, v in extra.items()}
        if rank == 0:
            log.info("resumed from %s at step %d", resume, step)
    after = _resume_positions(state, rank, world)
    # streams next: their start-up overlaps model building and checkpoint loading
    batches = {"batch_size": cfg.batch_size, "prefetch_batches": cfg.data.prefetch_batches, "device": device}
    streams: dict[str, Any] = {}

    def start_streams(p: float) -> None:
        """Start the streams a phase reads (a stream's execution begins with its first read):
        one started earlier and left idle through a long phase trips Ray Data's no-progress
        guard (pretrain_finetune's real stream during pre-training). A file-backed stream is
        this rank's own (training.data.rank_stream), executed by a coordinator actor (not in
        this process) from just after the row the checkpoint recorded."""
        for name in meta["streams"]:
            if name not in streams and {"real": p < 1, "synthetic": p > 0}[name]:
                spec = meta["specs"].get(name)
                if spec is None:  # the live generation stream: Ray Train's split
                    it = ray.train.get_dataset_shard(name)
                else:
                    it = rank_stream(spec, cfg, rank, world, after.get(name, -1)).streaming_split(1)[0]
                streams[name] = primed(iter(it.iter_torch_batches(**batches)))

    start_streams(_phase_p(meta, meta["phases"][0]))

    importing.join()
    if resume:
        model = load_model(arch, Path(resume) / MODEL_DIR)
    elif cfg.model.init_from:
        from training.rundir import fetch_dir

        model = load_model(arch, fetch_dir(cfg.model.init_from) / MODEL_DIR)
    else:
        model = build_model(cfg.model, classes)
    model = maybe_sync_batchnorm(model, world, device)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": arch == "mask2former"})
    model = maybe_compile(model, cfg.workers.compile)
    scaler = grad_scaler(device, cfg.workers.precision)
    mean, std = cfg.aug.mean, cfg.aug.std

    mixer = Mixer(streams, 0.0, cfg.batch_size, seed=(cfg.seed, rank), start=step * cfg.grad_accum)
    record = RowLog(meta["run_dir"], rank) if cfg.debug.record_rows else None
    val = ray.train.get_dataset_shard("val")
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    total = sum(ph["iterations"] for ph in meta["phases"])
    started = time.perf_counter() - extra["elapsed_s"]
    model.train()
    for ph in meta["phases"]:
        first, end = ph["start"], ph["start"] + ph["iterations"]
        if step >= end:
            continue
        # each phase has its own optimizer and poly schedule (pretrain_finetune: a fresh one to fine-tune)
        opt = make_optimizer(cfg, model, ph["lr"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(cfg, ph["iterations"]))
        if state is not None and first < step:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        mixer.p = _phase_p(meta, ph)
        start_streams(mixer.p)
        window = _window(mixer)
        while step < end:
            t0 = time.perf_counter()
            wait, value_sum = 0.0, torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                tw = time.perf_counter()
                batch = next(mixer)
                wait += time.perf_counter() - tw
                if record:
                    record.add(step + 1, batch[AUG_KEY])
                # uint8 on the wire, normalised on the device
                x = to_model_input(batch[PIXELS].to(device, non_blocking=True), mean, std)
                y = batch[LABELS].to(device, non_blocking=True).long()
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, cfg.workers.precision):
                    value = loss(model, arch, x, y, len(classes)) / cfg.grad_accum
                scaler.scale(value).backward()
                value_sum += value.detach()  # stays on the device: no sync per step
                window["flagged"] += batch[SYNTHETIC].sum()  # synthetic rows, variants included (on the device)
            if cfg.optim.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            step += 1
            for k, v in (("loss", value_sum), ("n", 1), ("wait", wait), ("busy", time.perf_counter() - t0)):
                window[k] += v
            fail_if_asked(meta["run_dir"], step, cfg.debug.fail_at_steps, rank)

            do_eval, do_ckpt, do_report = due(step, end=end, eval_every=cfg.eval_interval, ckpt_every=ckpt_every,
                                              log_every=cfg.log_interval)
            if not do_report:
                continue
            taken = {k: mixer.taken[k] - window["taken0"][k] for k in mixer.taken}
            sums = _sum([float(window["loss"]), window["n"], window["wait"], window["busy"], float(window["flagged"]),
                         sum(taken.values()), time.perf_counter() - window["t0"]], device)
            metrics: dict[str, Any] = {
                "step": step, "phase": ph["name"], "iterations": total, "loss": sums[0] / max(1, sums[1]), "lr": lr,
                "data_wait_fraction": sums[2] / max(1e-9, sums[3]), "step_time_s": sums[3] / max(1, sums[1]),
                "steps_per_s": window["n"] / max(1e-9, sums[6] / world), "synthetic_fraction": sums[4] / max(1, sums[5])}
            if do_eval:
                summary = summarize(evaluate_shard(model, arch, val, len(classes), device, cfg.eval_batch_size,
                                                   cfg.workers.precision, cfg.eval.model_dump(), mean, std), classes)
                extra["best_miou"] = max(extra["best_miou"], summary["miou"])
                metrics.update({"eval_miou": summary["miou"], "eval_pixel_acc": summary["pixel_acc"],
                                "eval_per_class_iou": summary["per_class_iou"], "best_miou": extra["best_miou"]})
                if step == total:
                    metrics["eval_confusion"] = summary["confusion"]
            extra["elapsed_s"] = metrics["elapsed_s"] = time.perf_counter() - started
            if do_ckpt:
                got = _sum([mixer.taken.get("real", 0), mixer.taken.get("synthetic", 0)], device)
                now = {"real": consumed["real"] + int(got[0]), "synthetic": consumed["synthetic"] + int(got[1])}
                state = {**extra, "phase": ph["name"], "positions": _positions(mixer, after, rank, world, device)}
                report(metrics, step, rank, lambda tmp: _save(tmp, model, opt, sched, step, now, state, meta))  # noqa: B023
            else:
                report(metrics, step, rank)
            window = _window(mixer)


def _positions(mixer: Mixer, after: dict[str, int], rank: int, world: int, device) -> dict[str, Any]:
    """Every rank's last consumed row per stream ({"world": n, name: [position per rank]}),
    gathered so that rank 0's checkpoint holds them all (a sum of one-hot rows)."""
    names = ("real", "synthetic")
    mine = [int(mixer.last[n]) if n in mixer.last else after.get(n, -1) for n in names]
    table = [0.0] * (world * len(names))
    table[rank * len(names):(rank + 1) * len(names)] = [float(v) for v in mine]
    got = _sum(table, device)
    return {"world": world, **{n: [int(got[r * len(names) + i]) for r in range(world)] for i, n in enumerate(names)}}


def _resume_positions(state: dict[str, Any] | None, rank: int, world: int) -> dict[str, int]:
    """This rank's last consumed row per stream from a checkpoint (-1: none). A checkpoint from
    a run with another number of workers (or from before positions were kept) restarts the
    streams from their start, with a warning."""
    positions = (state or {}).get("positions")
    if not positions:
        if state is not None and rank == 0:
            log.warning("checkpoint without stream positions: the streams restart from their start")
        return {}
    if positions["world"] != world:
        if rank == 0:
            log.warning("checkpoint from %d workers, now %d: the streams restart from their start", positions["world"], world)
        return {}
    return {n: int(positions[n][rank]) for n in ("real", "synthetic")}


class RowLog:
    """debug.record_rows: every row each step consumed (its augmentation key: the sample in
    its epoch), appended to ``rows-rank<r>.jsonl`` in the run directory (local runs only)."""

    def __init__(self, run_dir: str, rank: int):
        self.path = Path(run_dir) / f"rows-rank{rank}.jsonl"

    def add(self, step: int, keys) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "rows": [int(k) for k in keys.tolist()]}) + "\n")


def _phase_p(meta: dict[str, Any], ph: dict[str, Any]) -> float:
    """The synthetic share a phase draws; with one stream, that stream's (0 or 1)."""
    names = meta["streams"]
    return {"real": 0.0, "synthetic": 1.0}[names[0]] if len(names) == 1 else ph["p"]


def _window(mixer: Mixer) -> dict[str, Any]:
    """Accumulators of one reporting window."""
    return {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "t0": time.perf_counter(), "taken0": dict(mixer.taken), "flagged": 0}
