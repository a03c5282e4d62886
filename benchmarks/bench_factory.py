"""Samples/s of the factory graph (Diffusion Synthesis) and the keep rate of each filter.

    .venv/bin/python benchmarks/bench_factory.py [--images 12] [--k 2] [--preset tiny] [--batch 8]

Part 1 runs each factory actor on one batch of ``--batch`` images in one call, then image by
image, and prints the model calls and the time of each (batching is what the pools rely on).
Part 2 runs the whole graph on a local Ray from a folder of images with no masks and prints
variants/s (every generated row, kept or dropped), kept samples/s, and per filter: rows it
scored, rows it kept, keep rate. Machines here are noisy: compare numbers from one run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core import schema as S
from core.config import load_config
from core.runtime import init_ray
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
CLASSES = ["background", "cat", "dog"]
log = logging.getLogger("bench_factory")


def image_folder(root: Path, n: int, size: tuple[int, int] = (48, 64)) -> Path:
    """images/ (no masks) + classes.txt: flat backgrounds with one coloured rectangle each."""
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((*size, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        a[y:y + size[0] // 2, x:x + size[1] // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(a).save(root / "images" / f"img{i:04d}.png")
    return root


def bench_actors(batch_size: int) -> None:
    """One batched call vs one call per image, per actor (tiny models, CPU)."""
    from actors.captioner import Captioner
    from actors.clip_embedder import ClipEmbedder
    from actors.grounding import Grounding
    from actors.sam import SamMasks

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(batch_size)]
    batch = {S.IMAGE_RAW: np.array([im.tobytes() for im in images], dtype=object),
             S.HEIGHT: np.full(batch_size, 48), S.WIDTH: np.full(batch_size, 64)}
    grounding = Grounding(CLASSES, device="cpu")
    batch.update(grounding(batch))
    actors = {"captioner": Captioner("blip", device="cpu", max_new_tokens=8, min_new_tokens=3),
              "grounding": Grounding(CLASSES, device="cpu"), "sam": SamMasks(device="cpu"),
              "clip": ClipEmbedder(device="cpu", columns={S.IMAGE_RAW: S.CLIP_EMBEDDING})}
    for name, actor in actors.items():
        actor(batch)  # warm-up
        before = actor.calls
        start = time.perf_counter()
        actor(batch)
        batched, batched_calls = time.perf_counter() - start, actor.calls - before
        before = actor.calls
        start = time.perf_counter()
        for i in range(batch_size):
            actor({k: v[i:i + 1] for k, v in batch.items()})
        single, single_calls = time.perf_counter() - start, actor.calls - before
        print(f"{name:<10} batch of {batch_size}: {batched_calls} model call(s) {batched * 1e3:7.1f} ms | "
              f"per image: {single_calls} calls {single * 1e3:7.1f} ms | speed-up {single / batched:5.2f}x")


def keep_rates(out: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(variant rows, filter -> (rows scored, rows kept)) from the files on disk."""
    frames = [pd.read_parquet(out / sub) for sub in ("shards", "rejected") if any((out / sub).glob("*.parquet"))]
    rows = pd.concat(frames)
    variants = int(rows[S.SAMPLE_ID].str.contains("/factory/").sum())  # not the one-row rejected sources
    result = {}
    for name, col, reason in (("similarity (ε)", S.SCORE_CLIP_SIMILARITY, "low_similarity"),
                              ("re-segmentation (τ)", S.SCORE_RESEG_MIOU, "low_reseg_miou")):
        if col in rows:
            scored = rows[col].notna()
            result[name] = (int(scored.sum()), int((scored & (rows[S.DROP_REASON] != reason)).sum()))
    return variants, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="source images")
    parser.add_argument("--k", type=int, default=2, help="variants per image")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the actor comparison")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"-- actors, one batch vs one call per image ({args.batch} images of 48x64, tiny, CPU)")
    bench_actors(args.batch)
    init_ray(None, num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        src = image_folder(Path(tmp) / "src", args.images)
        out = Path(tmp) / "out"
        cfg = load_config(GenerateConfig, CONFIGS / f"factory-{args.preset}.yaml", [
            f"source.path={src}", f"output.path={out}", f"factory.samples_per_image={args.k}",
            "ray.show_progress=false", *args.overrides])
        start = time.perf_counter()
        manifest = run_generate(cfg).manifest
        wall = time.perf_counter() - start
        variants, rates = keep_rates(out)
    print(f"-- factory graph, preset {args.preset}: {args.images} images x K={args.k}, "
          f"ε={cfg.selection.similarity_threshold}, τ={cfg.selection.reseg_miou_threshold}")
    print(f"wall {wall:.1f} s | {variants} variants generated ({variants / wall:.3f}/s) | {manifest['rows']} kept "
          f"({manifest['rows'] / wall:.3f} samples/s) | drops {manifest['drops_per_reason']}")
    for name, (scored, kept) in rates.items():
        print(f"{name:<20} scored {scored:>4}  kept {kept:>4}  keep rate {kept / scored if scored else 0:.3f}")
    print(f"stage busy s: {manifest['timings']['stage_busy_s']}")


if __name__ == "__main__":
    main()
