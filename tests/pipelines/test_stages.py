"""CPU stages and the gate, called directly (no Ray): values, not just 'it ran'."""

from __future__ import annotations

import numpy as np
import pytest

from core import schema as S
from pipelines.config import GenerateConfig
from pipelines.graphs import RunContext, stage_plan
from pipelines.stages import Gated, colorize, decode_png, finalize, set_rows


def batch_of(n: int, **cols) -> dict[str, np.ndarray]:
    base = {S.SAMPLE_ID: [f"s{i}" for i in range(n)], S.DROP_REASON: [""] * n, S.METHOD: ["masksyn"] * n}
    base.update(cols)
    return {k: (v if isinstance(v, np.ndarray) else np.array(v, dtype=object)) for k, v in base.items()}


class Doubler:
    """An actor that fails on rows whose value is 13."""

    def __init__(self, factor: int):
        self.factor = factor
        self.calls = []

    def __call__(self, batch):
        self.calls.append(list(batch[S.SAMPLE_ID]))
        if 13 in batch["x"]:
            raise ValueError("unlucky")
        return {S.SAMPLE_ID: batch[S.SAMPLE_ID], "y": batch["x"] * self.factor}


def test_gate_runs_only_needed_rows_in_one_call():
    gate = Gated(Doubler, {"factor": 3}, stage="double", needs="done")
    batch = batch_of(4, x=np.array([1, 2, 3, 4]), done=np.array([b"", b"x", b"", b""], dtype=object))
    batch[S.DROP_REASON][3] = "earlier"
    out = gate(batch)
    assert gate.actor.calls == [["s0", "s2"]]  # one model call for the batch's rows that need it
    assert out["y"].tolist() == [3, 0, 9, 0]
    assert list(out[S.DROP_REASON]) == ["", "", "", "earlier"]


def test_gate_isolates_a_poisoned_row():
    gate = Gated(Doubler, {"factor": 2}, stage="double")
    out = gate(batch_of(3, x=np.array([1, 13, 5])))
    assert out["y"].tolist() == [2, 0, 10]
    assert out[S.DROP_REASON][1] == "double_error: ValueError: unlucky"
    assert out[S.DROP_REASON][0] == out[S.DROP_REASON][2] == ""


class Oom:
    """An actor that runs out of memory on batches larger than ``fits`` rows."""

    def __init__(self, fits: int, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
        self.fits, self.message, self.calls = fits, message, []

    def __call__(self, batch):
        self.calls.append(len(batch[S.SAMPLE_ID]))
        if len(batch[S.SAMPLE_ID]) > self.fits:
            raise RuntimeError(self.message)
        return {S.SAMPLE_ID: batch[S.SAMPLE_ID], "y": batch["x"] + 1}


def test_out_of_memory_is_retried_at_half_the_batch_not_rejected():
    gate = Gated(Oom, {"fits": 2}, stage="m")
    out = gate(batch_of(4, x=np.array([1, 2, 3, 4])))
    assert gate.actor.calls == [4, 2, 2]
    assert out["y"].tolist() == [2, 3, 4, 5] and list(out[S.DROP_REASON]) == [""] * 4


@pytest.mark.parametrize("fits,message", [
    (1, "CUDA out of memory. Tried to allocate 2.00 GiB"),  # still out of memory at half the batch
    (0, "CUDA error: device-side assert triggered"),
    (0, "NCCL error in: ProcessGroupNCCL.cpp:1, unhandled system error"),
])
def test_a_broken_device_exits_the_actor_process_instead_of_rejecting_rows(monkeypatch, fits, message):
    import pipelines.stages as stages

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(stages.os, "_exit", fake_exit)
    gate = Gated(Oom, {"fits": fits, "message": message}, stage="m")
    with pytest.raises(SystemExit):
        gate(batch_of(4, x=np.array([1, 2, 3, 4])))
    assert exits == [1] and gate.actor.calls == ([4, 2] if fits else [4])  # no row-by-row rejects


def test_errors_are_classified_by_what_they_say():
    from pipelines.stages import device_broken, is_oom

    assert device_broken(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not device_broken(ValueError("caption too long")) and not device_broken(KeyError("mask"))
    assert is_oom(RuntimeError("CUDA out of memory.")) and not device_broken(RuntimeError("CUDA out of memory."))


def test_set_rows_never_truncates_strings():
    batch = {"c": np.array(["ab", "cd"])}  # fixed-width <U2
    set_rows(batch, np.array([1]), {"c": np.array(["a much longer value"])})
    assert batch["c"].tolist() == ["ab", "a much longer value"]


def test_colorize_maps_palette_and_drops_empty_masksyn_masks():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    empty = np.zeros((2, 2), np.uint8)
    some = np.array([[0, 1], [2, 255]], np.uint8)
    batch = batch_of(2, **{S.MASK_RAW: [empty.tobytes(), some.tobytes()], S.HEIGHT: np.array([2, 2]),
                           S.WIDTH: np.array([2, 2])})
    out = colorize(batch, palette, "|u1", background=0, min_foreground_fraction=0.0)
    assert out[S.DROP_REASON].tolist() == ["masksyn_no_object", ""]
    color = np.frombuffer(out[S.COLOR_RAW][1], np.uint8).reshape(2, 2, 3)
    assert color[0, 1].tolist() == [255, 0, 0] and color[1, 0].tolist() == [0, 255, 0]


def test_finalize_rejects_bad_images_and_encodes_good_ones():
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    flat = np.full((4, 4, 3), 7, np.uint8)
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4) % 3
    n = 4
    batch = batch_of(n, **{
        S.IMAGE_RAW: [good.tobytes(), flat.tobytes(), b"", good.tobytes()[:10]],
        S.MASK_RAW: [mask.tobytes()] * n, S.HEIGHT: np.full(n, 4), S.WIDTH: np.full(n, 4),
        "shard": np.zeros(n, int), "siblings": np.full(n, n), S.SOURCE_PATH: ["p"] * n})
    out = finalize(batch, "png", 95, "|u1", min_image_std=1.0)
    assert out[S.DROP_REASON].tolist() == ["", "image_constant", "image_nonfinite", "image_wrong_size"]
    assert np.array_equal(decode_png(out[S.IMAGE][0]), good)
    assert np.array_equal(decode_png(out[S.MASK][0]), mask)
    assert out[S.IMAGE][1] == b""


@pytest.mark.parametrize("preset", ["toy", "tiny"])
def test_stage_plan_arguments(preset):
    """The graph's map_batches arguments, asserted without a GPU."""
    import ray

    cfg = GenerateConfig(preset=preset, mask2img={"resources": {"num_gpus": 0.5, "batch_size": 8, "min_actors": 2,
                                                                "max_actors": 6, "accelerator_type": "H100"}})
    ctx = RunContext(classes=["background", "a"], palette=np.zeros((2, 3), np.uint8), background=0)
    plan = {s.name: s for s in stage_plan(cfg, ctx, "voc")}
    assert list(plan) == ["expand", "text2mask", "colorize", "mask2img", "finalize"]
    m2i = plan["mask2img"].kwargs
    assert isinstance(m2i["compute"], ray.data.ActorPoolStrategy)
    assert (m2i["compute"].min_size, m2i["compute"].max_size) == (2, 6)
    assert (m2i["num_gpus"], m2i["batch_size"], m2i["accelerator_type"]) == (0.5, 8, "H100")
    assert plan["text2mask"].kwargs["num_gpus"] == 1  # default: one GPU per Text2Mask actor
    for cpu_stage in ("expand", "colorize", "finalize"):
        assert "compute" not in plan[cpu_stage].kwargs and "num_gpus" not in plan[cpu_stage].kwargs
    assert "concurrency" not in m2i
    actor_cls = m2i["fn_constructor_kwargs"]["actor_cls"].__name__
    assert actor_cls == ("ToyMask2Img" if preset == "toy" else "Mask2Img")


def test_imgsyn_only_graph_has_no_text2mask_pool():
    ctx = RunContext(classes=["background", "a"], palette=np.zeros((2, 3), np.uint8), background=0)
    names = [s.name for s in stage_plan(GenerateConfig(pipeline="imgsyn"), ctx, "voc")]
    assert names == ["expand", "colorize", "mask2img", "finalize"]


class FlakyVae:
    """Returns an empty (non-finite) image for seeds listed in ``bad``."""

    def __init__(self, bad: set[int]):
        self.bad = bad
        self.seen = []

    def __call__(self, batch):
        self.seen.append(batch[S.SEED].tolist())
        images = [b"" if int(s) in self.bad else bytes(range(12)) for s in batch[S.SEED]]
        return {S.IMAGE_RAW: np.array(images, dtype=object)}


def test_bad_images_are_regenerated_once_with_a_derived_seed():
    from functools import partial

    from pipelines.stages import image_needs_redo

    derived_1 = S.derive_seed(1, "regenerate")
    gate = Gated(FlakyVae, {"bad": {1, 2, S.derive_seed(2, "regenerate")}}, stage="mask2img",
                 redo_if=partial(image_needs_redo, min_image_std=1.0))
    out = gate(batch_of(3, **{S.SEED: np.array([0, 1, 2])}))
    assert gate.actor.seen == [[0, 1, 2], [derived_1, S.derive_seed(2, "regenerate")]]
    assert out[S.SEED].tolist() == [0, derived_1, S.derive_seed(2, "regenerate")]  # the seed actually used
    assert [len(b) for b in out[S.IMAGE_RAW]] == [12, 12, 0]  # row 2 stays bad: finalize drops it
