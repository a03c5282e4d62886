"""Training streams whose plan does not grow with the budget (training.epochs, training.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.config import load_config
from training.config import TrainConfig
from training.epochs import order, pick_units, plan_chunks, synthetic_chunks
from training.subsets import read_sample_ids, subset_key, volume_threshold

TOY = Path(__file__).resolve().parents[2] / "training" / "configs" / "toy.yaml"


def test_pick_units_gives_each_epoch_its_own_permutation():
    out = pick_units({"id": np.arange(30)}, n=10, seed=3, salt=1)
    assert out["epoch"].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    epochs = [out["unit"][out["epoch"] == e] for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(10)) for e in epochs)
    assert epochs[0].tolist() != epochs[1].tolist()
    # any split of the positions into batches (and an offset: a resumed run) gives the same units
    late = pick_units({"id": np.arange(5)}, n=10, seed=3, salt=1, offset=25)
    assert late["unit"].tolist() == out["unit"][25:].tolist() and late["epoch"].tolist() == [2] * 5
    assert order(10, 3, 1, 1).tolist() == epochs[1].tolist()


def test_plan_chunks_selects_the_volume_subset_from_ids_only(small_synthetic):
    files = sorted(str(f) for f in (small_synthetic / "shards").glob("*.parquet"))
    chunks, rows = plan_chunks(files, slice_rows=20)
    assert rows == 96 and [len(pos) for _, _, pos in chunks] == [20, 12] * 3  # 3 shards of 32 rows, sliced
    chunks, rows = plan_chunks(files, volume=20)
    ids = read_sample_ids(files)
    want = {s for s in ids if subset_key(s) <= volume_threshold(ids, 20)}
    assert rows == 20 and len(want) == 20
    import pyarrow.parquet as pq

    picked = set()
    for f, g, pos in chunks:
        picked |= {pq.ParquetFile(f).read_row_group(g, columns=["sample_id"]).column(0).to_pylist()[i] for i in pos}
    assert picked == want
    # the map task reads exactly those rows (bytes read there, not on the driver), keyed per epoch
    from training import epochs

    class Ref:  # stands in for the object ref the driver puts the chunk table under
        def hex(self) -> str:
            return "test-chunks"

    epochs._TABLES["test-chunks"] = chunks
    units = {"unit": np.arange(len(chunks)), "epoch": np.zeros(len(chunks), int)}
    out = synthetic_chunks(units, chunks_ref=Ref(), seed=0)
    again = synthetic_chunks({**units, "epoch": np.ones(len(chunks), int)}, chunks_ref=Ref(), seed=0)
    assert len(out["image"]) == 20 and out["image"].tolist() == again["image"].tolist()
    assert len(set(out["aug_key"].tolist()) & set(again["aug_key"].tolist())) == 0  # a new epoch, new crops
    assert out["aug_key"].tolist() == synthetic_chunks(units, chunks_ref=Ref(), seed=0)["aug_key"].tolist()


def _plan_ops(ds) -> int:
    """Operators in a Dataset's logical plan (how much the driver plans before the first row)."""
    n, todo = 0, [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        n += 1
        todo += op.input_dependencies
    return n


@pytest.mark.timeout(300, method="thread")
def test_a_thousand_epoch_budget_plans_like_one_and_trains_its_first_step_within_a_minute(
        train_ray, small_real, small_synthetic, quick, tmp_path):
    """160k steps x 8 x p_aug 0.6 on 96 synthetic and 48 real samples: ~8,000 synthetic and
    ~10,000 real epochs. The plan has as many operators as a one-epoch budget's, no read
    operator runs before the decode tasks (Ray 2.60 gives them no CPU until it ends: the
    first step of this run took 83-150 s with ``ray.data.range``), and the TorchTrainer's
    first step is reported within a minute of ``run_train`` starting."""
    from training.data import build_datasets, index_inputs
    from training.recipe import run_train

    run = tmp_path / "run"
    # rank 0 raises at step 2 and the run ends there: step 1 is the one timed
    args = quick(small_real, run, f"synthetic.paths=[{small_synthetic}]", "strategy=mix", "p_aug=0.6",
                 "iterations=160000", "batch_size=8", "log_interval=1", "eval_interval=100000",
                 "debug.fail_at_steps=[2]", "max_failures=0")
    cfg = load_config(TrainConfig, TOY, args)
    src = index_inputs(cfg)
    need = {"real": cfg.samples_needed(1 - cfg.p_aug), "synthetic": cfg.samples_needed(cfg.p_aug)}
    assert need["synthetic"] / src.synthetic_rows > 1000 and need["real"] / len(src.real_rows) > 1000
    long = build_datasets(cfg, src, need, {})  # a ray.put per span: at most training.data.SPANS each
    short = build_datasets(cfg, src, {"real": 40, "synthetic": 90}, {})
    for name in ("real", "synthetic"):
        assert _plan_ops(long[name]) == _plan_ops(short[name]) <= 4
        assert "Read" not in _op_names(long[name])

    with pytest.raises(Exception, match="simulated worker failure at step 2"):
        run_train(cfg)
    first = (run / "metrics.csv").read_text().splitlines()
    assert len(first) == 2 and first[1].startswith("1,")  # header + step 1 (time to it: benchmarks/)


def _op_names(ds) -> list[str]:
    names, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        names.append(op.name)
        todo += op.input_dependencies
    return names


@pytest.mark.timeout(240, method="thread")
def test_a_rebuilt_stream_yields_the_same_batches(train_ray, small_real, small_synthetic):
    """data.deterministic: the same config builds streams whose ordered execution gives the
    same rows, crops and flips (augmentation keyed by seed, sample id and epoch)."""
    from training.data import build_datasets, index_inputs

    cfg = load_config(TrainConfig, TOY, [f"real.path={small_real}", f"synthetic.paths=[{small_synthetic}]",
                                         "synthetic.volume=40", "aug.crop_size=32", "data.transform_batch_size=8"])
    src = index_inputs(cfg)

    def first(name: str) -> list[np.ndarray]:
        ds = build_datasets(cfg, src, {"real": 120, "synthetic": 120}, {})[name]
        ds.context.execution_options.preserve_order = True
        return [b["pixel_values"] for b in ds.iter_batches(batch_size=40, batch_format="numpy")]

    for name in ("real", "synthetic"):
        a, b = first(name), first(name)
        assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not np.array_equal(a[0], a[1])  # later epochs: other rows or other crops


def test_live_positions_cycle_over_the_index_rows(ray_local):
    """A live stream's positions (spans of the budget) map to index rows ``p % n``, in order."""
    import pyarrow as pa

    from training.data import cycle_rows
    from training.epochs import SPAN_START, SPAN_STOP, spans

    rows = pa.table({"source_id": ["a", "b", "c"], "shard": [0, 0, 1]})
    parts = spans(7, 2)
    assert [(p[SPAN_START], p[SPAN_STOP]) for p in parts] == [(0, 3), (3, 7)]
    ref = ray_local.put(rows)
    got = [cycle_rows({k: np.array([p[k]]) for k in p}, rows_ref=ref).column("source_id").to_pylist() for p in parts]
    assert got == [["a", "b", "c"], ["a", "b", "c", "a"]]
