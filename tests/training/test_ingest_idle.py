"""A training stream's Ray Data loop sleeps while nothing runs instead of spinning a CPU.

The effect on training speed is measured in benchmarks/bench_ingest_idle.py; here: the
callback's rule, and that every stream the trainer gets carries it (or not, when off)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

from core.config import load_config
from tests.training.conftest import TOY_CONFIG
from training.config import TrainConfig
from training.data import build_datasets, index_inputs, rank_stream
from training.ingest_idle import SleepWhenIdle


class FakeOp:
    def __init__(self, active: int):
        self.active = active

    def num_active_tasks(self) -> int:
        return self.active


def sleeps(callback: SleepWhenIdle, executor, monkeypatch) -> list[float]:
    """The sleeps one executor step asks for (time.sleep recorded, not timed: no wall-clock asserts)."""
    asked: list[float] = []
    monkeypatch.setattr("training.ingest_idle.time.sleep", asked.append)
    callback.on_execution_step(executor)
    return asked


def test_sleeps_only_when_no_task_runs(monkeypatch):
    cb = SleepWhenIdle(0.05)
    assert sleeps(cb, SimpleNamespace(_topology={FakeOp(0): None, FakeOp(0): None}), monkeypatch) == [0.05]
    assert sleeps(cb, SimpleNamespace(_topology={FakeOp(0): None, FakeOp(2): None}), monkeypatch) == []
    assert sleeps(cb, SimpleNamespace(), monkeypatch) == []  # an executor without the internals we read


@pytest.mark.parametrize("sleep_s", [0.025, 0.0])
def test_every_training_stream_carries_the_callback_unless_off(train_ray, small_real, small_synthetic, quick,
                                                               tmp_path, sleep_s):
    cfg = load_config(TrainConfig, TOY_CONFIG, quick(small_real, tmp_path / "run", f"synthetic.paths=[{small_synthetic}]",
                                                     f"data.idle_sleep_s={sleep_s}"))
    datasets, specs = build_datasets(cfg, index_inputs(cfg), {"real": 20, "synthetic": 20})
    datasets.update({name: rank_stream(spec, cfg, 0, 1) for name, spec in specs.items()})
    assert set(datasets) == {"val", "real", "synthetic"}
    for name, ds in datasets.items():
        callbacks = [c for c in ds.context.custom_execution_callback_classes
                     if isinstance(c, functools.partial) and c.func is SleepWhenIdle]
        assert [c.args for c in callbacks] == ([(sleep_s,)] if sleep_s else []), name
    assert train_ray.data.DataContext.get_current().custom_execution_callback_classes == []  # nothing leaks
    batch = next(iter(datasets["synthetic"].iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["pixel_values"].shape[0] == 4  # a stream with the callback still runs
