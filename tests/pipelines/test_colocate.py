"""colocate: true runs Text2Mask, colour coding and Mask2Img in one actor per GPU: the plan has
one pool with the last pool's placement, GPU accounting counts it once, and the dataset is the
one the separate pools make."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import load_config
from pipelines import stages
from pipelines.config import GenerateConfig
from pipelines.generate import run_generate
from pipelines.graphs import RunContext, stage_plan
from pipelines.resources import pool_needs
from tests.pipelines.test_generate_toy import CONFIG, read_rows, toy_cfg

CTX = RunContext(classes=["background", "a"], palette=np.array([[0, 0, 0], [255, 0, 0]], np.uint8), background=0)


def _cfg(*extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, CONFIG, ["source.path=/x", "output.path=/y", "mask2img.resources.num_gpus=1",
                                                "text2mask.resources.num_gpus=0.5", *extra])


def test_the_diffusion_span_becomes_one_pool_placed_like_mask2img():
    apart = {s.name: s for s in stage_plan(_cfg(), CTX, "voc")}
    plan = stage_plan(_cfg("colocate=true"), CTX, "voc")
    assert [s.name for s in plan] == ["expand", "text2mask+colorize+mask2img", "finalize"]
    merged = plan[1]
    assert merged.fn is stages.Colocated
    assert merged.kwargs["num_gpus"] == 1 and merged.kwargs["compute"].max_size == apart["mask2img"].kwargs["compute"].max_size
    assert merged.kwargs["batch_size"] == apart["text2mask"].kwargs["batch_size"]
    members = merged.kwargs["fn_constructor_kwargs"]["members"]
    assert [(m[0], m[1], m[4]) for m in members] == [
        (name, apart[name].fn, apart[name].kwargs.get("batch_size")) for name in ("text2mask", "colorize", "mask2img")]
    # ImgSyn alone has no Text2Mask pool: nothing to merge
    assert [s.name for s in stage_plan(_cfg("colocate=true", "pipeline=imgsyn"), CTX, "voc")] == [
        "expand", "colorize", "mask2img", "finalize"]


def test_gpus_are_counted_once_and_the_hash_is_unchanged():
    assert {n.stage: n.num_gpus for n in pool_needs(_cfg())} == {"text2mask": 0.5, "mask2img": 1}
    assert {n.stage: n.num_gpus for n in pool_needs(_cfg("colocate=true"))} == {"mask2img": 1}
    assert _cfg("colocate=true").config_hash() == _cfg().config_hash()


@pytest.mark.parametrize("batch", [1, 3])
def test_members_see_their_own_batch_sizes(batch):
    calls = []

    def tag(b, *, size):
        calls.append((size, len(b["sample_id"])))
        return {**b, "n": b["n"] + 1}

    pool = stages.Colocated([("a", tag, {}, {"size": batch}, batch), ("b", tag, {}, {"size": None}, None)])
    out = pool({"sample_id": np.array(list("abcde"), dtype=object), "n": np.zeros(5, dtype=np.int64)})
    assert out["n"].tolist() == [2] * 5 and list(out["sample_id"]) == list("abcde")
    assert [c for c in calls if c[0] == batch] == [(batch, min(batch, 5 - i)) for i in range(0, 5, batch)]
    assert [c for c in calls if c[0] is None] == [(None, 5)]


def test_a_colocated_toy_run_writes_the_same_dataset(ray_local, toy_source, tmp_path):
    apart = read_rows(_run(toy_source, tmp_path / "apart"))
    together = read_rows(_run(toy_source, tmp_path / "together", "colocate=true"))
    key = ["sample_id", "image", "mask", "seed"]
    assert together[key].sort_values("sample_id").reset_index(drop=True).equals(
        apart[key].sort_values("sample_id").reset_index(drop=True))


def _run(source, out, *extra):
    run_generate(toy_cfg(source, out, "source.limit=4", *extra))
    return out
