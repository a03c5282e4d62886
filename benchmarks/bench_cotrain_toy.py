"""BECO co-training (training.cotrain) against one plainly trained network on toy images with
attention-like pseudo-masks: an in-process torch loop (no Ray) over the same function
``strategy: co_training`` runs (beco_loss) and the loss plain training runs
(training.models.loss), the toy config's tiny SegFormer, AdamW with a linear decay, batch 8 of
48 px. Prints val mIoU (clean masks of other layouts) of the plain network, of network A (what
``co_training`` exports) and of A and B averaged (what BECO scores).

The pseudo-masks imitate attn2mask's (supplement, "pseudo-masks and reliability maps"): a mask
seen through an attention map ``--factor`` times coarser, upsampled bilinearly, labelled by
its argmax and unreliable (255) where the top class share is under ``--tau`` — the edges, where
the upsampling interpolates. ``--miss`` adds dCRF-like failures: an object labelled background
(half of them flagged unreliable instead).

    python benchmarks/bench_cotrain_toy.py [--iterations 1200] [--seeds 0,1] [--factor 8] [--tau 0.6] [--miss 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from actors.toy_domain import CLASSES, render_image, sample_layout
from core.config import load_config
from core.schema import IGNORE_INDEX
from training.config import CoTrainingConfig, TrainConfig
from training.cotrain import beco_loss
from training.models import build_model, loss, predict

SIZE = 48


def attention_like(mask: np.ndarray, factor: int, tau: float, miss: float = 0.0, rng=None) -> np.ndarray:
    """A pseudo-mask of ``mask`` as a coarse attention map gives it (module docstring)."""
    onehot = F.one_hot(torch.from_numpy(mask).long(), len(CLASSES)).permute(2, 0, 1).float()[None]
    share = F.interpolate(F.avg_pool2d(onehot, factor), size=mask.shape, mode="bilinear", align_corners=False)[0]
    top, label = share.max(0)
    pseudo = label.numpy().astype(np.uint8)
    pseudo[top.numpy() < tau] = IGNORE_INDEX
    for c in np.unique(mask)[1:]:
        if miss and rng.random() < miss:
            pseudo[(mask == c) & (pseudo != IGNORE_INDEX)] = IGNORE_INDEX if rng.random() < 0.5 else 0
    return pseudo


def data(seed: int, n: int, noisy: dict | None):
    xs, ys = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        mask = sample_layout(rng, [], SIZE, SIZE)
        xs.append(render_image(mask, rng, 0.0))
        ys.append(attention_like(mask, rng=np.random.default_rng((seed + 1, i)), **noisy) if noisy else mask)
    x = (torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25
    return x, torch.tensor(np.stack(ys)).long()


def miou(nets, xv, yv) -> float:
    for net in nets:
        net.eval()
    with torch.no_grad():
        p = (sum(predict(net, "segformer", xv, yv.shape[-2:]) for net in nets) / len(nets)).argmax(1)
    for net in nets:
        net.train()
    ious = [((p == c) & (yv == c)).sum().item() / u for c in range(len(CLASSES)) if (u := ((p == c) | (yv == c)).sum().item())]
    return float(np.mean(ious))


def run(train, val, seed: int, co: bool, its: int, lr: float, ko) -> list[float]:
    """val mIoU: [plain] or [network A, A and B averaged]."""
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
        value = beco_loss(nets, "segformer", x, y, step >= ko.warmup_fraction * its, gen, ko) if co else \
            loss(nets[0], "segformer", x, y, len(CLASSES))
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
    return [miou(nets[:1], *val)] + ([miou(nets, *val)] if co else [])


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--factor", type=int, default=8, help="attention map this many times coarser than the image")
    ap.add_argument("--tau", type=float, default=0.6, help="unreliable where the top class share is under this")
    ap.add_argument("--miss", type=float, default=0.0, help="share of objects the pseudo-mask misses")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--warmup-fraction", type=float, default=0.5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    train = data(7, 96, {"factor": a.factor, "tau": a.tau, "miss": a.miss})
    val = data(99, 96, None)
    ko = CoTrainingConfig(warmup_fraction=a.warmup_fraction)
    results = {}
    for s in (int(v) for v in a.seeds.split(",")):
        t = time.time()
        (plain,), (co, both) = run(train, val, s, False, a.iterations, a.lr, ko), run(train, val, s, True, a.iterations, a.lr, ko)
        results[s] = {"plain": plain, "co_training": co, "co_training_mean_of_both": both}
        print(f"seed {s}: plain {plain:.3f}  co_training {co:.3f}  (A+B {both:.3f}; {time.time() - t:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    main()
