"""attn2mask on the tiny preset: samples/s with and without cross-attention capture, and the share
of pixels the reliability map marks 255.

    .venv/bin/python benchmarks/bench_attn_capture.py [--rows 16] [--repeats 3] [--family sd15]

One process, one actor (no Ray): the same prompts and seeds are generated with capture off and
on, alternating, ``repeats`` times each; the best time of each is kept (least disturbed by other
load). The images must be identical. Then the captured maps go through the mask stage with the
default settings (adaptive threshold, dense CRF, margin 0.05). Random tiny weights give flat,
image-agnostic attention, so the unreliable share here measures the machinery, not attn2mask's
mask quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.attn_text2img import AttnText2Img  # noqa: E402
from core import schema as S  # noqa: E402
from pipelines.graphs.attn2mask.masks import attn_mask_stage  # noqa: E402
from pipelines.graphs.attn2mask.prompts import expand_prompts  # noqa: E402

CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()

    src = {S.SOURCE_ID: np.array([f"b{i:03d}" for i in range(args.rows)], object),
           S.CAPTION: np.array([""] * args.rows, object), S.SHARD: np.zeros(args.rows, np.int64)}
    rows = expand_prompts(src, copies=1, first_copy=0, seed=0, classes=CLASSES, background=0, mode="classes",
                          templates=["a photo of {}"], max_objects=2, synonym_probability=0.5, synonyms=None)
    actor = AttnText2Img("tiny", family=args.family, steps=args.steps, resolution=args.resolution,
                         attention_factors=(2,), step_window=(0.0, 1.0), device="cpu",
                         max_rows_per_call=8)
    actor(expand_prompts({k: v[:1] for k, v in src.items()}, copies=1, first_copy=0, seed=1, classes=CLASSES,
                         background=0, mode="classes", templates=["{}"], max_objects=1,
                         synonym_probability=0.0, synonyms=None))  # warm-up
    best = {False: float("inf"), True: float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for capture in (False, True):
            actor.capture = capture
            t0 = time.perf_counter()
            outs[capture] = actor(dict(rows))
            best[capture] = min(best[capture], time.perf_counter() - t0)
    same = list(outs[False][S.IMAGE_RAW]) == list(outs[True][S.IMAGE_RAW])
    rate = {c: args.rows / best[c] for c in best}
    print(f"tiny {args.family}, {args.rows} rows, {args.steps} steps, {args.resolution}px, best of {args.repeats}")
    print(f"  without capture: {rate[False]:.2f} samples/s")
    print(f"  with capture:    {rate[True]:.2f} samples/s")
    print(f"  ratio with/without: {rate[True] / rate[False]:.3f}   images identical: {same}")

    batch = dict(outs[True])
    batch[S.DROP_REASON] = np.array([""] * args.rows, object)
    t0 = time.perf_counter()
    masked = attn_mask_stage(batch, background=0, mask_dtype="|u1", params={})
    mask_s = time.perf_counter() - t0
    masks = [np.frombuffer(m, np.uint8) for m in masked[S.MASK_RAW] if len(m)]
    unreliable = float(np.mean(np.concatenate(masks) == 255)) if masks else float("nan")
    dropped = sum(bool(r) for r in masked[S.DROP_REASON])
    print(f"  mask stage: {args.rows / mask_s:.1f} samples/s; unreliable (255) pixels: {unreliable:.3f}; "
          f"rows with no reliable foreground: {dropped}/{args.rows}")


if __name__ == "__main__":
    main()
