"""Fine-tuning throughput and peak memory per recipe: steps/s of the training step (latents
cached, so only the UNet / ControlNet runs) and the peak memory it takes.

CPU (default): the tiny recipes on the toy dataset, in one process (``training.finetune.local``,
the same step as the Ray Train loop). GPU: ``--preset sdxl-random --resolution 768`` runs the
full-size SDXL UNet / ControlNet / LoRA step on random latents and embeddings of SDXL's shapes
(no download), bf16 autocast, with and without gradient checkpointing; peak memory is
``torch.cuda.max_memory_allocated``. Prints one line per recipe and the ratios between them.

    python benchmarks/bench_finetune.py                      # tiny, CPU
    python benchmarks/bench_finetune.py --preset sdxl-random --resolution 768 --steps 10   # GPU
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_finetune")
KINDS = ("text2mask", "mask2img", "lora")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_tiny(steps: int, threads: int) -> list[dict]:
    import torch

    from core.config import load_config
    from pipelines.toy_data import make_toy_dataset
    from training.finetune.config import FinetuneConfig
    from training.finetune.data import build_kwargs
    from training.finetune.local import encode, pairs_from_source, train_steps
    from training.finetune.models import build_components
    from training.finetune.recipes import RECIPES, make_recipe

    torch.set_num_threads(threads)
    root = Path(__file__).resolve().parents[1]
    src = make_toy_dataset(Path(tempfile.mkdtemp()) / "toy", n_train=24, n_val=4, size=64, seed=0)
    out = []
    for kind in KINDS:
        cfg = load_config(FinetuneConfig, root / "training" / "configs" / f"{kind}-tiny.yaml", [f"source.path={src}"])
        rows, _, _ = pairs_from_source(cfg, "train", 24)
        rows = encode(cfg, rows, RECIPES[kind].target_key)
        recipe = make_recipe(kind, build_components(**build_kwargs(cfg)), cfg.resolved_family, cfg.data.resolution,
                             lora=cfg.lora)
        before = _peak_rss_mb()
        stats = train_steps(cfg, recipe, rows, steps)
        trainable = sum(p.numel() for p in recipe.parameters(recipe.module))
        out.append({"recipe": f"{kind}-tiny", "steps_per_s": stats["steps_per_s"], "peak_rss_mb": _peak_rss_mb(),
                    "rss_growth_mb": _peak_rss_mb() - before, "trainable_params": trainable,
                    "batch": cfg.batch_size, "resolution": cfg.data.resolution})
    return out


def bench_sdxl_random(steps: int, resolution: int, batch: int, checkpointing: bool) -> list[dict]:
    """Full-size SDXL recipes on random weights and random cached inputs (GPU). The ControlNet and
    LoRA recipes run twice: frozen weights in bf16 (``workers.frozen_bf16``, the default) and in
    float32 (the code before it), so their ratio comes from one run."""
    import torch

    from training.finetune.config import LoraConfig
    from training.finetune.denoising import store_frozen_in
    from training.finetune.models import build_components, noise_scheduler
    from training.finetune.recipes import make_recipe
    from training.finetune.worker import denoising_loss

    if not torch.cuda.is_available():
        raise SystemExit("--preset sdxl-random needs a CUDA GPU (none here)")
    dev = "cuda"
    out = []
    runs = [(k, frozen) for k in KINDS for frozen in (("bf16", "fp32") if k != "text2mask" else ("bf16",))]
    for kind, frozen in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        comps = build_components("sdxl-random", "sdxl", device=dev)
        for name in ("vae", "text_encoder", "text_encoder_2"):  # latents are cached: not needed on the GPU
            comps[name].to("cpu")
        recipe = make_recipe(kind, comps, "sdxl", resolution, lora=LoraConfig())
        if frozen == "bf16":
            store_frozen_in(comps, torch.bfloat16)
        if checkpointing:
            recipe.module.enable_gradient_checkpointing()
            if kind == "mask2img":
                comps["unet"].enable_gradient_checkpointing()
        params = recipe.parameters(recipe.module)
        opt = torch.optim.AdamW(params, lr=1e-5)
        sched = noise_scheduler(comps)
        lat = resolution // 8
        batch_t = {"latents": torch.randn(batch, 4, lat, lat, device=dev),
                   "prompt_embeds": torch.randn(batch, 77, 2048, device=dev),
                   "pooled": torch.randn(batch, 1280, device=dev),
                   "cond": torch.randint(0, 255, (batch, resolution, resolution, 3), dtype=torch.uint8, device=dev),
                   "orig_hw": torch.full((batch, 2), float(resolution)), "crop_tl": torch.zeros(batch, 2)}
        times = []
        for i in range(steps + 2):  # 2 warm-up steps
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = denoising_loss(recipe, recipe.module, batch_t, sched)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out.append({"recipe": f"{kind}-sdxl-random", "frozen_weights": frozen, "steps_per_s": len(times) / sum(times),
                    "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
                    "trainable_params": sum(p.numel() for p in params), "batch": batch, "resolution": resolution,
                    "gradient_checkpointing": checkpointing, "loss": float(loss)})
        del recipe, comps, opt, params
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sdxl-random"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=768, help="sdxl-random only")
    ap.add_argument("--batch", type=int, default=1, help="sdxl-random only")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny)")
    ap.add_argument("--no-checkpointing", action="store_true", help="sdxl-random: without gradient checkpointing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.preset == "tiny":
        rows = bench_tiny(args.steps, args.threads)
    else:
        rows = bench_sdxl_random(args.steps, args.resolution, args.batch, not args.no_checkpointing)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['recipe']} / {base['recipe']}: steps/s x{r['steps_per_s'] / base['steps_per_s']:.2f}, "
              f"trainable params x{r['trainable_params'] / base['trainable_params']:.3f}")


if __name__ == "__main__":
    main()
