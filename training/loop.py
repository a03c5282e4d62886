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
from training.steps import due, fail_if_asked, release_restore, report, restore_dir
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
    norms and embeddings without weight decay when ``optim.no_decay_norm_embed``. ``model`` may
    be a list of models (co-training: one optimizer over both networks, as BECO's)."""
    import torch

    from training.accel import param_groups

    o = cfg.optim
    mult = o.backbone_lr_mult or (0.1 if cfg.model.preset in ("pretrained", "backbone") else 1.0)
    models = model if isinstance(model, list | tuple) else [model]
    groups = [g for m in models for g in param_groups(m, cfg.model.arch, lr, mult, o.weight_decay, o.no_decay_norm_embed)]
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


def _save(tmp: Path, model, opt, sched, step: int, extra: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch

    save_model(model, tmp / MODEL_DIR)
    cm = meta["checkpoint_meta"]
    save_image_processor(cm["arch"], tmp / MODEL_DIR, cm["eval"], cm["mean"], cm["std"])
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, **extra},
               tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({**meta["checkpoint_meta"], "step": step}, indent=1))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: :class:`SegmentationRecipe` on this worker."""
    SegmentationRecipe(config).fit()


class SegmentationRecipe:
    """``train`` on one Ray Train worker (torchtune style: set up, then steps).

    ``config["cfg"]`` is a TrainConfig dump; ``config["meta"]`` from the driver has the class
    list, run directory, stream names and specs, resume checkpoint and the phases: one ``train``
    phase, or ``pretrain`` (synthetic only) then ``finetune`` (real only), each ``{"name",
    "start", "iterations", "p", "lr"}`` with ``p`` the synthetic share. Set-up restores the
    checkpoint (:meth:`restore`), starts the streams, builds the model; :meth:`fit` runs each
    phase's optimizer steps (:meth:`train_step`) and reports, evaluates and checkpoints on the
    cadence of :func:`training.steps.due` (:meth:`end_of_step`)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch
        import torch

        self.cfg = cfg = TrainConfig.model_validate(config["cfg"])
        importing = preload(cfg.model.arch)
        self.meta = config["meta"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.workers.torch_threads:
            torch.set_num_threads(cfg.workers.torch_threads)
        self.device = ray.train.torch.get_device()
        self.classes, self.arch = self.meta["classes"], cfg.model.arch
        torch.manual_seed(cfg.seed)
        self.restore()
        # streams next: their start-up overlaps model building
        self.streams: dict[str, Any] = {}
        self.start_streams(_phase_p(self.meta, self.meta["phases"][0]))
        importing.join()
        self.model = self.build_model()
        release_restore(self.resume)  # model and state are loaded
        self.scaler = grad_scaler(self.device, cfg.workers.precision)
        self.mixer = Mixer(self.streams, 0.0, cfg.batch_size, seed=(cfg.seed, self.rank), start=self.step * cfg.grad_accum)
        self.record = RowLog(self.meta["run_dir"], self.rank) if cfg.debug.record_rows else None
        self.val = ray.train.get_dataset_shard("val")
        self.total = sum(ph["iterations"] for ph in self.meta["phases"])
        self.started = time.perf_counter() - self.extra["elapsed_s"]

    def restore(self) -> None:
        """Step, best mIoU, elapsed time and stream positions from the checkpoint
        to resume from (Ray Train's after a failure, or the driver's for ``resume=true``)."""
        import torch

        self.resume = _restore(self.cfg, self.meta)
        self.step, self.state = 0, None
        self.extra = {"best_miou": 0.0, "elapsed_s": 0.0}
        if self.resume:
            self.state = torch.load(Path(self.resume) / STATE_FILE, map_location="cpu", weights_only=True)
            self.step = self.state["step"]
            self.extra = {k: self.state.get(k, v) for k, v in self.extra.items()}
            if self.rank == 0:
                log.info("resumed from %s at step %d", self.resume, self.step)
        self.after = _resume_positions(self.state, self.rank, self.world)

    def start_streams(self, p: float) -> None:
        """Start the streams a phase reads (a stream's execution begins with its first read):
        one started earlier and left idle through a long phase trips Ray Data's no-progress
        guard (pretrain_finetune's real stream during pre-training). A file-backed stream is
        this rank's own (training.data.rank_stream), executed by a coordinator actor (not in
        this process) from just after the row the checkpoint recorded."""
        import ray.train

        batches = {"batch_size": self.cfg.batch_size, "prefetch_batches": self.cfg.data.prefetch_batches,
                   "device": self.device}
        for name in self.meta["streams"]:
            if name not in self.streams and {"real": p < 1, "synthetic": p > 0}[name]:
                spec = self.meta["specs"].get(name)
                if spec is None:  # the live generation stream: Ray Train's split
                    it = ray.train.get_dataset_shard(name)
                else:
                    it = rank_stream(spec, self.cfg, self.rank, self.world, self.after.get(name, -1)).streaming_split(1)[0]
                self.streams[name] = primed(iter(it.iter_torch_batches(**batches)))

    def build_model(self, subdir: str = MODEL_DIR):
        """The model (restored from the checkpoint's ``subdir``, ``model.init_from``, or new),
        BatchNorm synced, wrapped for DDP."""
        import ray.train.torch

        cfg = self.cfg
        if self.resume:
            model = load_model(self.arch, Path(self.resume) / subdir)
        elif cfg.model.init_from:
            from training.rundir import fetch_dir

            source = fetch_dir(cfg.model.init_from)
            model = load_model(self.arch, source / (subdir if (source / subdir).is_dir() else MODEL_DIR))
        else:
            model = build_model(cfg.model, self.classes)
        model = maybe_sync_batchnorm(model, self.world, self.device)
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": self.arch == "mask2former"})
        return maybe_compile(model, cfg.workers.compile)

    def networks(self) -> list:
        """The networks the optimizer steps (co-training: two)."""
        return [self.model]

    def fit(self) -> None:
        for net in self.networks():
            net.train()
        for ph in self.meta["phases"]:
            if self.step < ph["start"] + ph["iterations"]:
                self.run_phase(ph)

    def run_phase(self, ph: dict[str, Any]) -> None:
        """One phase: its own optimizer and poly schedule (pretrain_finetune: a fresh one to
        fine-tune; restored when the checkpoint is inside it), its synthetic share, its steps."""
        import torch

        self.opt = make_optimizer(self.cfg, self.networks(), ph["lr"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, poly_lambda(self.cfg, ph["iterations"]))
        if self.state is not None and ph["start"] < self.step:
            self.opt.load_state_dict(self.state["optimizer"])
            self.sched.load_state_dict(self.state["scheduler"])
        self.mixer.p = _phase_p(self.meta, ph)
        self.start_streams(self.mixer.p)
        self.window = _window(self.mixer)
        end = ph["start"] + ph["iterations"]
        while self.step < end:
            t0 = time.perf_counter()
            value_sum, wait = self.train_step()
            self.step += 1
            for k, v in (("loss", value_sum), ("n", 1), ("wait", wait), ("busy", time.perf_counter() - t0)):
                self.window[k] += v
            fail_if_asked(self.meta["run_dir"], self.step, self.cfg.debug.fail_at_steps, self.rank)
            self.end_of_step(ph, end)

    def train_step(self):
        """One optimizer step over ``grad_accum`` micro-batches: (summed loss on the device,
        seconds spent waiting for data). Sets ``self.lr`` to the step's lr."""
        import torch

        cfg = self.cfg
        wait, value_sum = 0.0, torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            tw = time.perf_counter()
            batch = next(self.mixer)
            wait += time.perf_counter() - tw
            if self.record:
                self.record.add(self.step + 1, batch[AUG_KEY])
            # uint8 on the wire, normalised on the device
            x = to_model_input(batch[PIXELS].to(self.device, non_blocking=True), cfg.aug.mean, cfg.aug.std)
            y = batch[LABELS].to(self.device, non_blocking=True).long()
            sync = micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.no_sync()), autocast(self.device, cfg.workers.precision):
                value = self.micro_loss(x, y, micro) / cfg.grad_accum
            self.scaler.scale(value).backward()
            value_sum += value.detach()  # stays on the device: no sync per step
            self.window["flagged"] += batch[SYNTHETIC].sum()  # synthetic rows, variants included (on the device)
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for net in self.networks() for p in net.parameters()], cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        return value_sum, wait

    def micro_loss(self, x, y, micro: int):
        """The loss of one micro-batch (``x`` normalised pixels, ``y`` labels, 255 = ignore)."""
        return loss(self.model, self.arch, x, y, len(self.classes))

    def no_sync(self):
        """A context deferring DDP's gradient all-reduce (every micro-batch but the last)."""
        stack = contextlib.ExitStack()
        for net in self.networks():
            if hasattr(net, "no_sync"):
                stack.enter_context(net.no_sync())
        return stack

    def end_of_step(self, ph: dict[str, Any], end: int) -> None:
        """Report the window's metrics (all-reduced) when due, with an evaluation and a
        checkpoint when those are due too."""
        cfg, step, window = self.cfg, self.step, self.window
        do_eval, do_ckpt, do_report = due(step, end=end, eval_every=cfg.eval_interval,
                                          ckpt_every=cfg.checkpoint_interval or cfg.eval_interval, log_every=cfg.log_interval)
        if not do_report:
            return
        taken = {k: self.mixer.taken[k] - window["taken0"][k] for k in self.mixer.taken}
        sums = _sum([float(window["loss"]), window["n"], window["wait"], window["busy"], float(window["flagged"]),
                     sum(taken.values()), time.perf_counter() - window["t0"]], self.device)
        metrics: dict[str, Any] = {
            "step": step, "phase": ph["name"], "iterations": self.total, "loss": sums[0] / max(1, sums[1]), "lr": self.lr,
            "data_wait_fraction": sums[2] / max(1e-9, sums[3]), "step_time_s": sums[3] / max(1, sums[1]),
            "steps_per_s": window["n"] / max(1e-9, sums[6] / self.world), "synthetic_fraction": sums[4] / max(1, sums[5])}
        if do_eval:
            metrics.update(self.evaluate())
        self.extra["elapsed_s"] = metrics["elapsed_s"] = time.perf_counter() - self.started
        report(metrics, step, self.rank, self.checkpoint_writer(ph) if do_ckpt else None)
        self.window = _window(self.mixer)

    def evaluate(self) -> dict[str, Any]:
        """Val mIoU (confusion matrices all-reduced) as report metrics; the best so far kept."""
        cfg = self.cfg
        summary = summarize(evaluate_shard(self.model, self.arch, self.val, len(self.classes), self.device,
                                           cfg.eval_batch_size, cfg.workers.precision, cfg.eval.model_dump(),
                                           cfg.aug.mean, cfg.aug.std), self.classes)
        self.extra["best_miou"] = max(self.extra["best_miou"], summary["miou"])
        out = {"eval_miou": summary["miou"], "eval_pixel_acc": summary["pixel_acc"],
               "eval_per_class_iou": summary["per_class_iou"], "best_miou": self.extra["best_miou"]}
        if self.step == self.total:
            out["eval_confusion"] = summary["confusion"]
        return out

    def checkpoint_writer(self, ph: dict[str, Any]):
        """What rank 0 runs to write this step's checkpoint (every rank joins the all-reduces)."""
        state = {**self.extra, "phase": ph["name"],
                 "positions": _positions(self.mixer, self.after, self.rank, self.world, self.device)}
        step, model, opt, sched = self.step, self.model, self.opt, self.sched
        return lambda tmp: _save(tmp, model, opt, sched, step, state, self.meta)


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
