"""``segfactory finetune`` recipe ``textual_inversion``: AlignDiff's instance embedding bank.

AlignDiff (seed 000, Sec. 3.4) learns, for each given image-mask pair and class in it, one
embedding v* used as an adjective ("a photo of a v* sofa") with the normalized masked loss of
Eq. 3 (:mod:`training.finetune.textual_inversion_loss`). Everything else is frozen.

A recipe of its own (:class:`TextualInversionRecipe`, registered in
:mod:`training.finetune.recipes`) on the shared loop of :mod:`training.finetune.recipe_base`: its
hooks differ from the denoising recipes' because the text embeddings change at every step (no
cached prompt embeddings), the loss needs the mask, and only a (N, D) table trains. It reuses the
shared pieces: ``build_components`` (same base weights as the other recipes), ``PairEncoder``
(frozen VAE / text encoders), ``draw_noise`` / ``target_for`` / ``noise_scheduler``, the optimizer
and lr schedule, ``resize_crop``, the run directory (a local path or a URI), checkpoints with
the step and optimizer state (``--resume`` continues the step count).

Layout on Ray:
- a Ray Data pass decodes the few-shot source (any format ``generate`` reads; ``source.limit``
  or ``textual_inversion.ids``) into instance rows: image, binary mask (1 = the class, 0 = the
  rest, 255 = ignored), class, token;
- a TorchTrainer: the instance rows are split over the workers, each step a worker takes a
  batch of instances (different tokens in one batch), and the gradient of the (N, D) table is
  all-reduced, so every rank holds the same table (no DDP wrapper around a frozen UNet);
- the output is one safetensors bank (``actors.textual_inversion``) with each embedding's
  instance id, source id and class, plus ``final.json`` with the fixed-noise loss before and
  after training (the same noise and timesteps for both, so the numbers are comparable),
  evaluated at step 0, every ``validation.interval`` steps and at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError
from core.storage import Location
from training import rundir
from training.finetune.config import FinetuneConfig
from training.finetune.recipe_base import Recipe, make_trainer, open_run, start_run
from training.finetune.worker import (
    META_FILE,
    STATE_FILE,
    WorkerSetup,
    epochs,
    make_lr_schedule,
    make_optimizer,
    optimizer_step,
)

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
    """The instance's bank row (its token number) from (source id, class id); instances not in
    ``index`` (past ``shots_per_class``) are dropped."""
    keys = [f"{s}:{c}" for s, c in zip(batch["source_id"], batch["class_id"], strict=True)]
    keep = np.array([k in index for k in keys], dtype=bool)
    out = {name: np.asarray(col)[keep] for name, col in batch.items()}
    out["instance"] = np.array([index[k] for k, kept in zip(keys, keep, strict=True) if kept], np.int64)
    return out


def select_shots(keys: list[tuple[str, int]], k: int | None) -> list[tuple[str, int]]:
    """k-shot per class: the first ``k`` sources (by id) of each class; None keeps all."""
    if k is None:
        return keys
    chosen: dict[int, list[str]] = {}
    for source, cls in sorted(keys):
        if len(chosen.setdefault(cls, [])) < k:
            chosen[cls].append(source)
    return sorted((s, c) for c, sources in chosen.items() for s in sources)


def budget_iterations(steps_per_instance: int | None, instances: int, batch_size: int, workers: int, default: int) -> int:
    """Optimizer steps giving each instance ``steps_per_instance`` updates (each step updates
    batch_size x workers instances); ``default`` when no per-instance budget is set."""
    if steps_per_instance is None:
        return default
    return -(-steps_per_instance * instances // (batch_size * workers))


# --- the worker side ----------------------------------------------------------------------


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


class TextualInversionRecipe(Recipe):
    """AlignDiff's instance embeddings: the (N, D) table(s) train, everything else is frozen."""

    kind = "textual_inversion"
    target_key = "image"

    # --- worker side --------------------------------------------------------------------------

    @classmethod
    def from_worker(cls, w: WorkerSetup) -> TextualInversionRecipe:
        from actors.textual_inversion import BankEntry

        recipe = cls()
        recipe.w, recipe.ti = w, w.cfg.textual_inversion
        recipe.entries = [BankEntry(**e) for e in w.meta["entries"]]
        recipe.everything = w.meta["eval"]  # every instance once: the same fixed noise and timesteps each evaluation
        return recipe

    def setup_model(self, resume: str | None) -> dict[str, Any] | None:
        import torch

        from actors.textual_inversion import load_bank

        w = self.w
        self.text = InstanceText(w.comps, w.cfg.resolved_family, [e.token for e in self.entries],
                                 [e.class_name for e in self.entries], w.device)
        self.start_loss: float | None = None
        if not resume:
            return None
        _, tables, _ = load_bank(str(Path(resume) / BANK_IN_CKPT))
        with torch.no_grad():
            for param, saved in zip(self.text.parameters(), tables, strict=True):
                param.copy_(saved.to(param.device, param.dtype))
        state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=True)  # plain state dicts only: no pickled code
        self.start_loss = state.get("start_loss")
        return state

    def setup_optimizer(self, state: dict[str, Any] | None) -> None:
        self.params = self.text.parameters()
        self.opt = make_optimizer(self.w.cfg, self.params)
        self.sched = make_lr_schedule(self.w.cfg, self.opt)
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])

    def setup_data(self, step: int) -> None:
        import ray.train
        import torch

        cfg = self.w.cfg
        self.batches = epochs(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer,
                              cfg.seed + step, cfg.data.in_memory)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed * 1000 + self.w.rank + 100003 * step)

    def prompts(self, batch: dict[str, np.ndarray]) -> list[str]:
        from actors.textual_inversion import adjective_prompt

        return [adjective_prompt(self.entries[int(k)].class_name, self.entries[int(k)].token, self.ti.template)
                for k in batch["instance"]]

    def loss(self, batch: dict[str, np.ndarray], gen: Any, timesteps: Any = None) -> Any:
        w = self.w
        return _loss(w.comps["unet"], self.text, w.encoder, w.scheduler, batch, self.prompts(batch),
                     w.cfg.resolved_family, w.cfg.data.resolution, self.ti.bg_weight, gen, timesteps)

    def train_step(self) -> tuple[float, float]:
        import torch

        tw = time.perf_counter()
        batch = next(self.batches)
        wait = time.perf_counter() - tw
        loss = self.loss(batch, self.gen)
        loss.backward()
        if self.w.world > 1:  # every rank ends with the same table
            for p in self.params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.w.world
        self.lr = optimizer_step(self.w.cfg, self.params, self.opt, self.sched)
        return float(loss.detach()), wait

    def evaluate(self, step: int) -> dict[str, Any]:
        """The fixed-noise loss over every instance (the same noise and timesteps each time)."""
        import torch

        from training.finetune.models import eval_timesteps

        cfg, everything = self.w.cfg, self.everything
        ts_all = eval_timesteps(self.w.scheduler, cfg.validation.timesteps)
        total = 0.0
        with torch.no_grad():
            for t in ts_all:
                ts = torch.full((len(everything["instance"]),), t)
                total += float(self.loss(everything, torch.Generator("cpu").manual_seed(cfg.seed + t), ts))
        value = total / len(ts_all)
        if step == 0:
            self.start_loss = value
        return {"val_loss": value}

    def save_checkpoint(self, step: int, metrics: dict[str, Any]) -> Callable[[Path], None]:
        """The bank so far, the losses before / now, and the optimizer state to resume from."""
        def write(tmp: Path) -> None:
            import torch

            from actors.textual_inversion import save_bank

            save_bank(str(tmp / BANK_IN_CKPT), self.entries, [p.detach().cpu() for p in self.params],
                      extra={k: str(v) for k, v in self.w.meta["bank_meta"].items()})
            (tmp / "losses.json").write_text(json.dumps({"initial": self.start_loss, "final": metrics.get("val_loss")}))
            torch.save({"step": step, "elapsed_s": metrics["elapsed_s"], "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "start_loss": self.start_loss}, tmp / STATE_FILE)
            (tmp / META_FILE).write_text(json.dumps({"kind": self.kind, "step": step}, indent=1))

        return write

    # --- driver side --------------------------------------------------------------------------

    @classmethod
    def run(cls, cfg: FinetuneConfig) -> dict[str, Any]:
        """Instances -> TorchTrainer -> ``output.path/bank.safetensors`` + ``final.json``."""
        from core.runtime import init_ray
        from training.finetune.data import build_kwargs, clear_rejected, write_index_problems
        from training.runlog import record_fit

        started = time.time()
        run, resume_from, step = open_run(cfg)
        index, rows, only = source_rows(cfg)
        init_ray(cfg.ray)
        start_run(cfg, run, resume_from, step)
        clear_rejected(run)  # this run's instance pass writes its own
        write_index_problems(run, index.problems)
        ds, entries = instance_dataset(cfg, index, rows, only, run)
        # a budget per instance (textual_inversion.steps_per_instance) is known once the instances are
        cfg = cfg.model_copy(update={"iterations": budget_iterations(
            cfg.textual_inversion.steps_per_instance, len(entries), cfg.batch_size, cfg.workers.num_workers, cfg.iterations)})
        ordered = ds.sort("instance").take_all()  # few-shot: a handful of small rows
        meta = {"run_dir": run.uri, "build": build_kwargs(cfg), "entries": [e.__dict__ for e in entries],
                "bank_meta": bank_meta(cfg), "resume_from": str(resume_from) if resume_from else None,
                "eval": {k: np.stack([np.asarray(r[k]) for r in ordered]) for k in ("instance", "image", "mask")}}
        trainer = make_trainer(cfg, cls, meta, {"train": ds.select_columns(["instance", "image", "mask"])}, run)
        log.info("textual inversion: %d instance(s) of %d source row(s), %d steps x %d x %d worker(s) -> %s",
                 len(entries), len(rows), cfg.iterations, cfg.batch_size, cfg.workers.num_workers, run)
        result = record_fit(trainer, run)
        return cls._finish(cfg, run, result, entries, started)

    @classmethod
    def _finish(cls, cfg: FinetuneConfig, run: Location, result: Any, entries: list[Any], started: float) -> dict[str, Any]:
        """The last checkpoint's bank copied to ``RUN/<bank_name>``; ``final.json``."""
        from actors.textual_inversion import load_bank, save_bank
        from training.finetune.data import rejected_counts
        from training.runlog import run_record

        with result.checkpoint.as_directory() as ckpt:
            losses = json.loads((Path(ckpt) / "losses.json").read_text())
            got, embeddings, meta_out = load_bank(str(Path(ckpt) / BANK_IN_CKPT))
        bank = save_bank(str(run / cfg.textual_inversion.bank_name), got, embeddings,
                         extra={k: v for k, v in meta_out.items() if k != "instances"})
        final = {"kind": cfg.kind, "final_step": cfg.iterations, "iterations": cfg.iterations, "model": bank,
                 "bank": bank, "instances": len(entries), "classes": sorted({e.class_name for e in entries}),
                 "val_loss_initial": losses["initial"], "val_loss_final": losses["final"],
                 "steps_per_s": (result.metrics or {}).get("steps_per_s"), "rejected": rejected_counts(run),
                 **run_record(run), "wall_s": round(time.time() - started, 3)}
        rundir.write_json(run / "final.json", final)
        log.info("textual inversion done: fixed-noise loss %.4f -> %.4f, bank %s", losses["initial"], losses["final"], bank)
        return final


# --- the driver's data ---------------------------------------------------------------------


def source_rows(cfg: FinetuneConfig) -> tuple[Any, list[dict], list[int] | None]:
    """(index, the given rows: ``textual_inversion.ids`` and ``source.limit``, the class ids to
    learn or None for every class); bad ids or class names are one line naming the key."""
    from pipelines.source_index import index_source
    from pipelines.sources import SourceError

    ti = cfg.textual_inversion
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
    classes, only = list(index.classes), None
    if ti.classes is not None:
        unknown = [c for c in ti.classes if c not in classes]
        if unknown:
            raise ConfigError(f"textual_inversion.classes: unknown class(es) {unknown}; the source has {classes}")
        only = [classes.index(c) for c in ti.classes]
    return index, rows, only


def instance_dataset(cfg: FinetuneConfig, index: Any, rows: list[dict], only: list[int] | None,
                     run: Location) -> tuple[Any, list[Any]]:
    """The instance rows (a Ray Data pass; unreadable rows to ``RUN/rejected/``) with their bank
    row, and the bank's entries (one token per (source row, class))."""
    import ray

    from actors.textual_inversion import BankEntry, instance_token

    ti, classes = cfg.textual_inversion, list(index.classes)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 16))).map_batches(
        make_instances, batch_size=4, num_cpus=cfg.data.encode_num_cpus, batch_format="numpy",
        fn_kwargs={"format": index.format, "classes": classes, "background": index.background_index,
                   "resolution": cfg.data.resolution, "only": only, "min_fraction": ti.min_fraction,
                   "rejected_to": run.uri}).materialize()
    keys = sorted({(str(r["source_id"]), int(r["class_id"])) for r in ds.select_columns(["source_id", "class_id"]).take_all()})
    keys = select_shots(keys, ti.shots_per_class)
    if not keys:
        raise ConfigError(f"source.path: no instance (a non-background class covering >= {ti.min_fraction:.2%}) "
                          f"in {len(rows)} source row(s)")
    entries = [BankEntry(instance_token(k), f"{s}:{c}", s, c, classes[c]) for k, (s, c) in enumerate(keys)]
    if len(entries) < cfg.batch_size * cfg.workers.num_workers:
        raise ConfigError(f"batch_size: {cfg.batch_size} x {cfg.workers.num_workers} worker(s) needs at least that many "
                          f"instances; the source gives {len(entries)}")
    index_of = {e.instance_id: k for k, e in enumerate(entries)}
    return ds.map_batches(add_index, fn_kwargs={"index": index_of}, batch_format="numpy").materialize(), entries


def bank_meta(cfg: FinetuneConfig) -> dict[str, Any]:
    """What the bank's metadata records (generation checks family, template and base)."""
    return {"family": cfg.resolved_family, "preset": cfg.preset, "template": cfg.textual_inversion.template,
            "bg_weight": cfg.textual_inversion.bg_weight,
            "base": cfg.model.local_path or cfg.model.id or f"{cfg.preset}-random",
            "revision": cfg.model.revision, "resolution": cfg.data.resolution}
