"""SegFormer and Mask2Former through transformers: tiny configs, loss, predict, save/load,
and the pretrained path (from_pretrained with revision and safetensors)."""

from __future__ import annotations

import pytest
import torch

from training.config import ModelConfig
from training.models import build_model, load_model, loss, predict, save_model

pytestmark = pytest.mark.timeout(120)

CLASSES = ["background", "circle", "square"]


@pytest.mark.parametrize("arch", ["segformer", "mask2former"])
def test_tiny_model_trains_and_predicts(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), CLASSES)
    assert model.config.num_labels == 3 and sum(p.numel() for p in model.parameters()) < 2_000_000
    x = torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 10:30, 10:30] = 1
    y[1, 40:, 40:] = 2
    y[:, :4] = 255
    value = loss(model, arch, x, y, len(CLASSES))
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        scores = predict(model, arch, x, (64, 64))
    assert scores.shape == (2, 3, 64, 64)
    save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = load_model(arch, tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(predict(again, arch, x, (64, 64)), scores)


@pytest.mark.parametrize("arch, model_id", [("segformer", "nvidia/mit-b0"),
                                            ("mask2former", "facebook/mask2former-swin-tiny-ade-semantic")])
def test_pretrained_preset_loads_by_id_and_revision(arch, model_id, monkeypatch):
    from training import models

    calls = []

    class Fake:
        @classmethod
        def from_pretrained(cls, source, **kw):
            calls.append((source, kw))
            return "model"

    monkeypatch.setattr(models, "_classes", lambda a: Fake)
    cfg = ModelConfig(arch=arch, preset="pretrained", id=model_id, revision="abc123")
    assert build_model(cfg, CLASSES) == "model"
    source, kw = calls[0]
    assert source == model_id and kw["revision"] == "abc123" and kw["use_safetensors"] is True
    assert kw["num_labels"] == 3 and kw["id2label"] == {0: "background", 1: "circle", 2: "square"}
    assert "trust_remote_code" not in kw
    build_model(cfg.model_copy(update={"local_path": "/weights"}), CLASSES)
    assert calls[1][0] == "/weights" and "revision" not in calls[1][1]
