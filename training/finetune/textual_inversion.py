"""``segfactory finetune`` recipe ``textual_inversion``: AlignDiff's instance embedding bank.

AlignDiff (seed 000, Sec. 3.4) learns, for each given image-mask pair and class in it, one
embedding v* used as an adjective ("a photo of a v* sofa") with the normalized masked loss of
Eq. 3 (:mod:`training.finetune.textual_inversion_loss`). Everything else is frozen.

Why its own loop instead of :mod:`training.finetune.worker`: the text embeddings change at
every step (no cached prompt embeddings), the loss needs the mask, and only a (N, D) table
trains. It reuses the shared pieces: ``build_components`` (same base weights as the other
recipes), ``PairEncoder`` (frozen VAE / text encoders), ``draw_noise`` / ``target_for`` /
``noise_scheduler``, the optimizer and lr schedule, ``resize_crop``.

Layout on Ray:
- a Ray Data pass decodes the few-shot source (any format ``generate`` reads; ``source.limit``
  or ``textual_inversion.ids``) into instance rows: image, binary mask (1 = the class, 0 = the
  rest, 255 = ignored), class, token;
- a TorchTrainer: the instance rows are split over the workers, each step a worker takes a
  batch of instances (different tokens in one batch), and the gradient of the (N, D) table is
  all-reduced, so every rank holds the same table (no DDP wrapper around a frozen UNet);
- the output is one safetensors bank (``actors.textual_inversion``) with each embedding's
  instance id, source id and class, plus ``final.json`` with the fixed-noise loss before and
  after training (the same noise and timesteps for both, so the numbers are comparable).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.finetune.config import FinetuneConfig

log = logging.getLogger("segfactory.finetune")

BANK_IN_CKPT = "bank.safetensors"


# --- instances (a Ray Data CPU task) ------------------------------------------------------


def make_instances(batch: dict[str, np.ndarray], *, format: str, classes: list[str], background: int | None,
                   resolution: int, only: list[int] | None, min_fraction: float,
                   rejected_to: str | None = None) -> dict[str, np.ndarray]:
    """Index rows -> one row per (source row, class present): ``image`` (R x R x 3),
    ``mask`` (R x R: 1 class, 0 rest, 255 ignored), ``class_id``, ``source_id``. Unreadable
    rows go to ``rejected_to/rejected/`` with their reason (logged when None); the run goes on."""
    from pipelines.sources import SourceError, load_pixels
    from training.finetune.pairs import resize_crop, write_rejected

    out: dict[str, list] = {k: [] for k in ("source_id", "class_id", "image", "mask")}
    rejected = []
    for i in range(len(batch["source_id"])):
        row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        try:
            image, mask = load_pixels(row, format, len(classes))
            if mask is None:
                raise SourceError(f"{row['source_path']}: no mask", "missing_mask")
        except SourceError as exc:
            reason = f"{exc.reason}: {str(exc).splitlines()[0]}"[:500]
            log.warning("textual inversion: rejecting %s (%s)", row["source_id"], reason)
            rejected.append({"source_id": str(row["source_id"]), "source_path": str(row["source_path"]),
                             "drop_reason": reason})
            continue
        img, msk, _ = resize_crop(image, mask, resolution)
        ids, counts = np.unique(msk, return_counts=True)
        for c, n in zip(ids.tolist(), counts.tolist(), strict=True):
            if c == 255 or c == background or (only is not None and c not in only) or n < min_fraction * msk.size:
                continue
            binary = np.where(msk == c, 1, 0).astype(np.uint8)
            binary[msk == 255] = 255
            out["source_id"].append(str(row["source_id"]))
            out["class_id"].append(int(c))
            out["image"].append(img)
            out["mask"].append(binary)
    write_rejected(rejected, rejected_to, "instances")
    if not out["source_id"]:
        return {"source_id": np.array([], dtype=object), "class_id": np.array([], np.int64),
                "image": np.zeros((0, resolution, resolution, 3), np.uint8),
                "mask": np.zeros((0, resolution, resolution), np.uint8)}
    return {"source_id": np.array(out["source_id"], dtype=object), "class_id": np.array(out["class_id"], np.int64),
            "image": np.stack(out["image"]), "mask": np.stack(out["mask"])}


def add_index(batch: dict[str, np.ndarray], *, index: dict[str, int]) -> dict[str, np.ndarray]:
    """The instance's bank row (its token number) from (source id, class id)."""
    batch["instance"] = np.array([index[f"{s}:{c}"] for s, c in zip(batch["source_id"], batch["class_id"], strict=True)],
                                 np.int64)
    return batch


# --- the worker loop ----------------------------------------------------------------------


class InstanceText:
    """Frozen text encoder(s) whose new-token rows come from a trainable (N, D) table each.

    A forward hook on each encoder's token-embedding layer puts ``table[k]`` where the input
    id is token k's, so the gradient reaches the table and nothing else trains.
    """

    def __init__(self, comps: dict[str, Any], family: str, tokens: list[str], init_words: list[str], device: Any):
        import torch

        from actors.textual_inversion import install_tokens

        self.comps, self.sdxl, self.device = comps, family == "sdxl", device
        self.pairs = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if self.sdxl else [])
        self.tables, self.ids = [], []
        for tok_name, enc_name in self.pairs:
            tok, enc = comps[tok_name], comps[enc_name]
            ids = install_tokens(tok, enc, tokens, init_words=init_words)  # start from the class noun
            enc.to(device)
            weight = enc.get_input_embeddings().weight
            self.tables.append(torch.nn.Parameter(weight[ids].detach().clone().float()))
            self.ids.append(torch.tensor(ids, device=device))
            enc.get_input_embeddings().register_forward_hook(self._hook(len(self.tables) - 1))
        self._input_ids: Any = None

    def _hook(self, k: int):
        def hook(_module: Any, args: tuple, output: Any) -> Any:
            ids = args[0]
            match = ids[..., None] == self.ids[k]  # (B, T, N)
            hit = match.any(-1)
            if not hit.any():
                return output
            rows = match.float().argmax(-1)
            return torch_where(hit[..., None], self.tables[k][rows].to(output.dtype), output)

        return hook

    def parameters(self) -> list[Any]:
        return list(self.tables)

    def encode(self, prompts: list[str]) -> dict[str, Any]:
        """prompt_embeds (and SDXL pooled) with gradients to the tables."""
        from training.finetune.models import encode_prompts

        return encode_prompts(self.comps, self.sdxl, prompts, self.device)


def torch_where(cond: Any, a: Any, b: Any) -> Any:
    import torch

    return torch.where(cond, a, b)


def _loss(unet: Any, text: InstanceText, encoder: Any, scheduler: Any, batch: dict[str, np.ndarray],
          prompts: list[str], family: str, resolution: int, bg_weight: float, gen: Any,
          timesteps: Any = None) -> Any:
    import torch

    from training.finetune.models import draw_noise, target_for, unet_kwargs
    from training.finetune.textual_inversion_loss import normalized_masked_loss

    with torch.no_grad():
        latents = encoder.encode_pixels(np.ascontiguousarray(batch["image"]), gen)
    noisy, noise, ts = draw_noise(latents, scheduler, gen, timesteps)
    cond = text.encode(prompts)
    n = len(prompts)
    cond["orig_hw"] = torch.full((n, 2), float(resolution))
    cond["crop_tl"] = torch.zeros(n, 2)
    pred = unet(noisy, ts, **unet_kwargs(cond, family, resolution)).sample
    masks = torch.as_tensor(np.asarray(batch["mask"]).astype(np.int64))
    return normalized_masked_loss(pred, target_for(scheduler, latents, noise, ts), masks, bg_weight)


def ti_loop(config: dict[str, Any]) -> None:
    """Each Ray Train worker: the instance table, trained on its shard of instance rows."""
    import ray.train
    import torch

    from actors.textual_inversion import BankEntry, adjective_prompt, save_bank
    from training.finetune.models import eval_timesteps
    from training.finetune.worker import (
        _epochs,
        make_lr_schedule,
        make_optimizer,
        optimizer_step,
        setup_worker,
    )

    w = setup_worker(config)
    cfg, meta, rank, world, comps = w.cfg, w.meta, w.rank, w.world, w.comps
    encoder, scheduler, family, res = w.encoder, w.scheduler, cfg.resolved_family, cfg.data.resolution
    ti = cfg.textual_inversion
    entries = [BankEntry(**e) for e in meta["entries"]]
    text = InstanceText(comps, family, [e.token for e in entries], [e.class_name for e in entries], w.device)
    unet = comps["unet"]
    params = text.parameters()
    opt = make_optimizer(cfg, params)
    sched = make_lr_schedule(cfg, opt)

    def prompts_of(batch: dict[str, np.ndarray]) -> list[str]:
        return [adjective_prompt(entries[int(k)].class_name, entries[int(k)].token, ti.template)
                for k in batch["instance"]]

    everything = meta["eval"]  # every instance once, the same fixed noise and timesteps before/after

    def eval_loss() -> float:
        ts_all = eval_timesteps(scheduler, cfg.validation.timesteps)
        total = 0.0
        with torch.no_grad():
            for t in ts_all:
                gen = torch.Generator("cpu").manual_seed(cfg.seed + t)
                ts = torch.full((len(everything["instance"]),), t)
                total += float(_loss(unet, text, encoder, scheduler, everything, prompts_of(everything), family, res,
                                     ti.bg_weight, gen, ts))
        return total / len(ts_all)

    start_loss = eval_loss()
    ray.train.report({"step": 0, "iterations": cfg.iterations, "val_loss": start_loss})
    batches = _epochs(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer, cfg.seed,
                      cfg.data.in_memory)
    gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + rank)
    window, t0, started = [], time.perf_counter(), time.perf_counter()
    for step in range(1, cfg.iterations + 1):
        batch = next(batches)
        loss = _loss(unet, text, encoder, scheduler, batch, prompts_of(batch), family, res, ti.bg_weight, gen)
        loss.backward()
        if world > 1:  # every rank ends with the same table
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        lr = optimizer_step(cfg, params, opt, sched)
        window.append(float(loss.detach()))
        last = step == cfg.iterations
        if step % cfg.log_interval and not last:
            continue
        metrics = {"step": step, "iterations": cfg.iterations, "loss": float(np.mean(window)),
                   "lr": lr, "steps_per_s": len(window) / max(1e-9, time.perf_counter() - t0),
                   "data_wait_fraction": 0.0, "step_time_s": (time.perf_counter() - t0) / len(window)}
        window, t0 = [], time.perf_counter()
        if not last:
            ray.train.report(metrics)
            continue
        metrics["val_loss"] = eval_loss()
        metrics["elapsed_s"] = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_bank(str(Path(tmp) / BANK_IN_CKPT), entries, [p.detach().cpu() for p in params],
                          extra={k: str(v) for k, v in meta["bank_meta"].items()})
                (Path(tmp) / "losses.json").write_text(json.dumps({"initial": start_loss, "final": metrics["val_loss"]}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:07d}")


# --- the driver ---------------------------------------------------------------------------


def run_textual_inversion(cfg: FinetuneConfig) -> dict[str, Any]:
    """Instances -> TorchTrainer -> ``output.path/bank.safetensors`` + ``final.json``."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.textual_inversion import BankEntry, instance_token, save_bank
    from core.config import ConfigError
    from core.runtime import init_ray
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError
    from training.finetune.records import (
        build_kwargs,
        metrics_callback,
        rejected_counts,
        truncate_metrics,
        write_index_problems,
    )

    ti = cfg.textual_inversion
    run_dir = Path(cfg.output.path).expanduser().resolve()
    started = time.time()
    try:
        index = index_source(cfg.source.path, cfg.source.format, split=cfg.source.split, classes=cfg.source.classes)
    except SourceError as exc:
        raise ConfigError(f"source.path: {exc}") from None
    rows = sorted(index.rows, key=lambda r: r["source_id"])
    if ti.ids is not None:
        missing = sorted(set(ti.ids) - {r["source_id"] for r in rows})
        if missing:
            raise ConfigError(f"textual_inversion.ids: not in the source: {missing[:5]}")
        rows = [r for r in rows if r["source_id"] in set(ti.ids)]
    rows = rows[: cfg.source.limit or None]
    classes = list(index.classes)
    only = None
    if ti.classes is not None:
        unknown = [c for c in ti.classes if c not in classes]
        if unknown:
            raise ConfigError(f"textual_inversion.classes: unknown class(es) {unknown}; the source has {classes}")
        only = [classes.index(c) for c in ti.classes]
    init_ray(cfg.ray)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "rejected", ignore_errors=True)  # this run's instance pass writes its own
    write_index_problems(run_dir, index.problems)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 16))).map_batches(
        make_instances, batch_size=4, num_cpus=cfg.data.encode_num_cpus, batch_format="numpy",
        fn_kwargs={"format": index.format, "classes": classes, "background": index.background_index,
                   "resolution": cfg.data.resolution, "only": only, "min_fraction": ti.min_fraction,
                   "rejected_to": str(run_dir)}).materialize()
    keys = sorted({(str(r["source_id"]), int(r["class_id"])) for r in ds.select_columns(["source_id", "class_id"]).take_all()})
    if not keys:
        raise ConfigError(f"source.path: no instance (a non-background class covering >= {ti.min_fraction:.2%}) "
                          f"in {len(rows)} source row(s)")
    entries = [BankEntry(instance_token(k), f"{s}:{c}", s, c, classes[c]) for k, (s, c) in enumerate(keys)]
    index_of = {e.instance_id: k for k, e in enumerate(entries)}
    ds = ds.map_batches(add_index, fn_kwargs={"index": index_of}, batch_format="numpy").materialize()
    if len(entries) < cfg.batch_size * cfg.workers.num_workers:
        raise ConfigError(f"batch_size: {cfg.batch_size} x {cfg.workers.num_workers} worker(s) needs at least that many "
                          f"instances; the source gives {len(entries)}")
    ordered = ds.sort("instance").take_all()  # few-shot: a handful of small rows
    everything = {k: np.stack([np.asarray(r[k]) for r in ordered]) for k in ("instance", "image", "mask")}
    bank_meta = {"family": cfg.resolved_family, "preset": cfg.preset, "template": ti.template,
                 "bg_weight": ti.bg_weight, "base": cfg.model.local_path or cfg.model.id or f"{cfg.preset}-random",
                 "revision": cfg.model.revision, "resolution": cfg.data.resolution}
    meta = {"build": build_kwargs(cfg), "entries": [e.__dict__ for e in entries], "bank_meta": bank_meta,
            "eval": everything}
    truncate_metrics(run_dir / "metrics.csv", -1)
    w = cfg.workers
    trainer = TorchTrainer(
        ti_loop, train_loop_config={"cfg": cfg.model_dump(mode="json"), "meta": meta},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu,
                                     resources_per_worker={"CPU": w.cpus_per_worker, **({"GPU": 1} if w.use_gpu else {})}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
                             callbacks=[metrics_callback(run_dir)]),
        datasets={"train": ds.select_columns(["instance", "image", "mask"])},
        dataset_config=DataConfig(datasets_to_split=["train"]))
    log.info("textual inversion: %d instance(s) of %d source row(s), %d steps x %d x %d worker(s) -> %s",
             len(entries), len(rows), cfg.iterations, cfg.batch_size, w.num_workers, run_dir)
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        losses = json.loads((Path(ckpt) / "losses.json").read_text())
        from actors.textual_inversion import load_bank

        got, embeddings, meta_out = load_bank(str(Path(ckpt) / BANK_IN_CKPT))
    bank = save_bank(str(run_dir / ti.bank_name), got, embeddings, extra={k: v for k, v in meta_out.items() if k != "instances"})
    final = {"kind": cfg.kind, "final_step": cfg.iterations, "iterations": cfg.iterations, "model": bank,
             "bank": bank, "instances": len(entries), "classes": sorted({e.class_name for e in entries}),
             "val_loss_initial": losses["initial"], "val_loss_final": losses["final"],
             "steps_per_s": (result.metrics or {}).get("steps_per_s"), "rejected": rejected_counts(run_dir),
             "wall_s": round(time.time() - started, 3)}
    (run_dir / "final.json").write_text(json.dumps(final, indent=1))
    log.info("textual inversion done: fixed-noise loss %.4f -> %.4f, bank %s", losses["initial"], losses["final"], bank)
    return final
