"""Training throughput with Ray Data's idle scheduling loop left spinning (``data.idle_sleep_s=0``)
against the loop sleeping while nothing runs (the default, training.ingest_idle). The toy
mixed recipe, same budget and seed, both runs in one process; prints steps/s, wall time and
their ratios.

    python benchmarks/bench_ingest_idle.py [--iterations 300] [--sleep 0.025]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300, help="training steps per run")
    ap.add_argument("--sleep", type=float, default=0.025, help="data.idle_sleep_s of the second run")
    args = ap.parse_args()

    from core.config import load_config
    from pipelines.config import GenerateConfig
    from pipelines.generate import run_generate
    from pipelines.toy_data import make_toy_dataset
    from training.config import TrainConfig
    from training.recipe import run_train

    with tempfile.TemporaryDirectory() as tmp:
        real = make_toy_dataset(Path(tmp) / "real", n_train=40, n_val=50, size=128, seed=0)
        syn = Path(tmp) / "syn"
        run_generate(load_config(GenerateConfig, ROOT / "pipelines" / "configs" / "seggen-toy.yaml", [
            f"source.path={real}", f"output.path={syn}", "imgsyn.samples_per_source=10",
            "masksyn.samples_per_caption=10", "ray.show_progress=false"]))
        results = {}
        for sleep_s in (0.0, args.sleep):
            final = run_train(load_config(TrainConfig, ROOT / "training" / "configs" / "toy.yaml", [
                f"real.path={real}", f"synthetic.paths=[{syn}]", "strategy=mix", "p_aug=0.6",
                f"iterations={args.iterations}", f"eval_interval={args.iterations}", f"data.idle_sleep_s={sleep_s}",
                f"output.path={Path(tmp) / f'run-{sleep_s:g}'}"]))
            results[sleep_s] = final
            print(f"idle_sleep_s={sleep_s:<6g} {final['steps_per_s']:6.2f} steps/s (median of logged)  "
                  f"wall {final['wall_s']:6.1f} s  data-wait {final['data_wait_fraction']:.1%}  mIoU {final['miou']:.3f}")
        spin, idle = results[0.0], results[args.sleep]
        print(f"ratio (sleeping / spinning): steps/s {idle['steps_per_s'] / spin['steps_per_s']:.2f}, "
              f"wall time {idle['wall_s'] / spin['wall_s']:.2f}")


if __name__ == "__main__":
    main()
