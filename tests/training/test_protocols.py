"""The papers' protocols as shipped configs: their resolved values against the numbers the
papers (and mmsegmentation's configs of the same models) quote; --print-config; the mmseg
training pipeline pieces (keep-ratio rescale, cat-max-ratio crop, photometric distortion);
parameter groups (backbone multiplier, no decay on norms and embeddings)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from core.config import load_config
from segfactory.configs import resolve_config
from training.config import TrainConfig

pytestmark = pytest.mark.timeout(300)

# config -> {dotted key: (value, where the number comes from)}
MMSEG_PIPELINE = {"aug.scale_min": (0.5, "mmseg ratio_range=(0.5, 2.0)"), "aug.scale_max": (2.0, "mmseg ratio_range"),
                  "aug.flip": (True, "mmseg RandomFlip"), "aug.photometric": (True, "mmseg PhotoMetricDistortion"),
                  "optim.poly_power": (0.9, "mmseg PolyLR power=0.9")}
EXPECTED = {
    "seggen-ade20k-mask2former-r50": {
        "model.arch": ("mask2former", "SegGen §4.1"), "model.backbone.id": ("microsoft/resnet-50", "SegGen Table 1 R50 (catalogue resnet-50)"),
        "optim.name": ("adamw", "SegGen A.3"), "optim.lr": (1e-4, "SegGen A.3 10^-4"), "optim.weight_decay": (0.05, "SegGen A.3 5x10^-2"),
        "total_batch_size": (16, "SegGen A.3 batch 16"), "iterations": (160000, "SegGen Table 1 160k"),
        "aug.crop_size": (512, "SegGen Table 1 crop 512"), "p_aug": (0.6, "SegGen §4.3 p_aug=60%"),
        "optim.backbone_lr_mult": (0.1, "mmseg lr_mult=0.1"), "optim.no_decay_norm_embed": (True, "mmseg decay_mult=0"),
        "optim.grad_clip": (0.01, "mmseg max_norm=0.01"), "aug.cat_max_ratio": (1.0, "mmseg Mask2Former RandomCrop"),
        "eval.short_side": (512, "mmseg test Resize (2048, 512)"), "eval.max_long_side": (2048, "mmseg test Resize"),
        "model.mask2former.num_queries": (100, "Mask2Former num_queries"), **MMSEG_PIPELINE},
    "seggen-ade20k-mask2former-swinl": {
        "model.arch": ("mask2former", "SegGen §4.1"),
        "model.backbone.local_path": ("models/swin-large-patch4-window12-384-in22k", "SegGen Table 1 Swin-L; mmseg in22k 384"),
        "optim.lr": (1e-4, "SegGen A.3"), "optim.weight_decay": (0.05, "SegGen A.3"), "total_batch_size": (16, "SegGen A.3"),
        "iterations": (160000, "SegGen Table 1"), "aug.crop_size": (640, "SegGen Table 1 crop 640"), "p_aug": (0.6, "SegGen §4.3"),
        "aug.base_size": (640, "mmseg 640 short edge"), "eval.short_side": (640, "mmseg test Resize (2560, 640)"),
        "eval.max_long_side": (2560, "mmseg test Resize"), "optim.backbone_lr_mult": (0.1, "mmseg"), **MMSEG_PIPELINE},
    "attn2mask-voc-deeplabv3plus-r50": {
        "model.arch": ("deeplabv3plus", "attn2mask supp. Table 1"), "model.backbone.resnet": ("resnet50", "attn2mask ResNet50"),
        "optim.name": ("sgd", "attn2mask SGD"), "optim.lr": (0.001, "attn2mask 0.001 (ResNet50)"),
        "optim.weight_decay": (1e-5, "attn2mask 0.00001"), "total_batch_size": (12, "attn2mask 6 per GPU x 2 GPUs"),
        "batch_size": (6, "12 over 2 workers"), "iterations": (25000, "attn2mask 25,000"), "aug.crop_size": (512, "mmseg 512x512"),
        "aug.cat_max_ratio": (0.75, "mmseg cat_max_ratio=0.75"), "eval.short_side": (512, "mmseg (2048, 512)"),
        "strategy": ("co_training", "attn2mask trains on pseudo-masks with BECO's co-training"),
        "co_training.mix_prob": (0.5, "BECO mix_prob"), "co_training.confidence": (0.95, "BECO highres_t"),
        "co_training.boundary_size": (1, "BECO bdry_size"), "co_training.warmup_fraction": (0.0125, "BECO 1 of 80 epochs"),
        "co_training.boundary_weight_label": ((0.2, 0.2), "BECO bdry_whb, bdry_whi"),
        "co_training.boundary_weight_cross": ((0.0, 0.0), "BECO bdry_wlb, bdry_wli"), **MMSEG_PIPELINE},
    "diffsynth-voc-deeplabv3-r50": {
        "model.arch": ("deeplabv3", "DS Table 6 DeepLabV3"), "model.backbone.resnet": ("resnet50", "DS ResNet50"),
        "strategy": ("mix", "DS Eq. 3"), "mix.mode": ("variant", "DS Eq. 3: its own augmented version"),
        "p_aug": (0.4, "DS alpha = 0.4"), "optim.lr": (0.01, "mmseg lr=0.01"), "optim.weight_decay": (5e-4, "mmseg 0.0005"),
        "total_batch_size": (16, "mmseg 4x4"), "iterations": (20000, "mmseg 20k"), "aug.cat_max_ratio": (0.75, "mmseg"),
        "eval.short_side": (512, "mmseg (2048, 512)"), **MMSEG_PIPELINE},
}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_protocol_config_resolves_to_the_quoted_numbers(name):
    path = resolve_config(name)
    cfg = load_config(TrainConfig, str(path), [])
    for key, (value, source) in EXPECTED[name].items():
        got = _get(cfg, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, f"{name} {key}: {got} != {value} ({source})"
    # every value line names its source, and the first line is the command that runs it
    text = path.read_text()
    assert text.splitlines()[0] == f"# segfactory train --config {name} " + text.splitlines()[0].split(f"--config {name} ", 1)[1]
    uncommented = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#") and "#" not in ln
                   and ln.rstrip().endswith(tuple("0123456789e")) and ":" in ln]
    assert not [ln for ln in uncommented if ln.split(":")[0].strip() in {k.split(".")[-1] for k in EXPECTED[name]}], uncommented
    # the test scale is the training scale
    assert (cfg.eval.short_side, cfg.eval.max_long_side) == (cfg.aug.base_size, cfg.aug.max_long_side)
    # batch as the total over workers: other worker counts keep the total
    four = load_config(TrainConfig, str(path), ["workers.num_workers=4"])
    assert four.batch_size * 4 == cfg.total_batch_size


@pytest.mark.subprocess
def test_print_config_prints_the_resolved_yaml_and_starts_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "segfactory", "train", "--config", "diffsynth-voc-deeplabv3-r50",
                          "--print-config", "workers.num_workers=2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["batch_size"] == 8 and printed["total_batch_size"] == 16 and printed["mix"]["mode"] == "variant"
    assert printed["eval"]["short_side"] == 512 and printed["eval"]["max_long_side"] == 2048
    assert "ray" not in out.stderr.lower() or "started" not in out.stderr.lower()
    # the printed YAML is a config the loader takes back unchanged
    (tmp_path / "c.yaml").write_text(out.stdout)
    again = load_config(TrainConfig, str(tmp_path / "c.yaml"), [])
    assert again.model_dump(mode="json") == printed


def test_total_batch_size_must_divide():
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="total_batch_size: 12 is not divisible by workers.num_workers x grad_accum = 5"):
        load_config(TrainConfig, str(resolve_config("attn2mask-voc-deeplabv3plus-r50")), ["workers.num_workers=5"])


def test_keep_ratio_rescale_follows_mmseg_scale():
    from training.transforms import rescale_factor

    aug = {"base_size": 512, "max_long_side": 2048}
    assert rescale_factor(375, 500, 1.0, aug) == pytest.approx(512 / 375)  # VOC: short side to 512
    assert rescale_factor(100, 1000, 1.0, aug) == pytest.approx(2.048)  # panorama: long side capped at 2048
    assert rescale_factor(375, 500, 0.5, aug) == pytest.approx(256 / 375)
    assert rescale_factor(375, 500, 1.5, {"base_size": None}) == 1.5  # no base: relative to the image


def test_cat_max_ratio_crop_retries_past_one_class_crops():
    from training.transforms import _crop_origin

    mask = np.zeros((100, 100), np.uint8)
    mask[90:, 90:] = 1  # one small object in a corner: most 20x20 crops are background only
    plain = [_crop_origin(mask, 20, np.random.default_rng(s), 1.0) for s in range(50)]
    capped = [_crop_origin(mask, 20, np.random.default_rng(s), 0.75) for s in range(50)]

    def mixed(origins):
        return sum(len(np.unique(mask[y:y + 20, x:x + 20])) > 1 for y, x in origins)

    assert mixed(capped) > 2 * mixed(plain)


def test_photometric_distortion_is_seeded_and_changes_colours():
    from training.transforms import photometric

    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    a = photometric(image, np.random.default_rng(3))
    assert np.array_equal(a, photometric(image, np.random.default_rng(3)))
    changed = [not np.array_equal(photometric(image, np.random.default_rng(s)), image) for s in range(20)]
    assert sum(changed) >= 15  # each of 4 distortions with p=0.5: none at all 1 time in 16


def test_param_groups_backbone_multiplier_and_no_decay_on_norms_and_embeddings():
    import torch

    from training.accel import param_groups
    from training.config import ModelConfig
    from training.models import build_model

    model = build_model(ModelConfig(arch="mask2former"), ["a", "b", "c"])
    groups = {g["name"]: g for g in param_groups(model, "mask2former", 1e-4, 0.1, 0.05, True)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["backbone"]["weight_decay"] == 0.05
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and groups["backbone_no_decay"]["lr"] == pytest.approx(1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for g in ("head_no_decay", "backbone_no_decay") for p in groups[g]["params"]]
    assert any("queries_embedder" in n for n in no_decay) and any("level_embed" in n for n in no_decay)
    assert any("relative_position_bias_table" in n for n in no_decay) and any("layernorm" in n.lower() for n in no_decay)
    decayed = [names[id(p)] for g in ("head", "backbone") for p in groups[g]["params"]]
    assert not any("norm" in n.split(".")[-2].lower() for n in decayed if n.count(".") >= 1)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert isinstance(groups["head"]["params"][0], torch.nn.Parameter)
