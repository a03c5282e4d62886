"""Step accounting shared by train's loop and the fine-tuning recipes (training/steps.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import storage
from training.steps import Window, due, fail_if_asked


def test_due_evaluates_checkpoints_and_reports_on_the_schedule():
    got = {s: due(s, end=10, eval_every=4, ckpt_every=3, log_every=2) for s in range(1, 11)}
    assert [s for s, (e, _, _) in got.items() if e] == [4, 8, 10]  # every 4 and the last step
    assert [s for s, (_, c, _) in got.items() if c] == [3, 4, 6, 8, 9, 10]  # every 3 and at each eval
    assert [s for s, (_, _, r) in got.items() if r] == [2, 3, 4, 6, 8, 9, 10]
    assert [s for s in range(1, 7) if due(s, end=6, eval_every=5, ckpt_every=None, log_every=100)[1]] == [5, 6]


def test_window_means_and_shares():
    w = Window()
    w.add(1.0, 0.5, 2.0)
    w.add(3.0, 0.5, 2.0)
    m = w.metrics()
    assert (m["loss"], m["data_wait_fraction"], m["step_time_s"]) == (2.0, 0.25, 2.0) and m["steps_per_s"] > 0
    w.reset()
    assert (w.n, w.loss) == (0, 0.0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fail_if_asked_raises_once_per_step_on_rank_0(where, tmp_path, request):
    run = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    fail_if_asked(run, 3, [3], rank=1)  # only rank 0 fails
    fail_if_asked(run, 2, [3], rank=0)  # not a listed step
    with pytest.raises(RuntimeError, match="simulated worker failure at step 3"):
        fail_if_asked(run, 3, [3], rank=0)
    fail_if_asked(run, 3, [3], rank=0)  # the restarted worker group goes past it
    assert storage.exists(storage.resolve(run) / ".failed_at_3")


def test_release_restore_removes_only_the_copy_restore_dir_made(tmp_path):
    import tempfile

    from training.steps import RESTORE_PREFIX, release_restore

    copy = Path(tempfile.mkdtemp(prefix=RESTORE_PREFIX, dir=tmp_path))
    (copy / "model").mkdir()
    (copy / "model" / "model.safetensors").write_bytes(b"x")
    fetched = tmp_path / "model-cache" / "checkpoint_0000010"  # a fetched resume_from: the node's cache
    fetched.mkdir(parents=True)
    release_restore(str(copy))
    release_restore(str(fetched))
    release_restore(None)
    assert not copy.exists() and fetched.is_dir()
