"""Pretrained backbones under fresh heads: tiny backbones written in the hub layout
(save_pretrained / safetensors) load through every architecture's path, by local_path and by
id + pinned revision from a hub cache written here, and train a few steps; weights that do not
fit the architecture are one ConfigError naming the key (exit 2 from the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from training.backbones import backbone_module
from training.config import ModelConfig
from training.models import build_model, check_weights, load_model, loss, predict, save_model

pytestmark = pytest.mark.timeout(300)

CLASSES = ["background", "circle", "square", "triangle"]
REVISION = "0123456789abcdef0123456789abcdef01234567"


# DeepLabv3 differs from v3+ only in the head (tested in test_deeplab_heads): one timm case here
CASES = [("segformer", "mit"), ("mask2former", "resnet"), ("mask2former", "swin"), ("deeplabv3plus", "timm")]


def _cfg(arch: str, **backbone) -> ModelConfig:
    return ModelConfig(arch=arch, preset="backbone", backbone={"resnet": "resnet-tiny", **backbone},
                       deeplab={"aspp_channels": 16}, mask2former=SMALL_M2F)


# the published head (256 wide, 10 decoder layers, 12544 points) takes minutes per step here
SMALL_M2F = {"num_queries": 8, "hidden_dim": 32, "encoder_layers": 1, "decoder_layers": 2, "train_num_points": 256}


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 8:40, 8:40] = 1
    y[1, 40:, 30:] = 2
    y[0, 44:, :20] = 3
    y[:, :2] = 255
    return x, y


@pytest.mark.slow  # ~50-60 s each on the loaded 2-core box
@pytest.mark.parametrize("arch, kind", CASES)
def test_backbone_loads_and_trains(arch, kind, tmp_path, write_backbone):
    expected = write_backbone(kind, tmp_path / "bb")
    cfg = _cfg(arch, local_path=str(tmp_path / "bb"))
    check_weights(cfg, CLASSES)
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES)
    own = backbone_module(model, arch).state_dict()
    # every backbone tensor came from the checkpoint but the fresh per-stage norms (Swin) and
    # the classifier's final norm (not in a backbone)
    # (SwinBackbone nests the SwinModel as `swin.`)
    theirs = {k: expected.get(k, expected.get(k.split(".", 1)[-1])) for k in own}
    fresh = {k for k, v in theirs.items() if v is None}
    assert all(k.startswith("hidden_states_norms.") for k in fresh), sorted(fresh)[:3]
    for k in own.keys() - fresh:
        torch.testing.assert_close(own[k], theirs[k], msg=k)
    assert len(own) - len(fresh) > 20
    x, y = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        value = loss(model, arch, x, y, len(CLASSES))
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        scores = predict(model, arch, x, (64, 64))
    assert scores.shape == (2, len(CLASSES), 64, 64)
    save_model(model, tmp_path / "ckpt")
    again = load_model(arch, tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(predict(again, arch, x, (64, 64)), scores)


def test_backbone_by_id_and_pinned_revision_from_the_hub_cache(tmp_path, monkeypatch, write_backbone):
    """The id + revision path: hf_hub_download finds the pinned snapshot in the hub cache."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--timm--resnet-tiny" / "snapshots" / REVISION
    write_backbone("timm", snap)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    cfg = _cfg("deeplabv3plus", id="timm/resnet-tiny", revision=REVISION)
    model = build_model(cfg, CLASSES)
    from safetensors.torch import load_file

    torch.testing.assert_close(model.backbone.conv1.weight, load_file(str(snap / "model.safetensors"))["conv1.weight"])
    with pytest.raises(ConfigError, match=r"model.backbone.id: cannot get model.safetensors of timm/resnet-tiny@f+"):
        build_model(_cfg("deeplabv3plus", id="timm/resnet-tiny", revision="f" * 40), CLASSES)


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_weights_that_do_not_fit_name_the_key(tmp_path, write_backbone):
    wrong_shape = tmp_path / "a"
    write_backbone("timm", wrong_shape)
    _rewrite(wrong_shape, lambda t: t.__setitem__("layer2.0.conv1.weight", torch.zeros(3, 3, 1, 1)))
    with pytest.raises(ConfigError, match=r"key 'layer2.0.conv1.weight' has shape \[3, 3, 1, 1\]"):
        check_weights(_cfg("deeplabv3plus", local_path=str(wrong_shape)), CLASSES)
    missing = tmp_path / "b"
    write_backbone("resnet", missing)
    _rewrite(missing, lambda t: t.pop("resnet.encoder.stages.2.layers.0.shortcut.convolution.weight"))
    with pytest.raises(ConfigError, match=r"key .encoder.stages.2.layers.0.shortcut.convolution.weight. is missing"):
        build_model(_cfg("mask2former", local_path=str(missing)), CLASSES)
    other = tmp_path / "c"
    write_backbone("mit", other)  # a MiT checkpoint is not a ResNet: nothing fits
    with pytest.raises(ConfigError, match=r"weights do not match the architecture: key 'bn1.bias' \[64\] is missing from the checkpoint"):
        check_weights(_cfg("deeplabv3", local_path=str(other)), CLASSES)


def test_cli_exits_2_naming_the_key_before_ray(tmp_path, toy_source, capsys, write_backbone):
    from segfactory.cli import main

    bad = tmp_path / "bad"
    write_backbone("timm", bad)
    _rewrite(bad, lambda t: t.__setitem__("bn1.weight", torch.ones(7)))
    code = main(["train", "--config", "toy", f"real.path={toy_source}", "strategy=real_only", "model.arch=deeplabv3plus",
                 "model.preset=backbone", "model.backbone.resnet=resnet-tiny", f"model.backbone.local_path={bad}",
                 f"output.path={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "'bn1.weight' has shape [7]" in err and len(err.strip().splitlines()) == 1


def test_deeplab_heads():
    """v3: logits at the output stride; v3+: at 1/4 (the decoder fuses layer1's features)."""
    from training.deeplab import build

    x = torch.randn(1, 3, 64, 64)
    for arch, os_, side in (("deeplabv3", 8, 8), ("deeplabv3", 16, 4), ("deeplabv3plus", 16, 16)):
        net = build(len(CLASSES), arch, "resnet-tiny", os_, 16).eval()
        with torch.no_grad():
            assert net(x).shape == (1, len(CLASSES), side, side), (arch, os_)
        assert hasattr(net, "decoder") == (arch == "deeplabv3plus")


def test_transformers_resnet_names_map_onto_torchvision_resnet():
    """microsoft/resnet-50's keys (transformers) land on torchvision's ResNet, shape for shape."""
    from torchvision.models.resnet import Bottleneck, ResNet
    from transformers import ResNetConfig, ResNetForImageClassification

    from training.backbones import torchvision_name

    with torch.device("meta"):
        hf = ResNetForImageClassification(ResNetConfig(depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=1000))
        tv = ResNet(Bottleneck, [1, 1, 1, 1])
    ours = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    theirs = {torchvision_name(k): tuple(v.shape) for k, v in hf.state_dict().items() if not k.startswith("classifier.")}
    assert theirs == ours
    assert torchvision_name("resnet.encoder.stages.3.layers.2.layer.1.normalization.running_var") == "layer4.2.bn2.running_var"
