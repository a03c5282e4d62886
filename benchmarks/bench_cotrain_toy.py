"""BECO co-training (training.cotrain) against one plainly trained network on the toy domain with
noisy pseudo-masks, at budgets a CPU test cannot afford: an in-process torch loop (no Ray) over
the same functions ``strategy: co_training`` runs (mix_batch, co_training_loss), the toy config's
tiny SegFormer, AdamW with a linear decay, batch 8 of 48 px. Pseudo-masks as
tests/training/test_cotrain.py writes them (255 band on outlines, ``--flip`` of objects relabelled
wrongly); val on clean masks of other layouts. Prints val mIoU of network A and of the plain one.

    python benchmarks/bench_cotrain_toy.py [--iterations 1200] [--seeds 0,1] [--flip 0.4] [--band 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from actors.toy_domain import CLASSES, render_image, sample_layout
from core.config import load_config
from training.config import CoTrainingConfig, TrainConfig
from training.cotrain import co_training_loss, mix_batch
from training.models import _logits, build_model

SIZE = 48


def data(seed: int, n: int, flip: float, band: int | None):
    from scipy import ndimage

    xs, ys = [], []
    for i in range(n):
        rng, noise = np.random.default_rng((seed, i)), np.random.default_rng((seed + 1, i))
        mask = sample_layout(rng, [], SIZE, SIZE)
        xs.append(render_image(mask, rng, 0.0))
        y = mask.copy()
        if band:
            for c in np.unique(mask)[1:]:
                if noise.random() < flip:
                    y[mask == c] = noise.choice([k for k in range(1, len(CLASSES)) if k != c])
            y[ndimage.morphological_gradient(mask, size=band) > 0] = 255
        ys.append(y)
    x = (torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25
    return x, torch.tensor(np.stack(ys)).long()


def up(net, x, size):
    return F.interpolate(_logits(net(pixel_values=x)), size=size, mode="bilinear", align_corners=False)


def miou(net, xv, yv) -> float:
    net.eval()
    with torch.no_grad():
        p = up(net, xv, yv.shape[-2:]).argmax(1)
    net.train()
    ious = [((p == c) & (yv == c)).sum().item() / u for c in range(len(CLASSES)) if (u := ((p == c) | (yv == c)).sum().item())]
    return float(np.mean(ious))


def co_loss(nets, x, y, step, its, ko, gen):
    rel = (y != 255).float()
    online = step >= ko.warmup_fraction * its
    src = (y, rel)
    if online:
        with torch.no_grad():
            for n in nets:
                n.eval()
            top, arg = (sum(up(n, x, y.shape[-2:]) for n in nets) / 2).softmax(1).max(1)
            for n in nets:
                n.train()
        src = (arg, (top > ko.confidence).float())
    x2, y2, r2, band = mix_batch(x, y, rel, src, gen, ko, online)
    return co_training_loss(up(nets[0], x2, y.shape[-2:]), up(nets[1], x2, y.shape[-2:]), y2, r2, band, ko)


def run(train, val, seed: int, co: bool, its: int, lr: float, ko) -> float:
    cfg = load_config(TrainConfig, "training/configs/toy.yaml", [])
    nets = []
    for k in range(2 if co else 1):
        torch.manual_seed(seed + k)
        nets.append(build_model(cfg.model, list(CLASSES)))
    opt = torch.optim.AdamW([p for n in nets for p in n.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / its)
    gen = torch.Generator().manual_seed(seed)
    for step in range(its):
        idx = torch.randint(0, len(train[0]), (8,), generator=gen)
        x, y = train[0][idx], train[1][idx]
        loss = co_loss(nets, x, y, step, its, ko, gen) if co else F.cross_entropy(up(nets[0], x, y.shape[-2:]), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return miou(nets[0], *val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--flip", type=float, default=0.4)
    ap.add_argument("--band", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--warmup-fraction", type=float, default=0.5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    train, val = data(7, 96, a.flip, a.band), data(99, 48, 0.0, None)
    ko = CoTrainingConfig(warmup_fraction=a.warmup_fraction)
    for s in (int(v) for v in a.seeds.split(",")):
        t = time.time()
        plain, co = run(train, val, s, False, a.iterations, a.lr, ko), run(train, val, s, True, a.iterations, a.lr, ko)
        print(f"seed {s}: plain {plain:.3f}  co_training {co:.3f}  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
