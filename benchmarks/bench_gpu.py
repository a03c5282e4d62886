"""GPU check: Mask2Img SDXL-ControlNet throughput, UNet MFU and memory; the seggen graph's GPU busy share.

    python benchmarks/bench_gpu.py                      # on a GPU box (sdxl-random: no downloads)
    python benchmarks/bench_gpu.py --smoke              # CPU, tiny preset: proves the script runs

Part 1 runs the real ``Mask2Img`` actor (``sdxl-random``: full-size SDXL + ControlNet with random
weights, bf16) at 1024², 30 steps, batch 1/4/8, under each setting of ``SETTINGS``: SDPA attention
(diffusers' default ``AttnProcessor2_0``), classic attention (``AttnProcessor``: matmul + softmax,
"SDPA off"), and SDPA with each speed option of ``actors/speedups.py`` alone and combined
(channels-last, fused QKV, regional and full ``torch.compile``, CUDA graphs); a compiled setting's
``warmup_s`` is its compile time. Per run: images/s over the
whole actor call, the denoising loop's time (CUDA-synchronised step callbacks), UNet MFU = FLOPs
of the UNet + ControlNet forwards (counted once per setting with ``torch.utils.flop_counter`` on
one real step, classifier-free guidance included) x steps / loop time / the GPU's peak dense bf16
FLOP/s, and peak memory. Part 2 runs the whole seggen graph (``sdxl-random``, Text2Mask and
Mask2Img pools sharing the GPU at 0.5 each) on a small toy source and samples the GPU's
utilisation with ``nvidia-smi`` every 200 ms: the busy fraction is the mean utilisation over the
run. Prints one JSON line per measurement, then ratios from this run (compile/SDPA-off vs SDPA).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_gpu")

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "A10": 125e12, "L4": 121e12, "4090": 165e12}
# attention processor + the speed options of actors/speedups.py (mask2img.speed in a config);
# warmup_s of a compiled setting is its compile time for that shape
SETTINGS = {"sdpa": {"sdpa": True, "speed": {}},
            "no-sdpa": {"sdpa": False, "speed": {}},
            "sdpa+channels-last": {"sdpa": True, "speed": {"channels_last": True}},
            "sdpa+fused-qkv": {"sdpa": True, "speed": {"fuse_qkv": True}},
            "sdpa+regional-compile": {"sdpa": True, "speed": {"compile": "regional"}},
            "sdpa+compile": {"sdpa": True, "speed": {"compile": "full"}},
            "sdpa+all": {"sdpa": True, "speed": {"compile": "regional", "fuse_qkv": True, "channels_last": True}},
            "sdpa+all+cuda-graphs": {"sdpa": True, "speed": {"compile": "regional", "compile_mode": "reduce-overhead",
                                                             "fuse_qkv": True, "channels_last": True}}}


class StepTimer:
    """Wraps a pipeline: times the denoising loop with synchronised step-end callbacks."""

    def __init__(self, pipe: Any, device: str) -> None:
        self.pipe, self.device, self.loop_s, self.steps_timed = pipe, device, 0.0, 0
        self._t0 = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        self._sync()
        now = time.perf_counter()
        if step == 0:
            self._t0 = now  # step 0 ends: time steps 1..N-1 (no first-call effects)
        else:
            self.loop_s += now - self._t0
            self.steps_timed += 1
            self._t0 = now
        return {}

    def __call__(self, **kwargs: Any) -> Any:
        return self.pipe(**kwargs, callback_on_step_end=self._callback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def count_step_flops(pipe: Any, batch: dict, actor: Any) -> float:
    """FLOPs of the UNet + ControlNet forwards of one denoising step (CFG batch included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counted = {"flops": 0}
    originals = {name: getattr(pipe, name).forward for name in ("unet", "controlnet")}

    def counting(name: str):
        def forward(*args: Any, **kwargs: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = originals[name](*args, **kwargs)
            counted["flops"] += counter.get_total_flops()
            return out
        return forward

    steps = actor.steps
    try:
        for name in originals:
            getattr(pipe, name).forward = counting(name)
        actor.steps = 1
        actor(batch)
    finally:
        actor.steps = steps
        for name, fwd in originals.items():
            getattr(pipe, name).forward = fwd
    return float(counted["flops"])


def make_batch(rows: int, side: int, palette: np.ndarray) -> dict:
    """``rows`` colour maps (random blocks of palette colours) with prompts and seeds."""
    from core import schema as S

    rng = np.random.default_rng(0)
    cells = rng.integers(0, len(palette), (rows, 8, 8))
    colors = [np.kron(palette[c], np.ones((side // 8, side // 8, 1), np.uint8)) for c in cells]
    return {S.SAMPLE_ID: np.array([f"s{i}/imgsyn/0" for i in range(rows)], dtype=object),
            S.PROMPT: np.array(["a living room with a sofa and a table"] * rows, dtype=object),
            S.SEED: np.arange(rows, dtype=np.int64),
            S.COLOR_RAW: np.array([c.astype(np.uint8).tobytes() for c in colors], dtype=object),
            S.HEIGHT: np.full(rows, side, np.int32), S.WIDTH: np.full(rows, side, np.int32)}


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench_mask2img(args: argparse.Namespace) -> list[dict]:
    """Part 1: Mask2Img at each setting and batch size."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from actors import diffusion_models as dm
    from actors.colormap import ade20k_palette
    from actors.mask2img import Mask2Img
    from actors.speedups import apply_speedups

    device = dm.pick_device(args.device)
    peak = peak_flops(device, args.peak_tflops)
    palette = ade20k_palette()[:20]
    results = []
    for setting in args.settings:
        opts = SETTINGS[setting]
        torch.manual_seed(0)
        actor = Mask2Img(args.preset, steps=args.steps, resolution=args.resolution, dtype="bfloat16",
                         device=device, guidance_scale=5.0)
        pipe = actor.pipe
        for net in (pipe.unet, pipe.controlnet):
            net.set_attn_processor(AttnProcessor2_0() if opts["sdpa"] else AttnProcessor())
        step_flops = {b: count_step_flops(pipe, make_batch(b, args.resolution, palette), actor)
                      for b in args.batches}
        apply_speedups(pipe, **opts["speed"])
        timer = StepTimer(pipe, device)
        actor.pipe = timer
        for b in args.batches:
            batch = make_batch(b, args.resolution, palette)
            start = time.perf_counter()
            actor(batch)  # warm-up (and compilation for this shape)
            warmup_s = time.perf_counter() - start
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            timer.loop_s, timer.steps_timed = 0.0, 0
            start = time.perf_counter()
            for _ in range(args.repeats):
                out = actor(batch)
            wall = (time.perf_counter() - start) / args.repeats
            assert all(len(x) == args.resolution ** 2 * 3 for x in out["image_raw"]), "missing images"
            step_s = timer.loop_s / max(1, timer.steps_timed)
            row = {"part": "mask2img", "setting": setting, "preset": args.preset, "device": device,
                   "batch": b, "steps": args.steps, "resolution": args.resolution,
                   "images_per_s": round(b / wall, 4), "s_per_batch": round(wall, 3),
                   "step_ms": round(step_s * 1e3, 2), "warmup_s": round(warmup_s, 2),
                   "unet_controlnet_tflop_per_step": round(step_flops[b] / 1e12, 4),
                   "unet_mfu": round(step_flops[b] / step_s / peak, 4) if peak and step_s else None,
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                   if device.startswith("cuda") else None}
            print(json.dumps(row), flush=True)
            results.append(row)
        del actor, pipe, timer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


class GpuSampler:
    """``nvidia-smi`` utilisation samples every ``interval_ms`` in a background thread."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.samples: list[float] = []
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self  # no GPU tools here (smoke mode)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            first = line.strip().split(",")[0]  # first GPU
            if first.replace(".", "", 1).isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def busy_fraction(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100.0, 4) if self.samples else None


def bench_graph(args: argparse.Namespace) -> dict:
    """Part 2: the whole seggen graph on a toy source, GPU utilisation sampled meanwhile."""
    from core.runtime import init_ray
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generate
    from pipelines.toy_data import make_toy_dataset

    gpus = 0 if args.smoke else 0.5
    res = {"batch_size": args.graph_batch, "min_actors": 1, "max_actors": 1, "num_gpus": gpus,
           "num_cpus": 0.5 if args.smoke else 2}
    with tempfile.TemporaryDirectory() as tmp:
        source = make_toy_dataset(Path(tmp) / "src", n_train=args.graph_rows, n_val=1, size=64, seed=0)
        cfg = GenerateConfig.model_validate({
            "pipeline": "seggen", "preset": args.preset, "palette": "voc",
            "source": {"path": str(source), "format": "voc", "limit": args.graph_rows},
            "output": {"path": str(Path(tmp) / "out")},
            "imgsyn": {"samples_per_source": 1}, "masksyn": {"samples_per_caption": 1},
            "text2mask": {"steps": args.graph_steps[0], "resolution": args.graph_resolution,
                          "model": {"dtype": "bfloat16"}, "resources": res},
            "mask2img": {"steps": args.graph_steps[1], "resolution": args.graph_resolution,
                         "model": {"dtype": "bfloat16"}, "resources": res},
            "cpu": {"batch_size": 8, "num_cpus": 0.5},
            "validation": {"min_image_std": 0.0, "max_rejected_fraction": 1.0},
            "ray": {"show_progress": False}})
        init_ray(cfg.ray, **({"num_cpus": 2} if args.smoke else {}))
        start = time.perf_counter()
        with GpuSampler() as sampler:
            result = run_generate(cfg)
        wall = time.perf_counter() - start
    rows = int(result.manifest["rows"])
    row = {"part": "seggen-graph", "preset": args.preset, "rows": rows, "wall_s": round(wall, 2),
           "samples_per_s": round(rows / wall, 4), "gpu_busy_fraction": sampler.busy_fraction(),
           "gpu_samples": len(sampler.samples), "steps_text2mask_mask2img": list(args.graph_steps),
           "resolution": args.graph_resolution,
           "stage_busy_s": result.manifest["timings"].get("stage_busy_s")}
    print(json.dumps(row), flush=True)
    return row


def ratios(rows: list[dict]) -> list[str]:
    """images/s of each setting relative to plain SDPA, per batch size (same run)."""
    by = {(r["setting"], r["batch"]): r["images_per_s"] for r in rows}
    out = []
    for (setting, b), ips in sorted(by.items()):
        base = by.get(("sdpa", b))
        if setting != "sdpa" and base:
            out.append(f"batch {b}: {setting} / sdpa images/s = {ips / base:.3f}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small sizes: checks the script runs")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8; smoke 1,2)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; smoke 2)")
    p.add_argument("--resolution", type=int, default=None, help="generation side (default 1024; smoke 32)")
    p.add_argument("--settings", default=None, help=f"comma-separated of {list(SETTINGS)} (default all; smoke: no compile)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per batch size (after one warm-up)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default by GPU name)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--graph-rows", type=int, default=None, help="toy source rows for the graph part (default 8; smoke 1)")
    p.add_argument("--graph-steps", default=None, help="text2mask,mask2img steps in the graph part (default 20,10; smoke 1,1)")
    p.add_argument("--graph-resolution", type=int, default=None, help="graph part generation side (default 768; smoke 32)")
    p.add_argument("--graph-batch", type=int, default=4, help="graph part pool batch size")
    p.add_argument("--skip-graph", action="store_true", help="only part 1")
    p.add_argument("--out", default=None, help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.preset = "tiny" if smoke else "sdxl-random"
    args.batches = [int(b) for b in (args.batches or ("1,2" if smoke else "1,4,8")).split(",")]
    args.steps = args.steps or (2 if smoke else 30)
    args.resolution = args.resolution or (32 if smoke else 1024)
    args.settings = (args.settings or ("sdpa,no-sdpa,sdpa+channels-last,sdpa+fused-qkv" if smoke
                                       else ",".join(SETTINGS))).split(",")
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; choose from {list(SETTINGS)}")
    args.device = args.device or ("cpu" if smoke else None)
    args.graph_rows = args.graph_rows or (1 if smoke else 8)
    args.graph_steps = tuple(int(s) for s in (args.graph_steps or ("1,1" if smoke else "20,10")).split(","))
    args.graph_resolution = args.graph_resolution or (32 if smoke else 768)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.smoke:
        import torch

        torch.set_num_threads(1)
    rows = bench_mask2img(args)
    for line in ratios(rows):
        print(line)
    if not args.skip_graph:
        rows.append(bench_graph(args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
