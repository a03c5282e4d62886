"""strategy=co_training (training.cotrain, BECO): the boundary band, class mixing and the loss on
small tensors; a `segfactory train` run on noisy toy pseudo-masks that restarts with both
networks; and, over two seeds, the co-trained pair against one network trained on the same
noisy pseudo-masks (in-process, at a budget four Ray runs cannot afford on a CPU)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import schema as S
from core.config import ConfigError, load_config
from training.config import CoTrainingConfig, TrainConfig
from training.cotrain import boundary, co_training_loss, mix_batch, paste_region

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "training" / "configs" / "toy.yaml"
BENCH = ROOT / "benchmarks" / "bench_cotrain_toy.py"


def test_boundary_is_dilation_minus_erosion_and_the_image_border_does_not_erode():
    a = torch.zeros(1, 10, 10)
    a[0, 3:7, 3:7] = 1
    band = boundary(a, 1)[0]
    want = torch.zeros(10, 10)
    want[2:8, 2:8] = 1
    want[4:6, 4:6] = 0  # the eroded core
    assert torch.equal(band, want)
    assert boundary(torch.ones(1, 6, 6), 1).sum() == 0 and boundary(torch.zeros(1, 6, 6), 1).sum() == 0


def test_paste_region_takes_half_the_classes_rounded_up_never_background_or_ignore():
    label = torch.tensor([[0, 1, 2], [3, 255, 0]])
    for seed in range(10):
        a = paste_region(label, torch.Generator().manual_seed(seed), ignore_background=True)
        chosen = set(label[a > 0].tolist())
        assert len(chosen) == 2 and chosen <= {1, 2, 3}
    assert paste_region(torch.tensor([[0, 255]]), torch.Generator(), True).sum() == 0


def test_mix_batch_pastes_the_partner_and_weights_boundaries_only_with_online_labels():
    ko = CoTrainingConfig(mix_prob=1.0, boundary_size=1)
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[1, 2:5, 2:5] = 4
    reliable = torch.ones(2, 8, 8)
    mx, my, mm, band = mix_batch(x, y, reliable, (y, reliable), torch.Generator().manual_seed(0), ko, online=False)
    assert torch.equal(my[0], y[1]) and mx[0, :, 3, 3].tolist() == [1, 1, 1] and band.sum() == 0
    online = torch.full_like(y, 2)
    online[1, 2:5, 2:5] = 4
    confident = torch.ones(2, 8, 8)
    confident[0, 0, 0] = 0
    mx, my, mm, band = mix_batch(x, y, reliable, (online, confident), torch.Generator().manual_seed(0), ko, online=True)
    assert my[0, 3, 3] == 4 and my[0, 0, 1] == 2 and mm[0, 0, 0] == 0  # online labels and their confidence
    assert band[0].sum() == 25 - 1 and band[0, 3, 3] == 0  # 5x5 dilation minus the 1x1 erosion


def test_loss_is_label_ce_where_reliable_and_the_other_networks_argmax_elsewhere():
    import torch.nn.functional as F

    ko = CoTrainingConfig(boundary_weight_label=(0.0, 0.0))
    a, b = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 4, 4))
    reliable = torch.zeros(1, 4, 4)
    reliable[:, :2] = 1
    got = co_training_loss(a, b, y, reliable, torch.zeros(1, 4, 4), ko)
    ce = lambda z, t: F.cross_entropy(z, t, reduction="none")  # noqa: E731
    want = sum(((ce(p, y) * reliable).mean() + (ce(p, q.argmax(1)) * (1 - reliable)).mean()) for p, q in ((a, b), (b, a)))
    assert got.item() == pytest.approx(want.item())


def test_co_training_needs_a_per_pixel_model():
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(TrainConfig, TOY, ["strategy=co_training", "model.arch=mask2former"])


def test_resuming_co_training_from_a_checkpoint_without_network_b_names_it(tmp_path):
    """A run trained with one network cannot be resumed as co_training: one line naming the
    checkpoint, before Ray starts."""
    from training.recipe import run_train
    from training.rundir import CHECKPOINT_PREFIX, STATE_FILE

    run = tmp_path / "run"
    ckpt = run / f"{CHECKPOINT_PREFIX}0000010"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / STATE_FILE).write_bytes(b"")
    cfg = load_config(TrainConfig, TOY, ["strategy=co_training", f"real.path={tmp_path}", f"synthetic.paths=[{tmp_path}]", f"output.path={run}",
                                        "resume=true"])
    with pytest.raises(ConfigError, match=f"{ckpt}.*model_b"):
        run_train(cfg)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _bench():
    """benchmarks/bench_cotrain_toy.py as a module (its attention-like pseudo-masks, its loop)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cotrain_toy", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def noisy_pseudo_masks(out: Path, n: int = 96, size: int = 64) -> Path:
    """Toy renders (gap 0, the real val split's domain) with attn2mask-like pseudo-masks: the
    mask seen through an 8x coarser attention map, 255 where the upsampled map is ambiguous."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.colormap import voc_palette
    from actors.toy_domain import CLASSES, render_image, sample_layout

    attention_like = _bench().attention_like
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng((7, i))
        mask = sample_layout(rng, [], size, size)
        image, pseudo = render_image(mask, rng, 0.0), attention_like(mask, factor=8, tau=0.6)
        rows.append({S.SAMPLE_ID: f"syn_{i:04d}/masksyn/0", S.SOURCE_ID: f"syn_{i:04d}", S.METHOD: "masksyn", S.CAPTION: "",
                     S.PROMPT: "", S.IMAGE: _png(image), S.MASK: _png(pseudo), S.HEIGHT: size, S.WIDTH: size, S.SEED: i,
                     S.GENERATOR: "toy", S.DROP_REASON: ""})
    pq.write_table(pa.Table.from_pylist(rows, schema=S.DATASET_SCHEMA), out / "shards" / "part-test-00000.parquet")
    (out / "manifest.json").write_text(json.dumps({"classes": list(CLASSES), "palette": voc_palette(len(CLASSES)).tolist(),
                                                   "ignore_index": S.IGNORE_INDEX, "rows": n}))
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    return noisy_pseudo_masks(tmp_path_factory.mktemp("noisy") / "out")


def _trial(real: Path, syn: Path, run: Path, strategy: str, seed: int, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, TOY, [
        f"real.path={real}", "real.format=voc", f"synthetic.paths=[{syn}]", f"strategy={strategy}", f"seed={seed}",
        f"output.path={run}", "iterations=100", "batch_size=8", "eval_interval=50", "log_interval=25", "eval_batch_size=24",
        "aug.crop_size=48", "eval.short_side=64", "data.transform_batch_size=8", "optim.lr=0.01",
        "co_training.warmup_fraction=0.5", "ray.no_progress_timeout_s=240", *extra])


@pytest.mark.slow
@pytest.mark.timeout(420, method="thread")
def test_co_training_checkpoints_both_networks_and_restarts(train_ray, small_real, noisy, tmp_path):
    """A co_training run that fails once at step 60 (after the online labels start at 50):
    restored from the step-50 checkpoint with both networks, finished; model/ (network A) is
    what final.json scores and ``evaluate`` reads."""
    from safetensors.torch import load_file

    from training.evaluate import run_evaluate
    from training.recipe import run_train

    run = tmp_path / "run"
    final = run_train(_trial(small_real, noisy, run, "co_training", 0, "debug.fail_at_steps=[60]", "max_failures=1"))
    assert final["final_step"] == 100 and final["restarts"] == 1 and final["strategy"] == "co_training"
    last = run / "checkpoint_0000100"
    a, b = load_file(str(last / "model" / "model.safetensors")), load_file(str(last / "model_b" / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # two networks, trained apart
    again = run_evaluate(run, small_real, "voc", "val", num_workers=1, out=tmp_path / "eval.json")
    assert again["miou"] == pytest.approx(final["miou"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(900)
def test_co_training_beats_plain_training_on_attention_like_pseudo_masks():
    """Two seeds, the same attention-like pseudo-masks (the mask through an 8x coarser map,
    unreliable where ambiguous), 1200 steps: network A of the co-trained pair against one
    network trained on the pseudo-masks — benchmarks/bench_cotrain_toy.py, the functions
    co_training and plain training run, in-process (four Ray runs of 1200 steps do not fit a CPU
    test), one process per seed. Measured here (torch 2.14.1, transformers 5.25.0): plain 0.477 /
    0.440, co-trained 0.493 / 0.507; an earlier set of package versions gave 0.459 / 0.451 and
    0.514 / 0.516 (the same seeds, other initial weights): a fixed margin per seed is not what the
    method promises on a toy, a win on each seed and on average is."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(BENCH), "--iterations", "1200", "--seeds", str(seed)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    margins, outs = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=850)
        assert proc.returncode == 0, err[-2000:]
        plain, co = (float(out.split(f" {key} ")[1].split()[0]) for key in ("plain", "co_training"))
        margins.append(co - plain)
        outs.append(out)
    assert min(margins) > 0 and sum(margins) / len(margins) >= 0.03, outs  # wins on each seed, by 0.03 on average
