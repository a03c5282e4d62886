"""CPU work between the model pools, and the gate that runs a model only on rows that need it.

Each function takes and returns a numpy-dict batch (Ray Data ``batch_format="numpy"``) and is
Ray-free, so tests call them directly. Rows are never removed: a row that fails gets a
``drop_reason`` and rides along to the writer, which sends it to ``rejected/``. That keeps
the per-source row count fixed, which is how the writer knows a shard is complete.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core import schema as S
from core.runtime import own_loggers_in_ray_worker

log = logging.getLogger(__name__)

SIBLINGS = "siblings"  # rows one source row produces; the writer counts them per source
IDENTITY = {S.SAMPLE_ID, S.SOURCE_ID, S.SHARD, SIBLINGS}  # columns no stage may rewrite


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _is_numeric(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "biuf"


def set_rows(batch: dict[str, np.ndarray], rows: np.ndarray, updates: dict[str, np.ndarray], fill: Any = b"") -> None:
    """Write ``updates`` (arrays over the selected rows) into ``batch`` in place.

    Non-numeric columns become object arrays, so a longer string never gets truncated
    into a fixed-width numpy unicode dtype.
    """
    n = len(next(iter(batch.values())))
    for col, values in updates.items():
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if col in batch and _is_numeric(batch[col]) and _is_numeric(values):
            base = batch[col].astype(np.result_type(batch[col], values), copy=True)
        elif col in batch:
            base = batch[col].astype(object, copy=True)
        elif _is_numeric(values):
            base = np.zeros(n, dtype=values.dtype)
        else:
            base = _objects([fill] * n)
        base[rows] = values if _is_numeric(base) else _objects(list(values))
        batch[col] = base


def kept(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean array: rows not dropped so far."""
    return np.array([not r for r in batch[S.DROP_REASON]], dtype=bool)


def _select(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


class Gated:
    """Hosts one actor and calls it on the kept rows that ``needs`` selects.

    The others pass through untouched. If the model call on a batch raises, each row is
    retried alone and a row that still raises is dropped with the error as its reason —
    one poisoned row never fails the job. An error that means the process or its device is
    broken (:func:`device_broken`: CUDA/driver/NCCL errors, device-side asserts; an
    out-of-memory that persists after one retry at half the batch) is no row's fault: the
    actor process exits, Ray restarts it (the pools are restartable) and Ray Data retries the
    batch on a healthy actor, so a bad GPU never turns into rejected rows. Rows that ``redo_if`` flags (e.g. a NaN image from
    an fp16 VAE) are generated once more with a derived seed; the checks downstream drop
    them if they are still bad. ``fault`` injects failures for tests (off by default).
    """

    def __init__(self, actor_cls: type, actor_kwargs: dict[str, Any], stage: str, needs: str | None = None,
                 redo_if: Callable[[dict[str, np.ndarray], int], bool] | None = None,
                 fault: dict[str, Any] | None = None):
        self.stage = stage
        self.needs = needs  # a column that must be empty (b"") for the row to need this stage
        self.redo_if = redo_if
        self.fault = fault or {}
        self.batches = 0
        own_loggers_in_ray_worker()  # in a Ray worker: our lines reach the console whatever Ray's root level is
        started = time.monotonic()
        self.actor = actor_cls(**actor_kwargs)
        log.info("%s: actor up (%s, loaded in %.1f s)", stage, actor_cls.__name__, time.monotonic() - started)

    def _todo(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        todo = kept(batch)
        if self.needs is not None and self.needs in batch:
            todo &= np.array([len(v) == 0 for v in batch[self.needs]], dtype=bool)
        return todo

    def _model(self, sub: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fault.get("raise_on_sample") in set(sub[S.SAMPLE_ID]):
            raise RuntimeError(f"injected fault on {self.fault['raise_on_sample']}")
        if _fault_once(self.stage, self.batches, self.fault, "device_error_after_batches", "device-error"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")
        return self.actor(sub)

    def _run(self, batch: dict[str, np.ndarray], todo: np.ndarray) -> None:
        """Model call on rows ``todo``, falling back to one row at a time."""
        try:
            results = self._call_or_halve(batch, todo)
        except Exception as exc:  # noqa: BLE001 - isolate the bad row, keep the rest
            log.warning("%s: batch of %d failed (%s); retrying row by row", self.stage, len(todo), exc)
            results = []
            for i in todo:
                row = np.array([i])
                try:
                    results.append((row, self._model(_select(batch, row))))
                except Exception as row_exc:  # noqa: BLE001
                    _exit_if_broken(self.stage, row_exc, oom_counts=True)
                    reason = f"{self.stage}_error: {type(row_exc).__name__}: {row_exc}"[:500]
                    set_rows(batch, row, {S.DROP_REASON: _objects([reason])})
        for rows, out in results:
            set_rows(batch, rows, {k: v for k, v in out.items() if k not in IDENTITY})

    def _call_or_halve(self, batch: dict[str, np.ndarray], todo: np.ndarray) -> list:
        """The model on ``todo``; after an out-of-memory, once more as two halves (a second one
        means the device is broken). A broken device exits the process; other errors propagate."""
        try:
            return [(todo, self._model(_select(batch, todo)))]
        except Exception as exc:  # noqa: BLE001
            _exit_if_broken(self.stage, exc, oom_counts=len(todo) < 2)
            if not is_oom(exc):
                raise
            log.warning("%s: out of memory on a batch of %d; once more at half the batch", self.stage, len(todo))
        try:
            half = len(todo) // 2
            return [(part, self._model(_select(batch, part))) for part in (todo[:half], todo[half:])]
        except Exception as exc:  # noqa: BLE001
            _exit_if_broken(self.stage, exc, oom_counts=True)
            raise

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        todo = np.flatnonzero(self._todo(batch))
        if len(todo) == 0:
            return batch
        self.batches += 1
        _maybe_die(self.stage, self.batches, self.fault)
        if self.fault.get("batch_delay_s"):
            time.sleep(self.fault["batch_delay_s"])
        self._run(batch, todo)
        if self.redo_if is not None:
            redo = np.array([i for i in todo if not batch[S.DROP_REASON][i] and self.redo_if(batch, i)], dtype=int)
            if len(redo):
                log.warning("%s: regenerating %d bad output(s) with derived seeds", self.stage, len(redo))
                seeds = [S.derive_seed(int(batch[S.SEED][i]), "regenerate") for i in redo]
                set_rows(batch, redo, {S.SEED: np.array(seeds, dtype=np.int64)})
                self._run(batch, redo)
        return batch


# Messages of errors that leave a process's device unusable (torch raises them as RuntimeError
# or torch.AcceleratorError); matched in lower case. An out-of-memory is handled apart (is_oom).
DEVICE_ERRORS = ("cuda error", "device-side assert", "cudnn_status", "cublas_status", "cusolver", "nccl",
                 "illegal memory access", "unspecified launch failure", "cuda driver", "driver shutting down",
                 "ecc error", "uncorrectable", "hip error", "no cuda gpus are available", "device lost")


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory of the device (torch.OutOfMemoryError, or its message)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def device_broken(exc: BaseException) -> bool:
    """An error that means the process's device (or its driver, or NCCL) is broken: no row's fault."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return type(exc).__name__ == "AcceleratorError" or any(m in text for m in DEVICE_ERRORS)


def _exit_if_broken(stage: str, exc: BaseException, oom_counts: bool) -> None:
    """Exit the actor process on a broken device (and on an out-of-memory once ``oom_counts``):
    Ray restarts the actor and retries the batch; rows never pay for a bad device."""
    if device_broken(exc) or (oom_counts and is_oom(exc)):
        log.error("%s: the device is broken (%s: %s); this actor process exits for Ray to restart it",
                  stage, type(exc).__name__, str(exc)[:300])
        logging.shutdown()
        os._exit(1)


def _fault_once(stage: str, batches: int, fault: dict[str, Any], key: str, name: str) -> bool:
    """Fault injection: True once per run (a marker file) after ``fault[key]`` batches."""
    after = fault.get(key)
    if after is None or batches <= after:
        return False
    marker = Path(fault["marker_dir"]) / f"{name}-{stage}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _maybe_die(stage: str, batches: int, fault: dict[str, Any]) -> None:
    """Fault injection: the actor process exits mid-batch once per run (a marker file makes
    the restarted actor carry on), as a preempted or OOM-killed worker would."""
    if _fault_once(stage, batches, fault, "die_after_batches", "died"):
        log.error("%s: injected fault: actor process exits now (batch %d)", stage, batches)
        os._exit(1)


def image_needs_redo(batch: dict[str, np.ndarray], i: int, min_image_std: float) -> bool:
    """A generated image that is missing (non-finite output) or constant."""
    raw = batch[S.IMAGE_RAW][i]
    if len(raw) == 0:
        return True
    return float(np.frombuffer(raw, np.uint8).std()) < min_image_std


class Colocated:
    """Several stages of a plan in one actor process (``colocate: true``): model pools are built
    here once and CPU stages run in between, each on sub-batches of its own batch size. Rows
    are never removed, so the sub-batches line up again."""

    def __init__(self, members: list[tuple[str, Any, dict[str, Any], dict[str, Any], int | None]]):
        from functools import partial

        self.members = [(name, fn(**ctor) if isinstance(fn, type) else partial(fn, **kwargs), size)
                        for name, fn, ctor, kwargs, size in members]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for _, fn, size in self.members:
            n = len(batch[S.SAMPLE_ID]) if S.SAMPLE_ID in batch else len(next(iter(batch.values())))
            step = size or n or 1
            parts = [fn({k: v[i:i + step] for k, v in batch.items()}) for i in range(0, n, step)]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else batch
        return batch


class Text2MaskPool(Gated):
    """The Text2Mask stage (its own class so Ray's progress and stats name it)."""


class Mask2ImgPool(Gated):
    """The Mask2Img stage."""


# --- encoding helpers ---------------------------------------------------------------------


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_image(array: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        return encode_png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Single-channel PNG of class ids: 8-bit while it fits, else 16-bit."""
    if mask.dtype != np.uint8:
        return encode_png(mask.astype(np.uint16))
    return encode_png(mask)


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img)


# --- CPU stages ---------------------------------------------------------------------------


def colorize(batch: dict[str, np.ndarray], palette: np.ndarray, mask_dtype: str,
             background: int | None, min_foreground_fraction: float) -> dict[str, np.ndarray]:
    """Mask → colour map for Mask2Img; MaskSyn masks with no object are dropped here."""
    from actors.colormap import mask_to_color

    batch = dict(batch)
    rows = np.flatnonzero(kept(batch))
    colors, reasons = [], []
    for i in rows:
        mask = S.raw_to_array(batch[S.MASK_RAW][i], int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i]), mask_dtype)
        valid = mask != S.IGNORE_INDEX
        fg = valid & (mask != background) if background is not None else valid
        frac = float(fg.mean())
        reason = ""
        if batch[S.METHOD][i] == "masksyn" and (frac == 0 or frac < min_foreground_fraction):
            reason = "masksyn_no_object"
        reasons.append(reason)
        colors.append(b"" if reason else mask_to_color(mask, palette).tobytes())
    set_rows(batch, rows, {S.COLOR_RAW: _objects(colors), S.DROP_REASON: _objects(reasons)})
    return batch


def finalize(batch: dict[str, np.ndarray], image_format: str, jpeg_quality: int, mask_dtype: str,
             min_image_std: float) -> dict[str, np.ndarray]:
    """Validity checks on generated images, then encode to the dataset contract's columns."""
    n = len(batch[S.SAMPLE_ID])
    reasons = list(batch[S.DROP_REASON])
    images, masks = [b""] * n, [b""] * n
    for i in range(n):
        if reasons[i]:
            continue
        h, w = int(batch[S.HEIGHT][i]), int(batch[S.WIDTH][i])
        raw = batch[S.IMAGE_RAW][i]
        if len(raw) != h * w * 3:
            reasons[i] = "image_nonfinite" if len(raw) == 0 else "image_wrong_size"
            continue
        image = S.raw_to_array(raw, h, w, np.uint8, 3)
        if float(image.std()) < min_image_std:
            reasons[i] = "image_constant"
            continue
        images[i] = encode_image(image, image_format, jpeg_quality)
        masks[i] = encode_mask(S.raw_to_array(batch[S.MASK_RAW][i], h, w, mask_dtype))
    out = {col: batch[col] for col in S.DATASET_SCHEMA.names if col in batch}
    out.update({col: batch[col] for col in batch if col.startswith(S.SCORE_PREFIX)})  # filter scores
    out.update({col: batch[col] for col in batch if col in S.EXTRA_COLUMNS})  # graph-specific columns
    out[S.IMAGE] = _objects(images)
    out[S.MASK] = _objects(masks)
    out[S.DROP_REASON] = _objects(reasons)
    for col in (S.SHARD, SIBLINGS, S.SOURCE_PATH, S.PROMPT_TRUNCATED):
        out[col] = batch[col] if col in batch else np.zeros(n, dtype=np.int64)
    if S.GENERATOR not in out:
        out[S.GENERATOR] = _objects([""] * n)
    return out
