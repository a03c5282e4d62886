"""Shared fixtures: one Ray instance for the whole session (ray.init costs ~5 s here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray shared by every test that needs one; stalls become errors."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = 300
    ctx.enable_progress_bars = False
    yield ray
    # left running for other tests; pytest's process exit shuts it down


@pytest.fixture(scope="session")
def toy_source(tmp_path_factory):
    """A small toy VOC-layout source dataset (40 train, 20 val)."""
    from pipelines.toy_data import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "src", n_train=40, n_val=20, size=64, seed=0)
