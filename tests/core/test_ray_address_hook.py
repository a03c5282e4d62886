"""Local instances we start pin RAY_ADDRESS in their workers (worker_process_setup_hook), so Ray's
state API in Ray Train's PlacementGroupCleaner never searches the machine and trips over another
Ray instance there ("Found multiple active Ray instances", a traceback every second)."""

from __future__ import annotations

import os

import pytest

from core import runtime


def test_init_ray_asks_for_the_hook_on_a_local_start_only(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.init_ray()
    assert calls[-1]["address"] == "local"
    assert calls[-1]["runtime_env"] == {"worker_process_setup_hook": "core.runtime.pin_ray_address"}
    runtime.init_ray(type("Cfg", (), {"address": "ray://head:10001", "no_progress_timeout_s": 1,
                                      "show_progress": False})())
    assert "runtime_env" not in calls[-1]  # a cluster's job keeps its own runtime env


@pytest.mark.ray
def test_the_hook_sets_this_clusters_gcs_address_in_a_worker(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def pinned() -> str:
        runtime.pin_ray_address()
        return os.environ["RAY_ADDRESS"]

    assert ray.get(pinned.remote()) == ray.get_runtime_context().gcs_address
