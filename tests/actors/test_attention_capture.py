"""AttentionStore: capture cross-attention without changing the image (tiny SD1.5 and SDXL)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from actors import diffusion_models as dm
from actors.attention_capture import AttentionStore

PROMPTS = ["a cat", "a dog on grass"]
KW = {"height": 32, "width": 48, "num_inference_steps": 3, "output_type": "np"}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return dm.build_pipeline("text2img", "tiny", family=request.param, device="cpu")


def _png(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for img in dm.images_to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_capture_keeps_image_bytes_and_restores_processors(pipe):
    before = dict(pipe.unet.attn_processors)
    plain = pipe(prompt=PROMPTS, generator=dm.seeded_generators([1, 2]), guidance_scale=5.0, **KW).images
    # group 0 of row 0 = every token: the softmax over tokens sums to 1, so its mean is 1/77
    store = AttentionStore([[list(range(77))], [[1, 2], [3]]], factors=(2,), step_range=(1, 3))
    with store.attached(pipe.unet):
        captured = pipe(prompt=PROMPTS, generator=dm.seeded_generators([1, 2]), guidance_scale=5.0,
                        **KW).images
    assert np.array_equal(plain, captured)
    assert _png(plain) == _png(captured)
    maps = store.maps()
    # latent 16x24, factor 2 -> 8x12; row 0 has one group, padded with a zero map
    assert maps.shape == (2, 2, 8, 12) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[0, 0], 1.0 / 77, rtol=1e-5)
    assert np.all(maps[0, 1] == 0.0)
    assert np.all(maps[1] > 0.0) and np.all(maps[1] < 1.0)
    # steps 1 and 2 of 3, every cross-attention layer at factor 2 (down, mid, up blocks)
    n_cross = sum(1 for n in before if n.endswith("attn2.processor"))
    assert store.counts() == {2: 2 * n_cross}
    assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == {n: type(p) for n, p in before.items()}


def test_capture_reads_the_conditional_half(pipe):
    """At step 0 the CFG batch's conditional half sees the same input as a no-CFG run: the maps
    must agree; the unconditional (empty prompt) half would give other maps."""
    groups = [[[1], [2]], [[1], [3, 4]]]
    runs = []
    for scale in (5.0, 1.0):
        store = AttentionStore(groups, factors=(2,), step_range=(0, 1))
        with store.attached(pipe.unet):
            pipe(prompt=PROMPTS, generator=dm.seeded_generators([1, 2]), guidance_scale=scale, **KW)
        runs.append(store.maps())
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(runs[0][:, 0], runs[0][:, 1])  # different tokens, different maps


def test_nothing_captured_names_the_settings(pipe):
    store = AttentionStore([[[1]], [[1]]], factors=(8,))  # the tiny UNet has no level at 8
    with store.attached(pipe.unet):
        pipe(prompt=PROMPTS, generator=dm.seeded_generators([1, 2]), guidance_scale=5.0, **KW)
    with pytest.raises(RuntimeError, match="nothing captured"):
        store.maps()
    with pytest.raises(ValueError, match="outside"):
        AttentionStore([[[80]]])
