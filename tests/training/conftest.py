"""Fixtures for the training tests: one shared local Ray, tiny real and synthetic toy data,
and the overrides that make a training run take seconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from core import schema as S

ROOT = Path(__file__).resolve().parents[2]
TOY_CONFIG = ROOT / "training" / "configs" / "toy.yaml"


@pytest.fixture(scope="session")
def train_ray(ray_local):
    """The session's shared local Ray (tests/conftest.py), with the training tests' stall timeout."""
    from ray.data import DataContext

    DataContext.get_current().execution_no_progress_timeout_s = 240
    return ray_local


@pytest.fixture(scope="session")
def small_real(tmp_path_factory) -> Path:
    """A small toy VOC source: 48 train / 24 val images of 64x64."""
    from pipelines.toy_data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("real") / "toy", n_train=48, n_val=24, size=64, seed=1)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic(out: Path, n: int = 96, size: int = 64, gap: float = 0.3, shards: int = 3) -> Path:
    """A synthetic dataset directory in the contract's layout (toy renders with a domain gap)."""
    from actors.colormap import voc_palette
    from actors.toy_domain import CLASSES, render_image, sample_layout

    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng((7, i))
        mask = sample_layout(rng, [], size, size)
        if i % 5 == 0:
            mask[:4, :] = S.IGNORE_INDEX  # some ignore pixels ride along
        rows.append({S.SAMPLE_ID: f"syn_{i:04d}/masksyn/0", S.SOURCE_ID: f"syn_{i:04d}", S.METHOD: "masksyn",
                     S.CAPTION: "", S.PROMPT: "", S.IMAGE: _png(render_image(np.where(mask == 255, 0, mask).astype(np.uint8), rng, gap)),
                     S.MASK: _png(mask), S.HEIGHT: size, S.WIDTH: size, S.SEED: i, S.GENERATOR: "toy", S.DROP_REASON: ""})
    for k in range(shards):
        part = rows[k::shards]
        pq.write_table(pa.Table.from_pylist(part, schema=S.DATASET_SCHEMA), out / "shards" / f"part-test-{k:05d}.parquet")
    manifest = {"classes": list(CLASSES), "palette": voc_palette(len(CLASSES)).tolist(),
                "ignore_index": S.IGNORE_INDEX, "rows": n}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "out")


def _quick(real: Path, run: Path, *extra: str) -> list[str]:
    """Overrides of the toy config for a run of a few seconds on 64x64 images."""
    return [f"real.path={real}", "real.format=voc", f"output.path={run}", "iterations=12", "batch_size=4",
            "eval_interval=6", "log_interval=3", "eval_batch_size=12", "aug.crop_size=48", "eval.short_side=64",
            "data.transform_batch_size=8", "ray.no_progress_timeout_s=240", *extra]


@pytest.fixture(scope="session")
def quick():
    """``quick(real, run, *extra)``: toy-config overrides for a run of a few seconds."""
    return _quick


def _write_backbone(kind: str, path: Path) -> dict[str, torch.Tensor]:
    """A tiny ImageNet-classifier checkpoint of ``kind`` in the hub layout at ``path``; returns
    its encoder's tensors under the module's own names (what the backbone must hold)."""
    torch.manual_seed(1)
    if kind == "mit":
        from transformers import SegformerConfig, SegformerForImageClassification

        cfg = SegformerConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                              decoder_hidden_size=32, num_labels=10)
        net = SegformerForImageClassification(cfg)
        net.save_pretrained(str(path))
        return net.segformer.state_dict()
    elif kind == "resnet":
        from transformers import ResNetConfig, ResNetForImageClassification

        cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck",
                           num_labels=10)
        net = ResNetForImageClassification(cfg)
        net.save_pretrained(str(path))
        return net.resnet.state_dict()
    elif kind == "swin":
        from transformers import SwinConfig, SwinForImageClassification

        cfg = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, num_labels=10)
        net = SwinForImageClassification(cfg)
        net.save_pretrained(str(path))
        return net.swin.state_dict()
    else:  # timm-layout ResNet (torchvision names, fc included)
        from safetensors.torch import save_file

        from training.deeplab import resnet

        net = resnet("resnet-tiny", 8)
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"architecture": "resnet-tiny", "num_classes": 1000}))
        return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


@pytest.fixture(scope="session")
def write_backbone():
    """``write_backbone(kind, path)``: a tiny classifier checkpoint (mit | resnet | swin | timm)
    in the hub layout; returns its encoder's tensors under the module's own names."""
    return _write_backbone


def _write_variants(path, ids: list[str], k: int = 2, size: int = 64) -> list[str]:
    """k variants per id: image value 200 + j, mask all class 1; one extra dropped row."""
    rows = []
    for sid in ids:
        for j in range(k):
            rows.append({S.SAMPLE_ID: f"{sid}/factory/{j}", S.SOURCE_ID: sid, S.METHOD: "factory", S.CAPTION: "", S.PROMPT: "",
                         S.IMAGE: _png(np.full((size, size, 3), 200 + j, np.uint8)), S.MASK: _png(np.ones((size, size), np.uint8)),
                         S.HEIGHT: size, S.WIDTH: size, S.SEED: j, S.GENERATOR: "test", S.DROP_REASON: ""})
    rows.append({**rows[0], S.SAMPLE_ID: "dropped", S.DROP_REASON: "low_similarity"})
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.DATASET_SCHEMA), path / "part-0.parquet")
    return [str(path / "part-0.parquet")]


@pytest.fixture(scope="session")
def write_variants():
    """``write_variants(dir, source_ids, k=2)``: a shard with k synthetic variants per source id
    (image value 200 + j, mask all class 1) and one dropped row; returns the shard files."""
    return _write_variants
