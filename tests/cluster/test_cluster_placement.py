"""Placement of GPU stages: on a two-node cluster (one node with a logical GPU) the model actors
land on the GPU node and the CPU tasks elsewhere; a logical GPU without CUDA falls back to CPU
once, loudly; weights are prefetched once per node that can host the stage loading them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config
from pipelines import prefetch as pf
from pipelines.config import GenerateConfig

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CONFIGS = ROOT / "pipelines" / "configs"


@pytest.fixture(scope="module")
def placement():
    """Run placement_run.py in its own process: it owns a two-node ray.cluster_utils.Cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback
    proc = subprocess.run([sys.executable, str(HERE / "placement_run.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gpu_stage_actors_on_the_gpu_node_cpu_tasks_elsewhere(placement):
    head, gpu = placement["nodes"]["head"], placement["nodes"]["gpu"]
    assert head != gpu
    req = placement["requested"]
    assert req["text2mask"]["num_gpus"] == req["mask2img"]["num_gpus"] == 0.5
    assert req["mask2img"]["accelerator_type"] == "A100"
    assert all(not req[s]["num_gpus"] for s in ("expand", "colorize", "finalize"))
    where = placement["placement"]
    assert placement["rows"] == 8 * (3 + 3)  # every row of the toy config came through
    assert where["where_text2mask"] == [gpu] and where["where_mask2img"] == [gpu]
    for stage in ("expand", "colorize", "finalize"):
        assert where[f"where_{stage}"] == [head], stage
    # Ray gave each GPU actor a logical GPU; with no CUDA here they run on the CPU.
    assert where["cuda_text2mask"] == ["0"] and where["cuda_mask2img"] == ["0"]
    assert where["device_text2mask"] == ["cpu"] and where["device_mask2img"] == ["cpu"]


@pytest.mark.slow
def test_prefetch_runs_once_per_eligible_node(placement):
    head, gpu = placement["nodes"]["head"], placement["nodes"]["gpu"]
    fetched = placement["prefetch"]
    assert set(fetched) == {head, gpu}
    for node, calls in fetched.items():
        assert all(call[0] == node for call in calls)  # the task ran on the node it was pinned to
    assert sorted(c[1] for c in fetched[gpu]) == ["org/everywhere", "org/on-gpu-nodes"]
    assert sorted(c[1] for c in fetched[head]) == ["org/cpu-stage", "org/everywhere"]
    # From a config: seggen-sdxl's one hub model (the pinned SDXL base), on the GPU node only.
    cfg = _cfg("seggen-sdxl.yaml", "captions=template")
    assert placement["prefetch_sdxl"] == {gpu: [[gpu, cfg.mask2img.model.id, cfg.mask2img.model.revision]]}


def test_pick_device_falls_back_to_cpu_once(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: no fallback to show")
    from actors import diffusion_models as dm

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what Ray sets for an actor with num_gpus
    monkeypatch.setattr(dm, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=dm.__name__):
        assert dm.pick_device() == "cpu" and dm.pick_device() == "cpu"
    warnings = [r for r in caplog.records if "CUDA is unavailable" in r.getMessage()]
    assert len(warnings) == 1


def _cfg(name: str, *overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, CONFIGS / name, ["source.path=/x", "output.path=/y", *overrides])


@pytest.mark.parametrize("preset", ["toy", "tiny", "sdxl-random"])
def test_offline_presets_prefetch_nothing(preset):
    assert pf.fetch_targets(_cfg("seggen-sdxl.yaml", f"preset={preset}")) == []
    assert pf.prefetch_models(_cfg("seggen-sdxl.yaml", f"preset={preset}"),
                              fetch=lambda *a: pytest.fail("fetched")) == {}


def test_fetch_targets_of_the_sdxl_config():
    cfg = _cfg("seggen-sdxl.yaml", "captions=template")
    # Text2Mask and the ControlNet come from local_path; only the pinned SDXL base is fetched.
    [target] = pf.fetch_targets(cfg)
    assert (target.repo_id, target.revision, target.num_gpus, target.num_cpus) == (
        cfg.mask2img.model.id, cfg.mask2img.model.revision, 1.0, 2.0)
    assert len(cfg.mask2img.model.revision) == 40
    both = pf.fetch_targets(_cfg("seggen-sdxl.yaml", "text2mask.model.local_path=null", "captions=template"))
    assert len(both) == 1  # the same base id@revision for both stages: fetched once
    # SegGen's BLIP-2 FlanT5-XXL comes from local_path (no commit verified offline): not fetched
    assert _cfg("seggen-sdxl.yaml").captioner.model.local_path == "models/blip2-flan-t5-xxl"
    assert [t.repo_id for t in pf.fetch_targets(_cfg("seggen-sdxl.yaml"))] == [cfg.mask2img.model.id]
    # the documented lighter option, by its catalogue name, is fetched at its pinned commit
    captioned = pf.fetch_targets(_cfg("seggen-sdxl.yaml", "captioner.model=blip2-opt-2.7b"))
    assert [t.repo_id for t in captioned] == ["Salesforce/blip2-opt-2.7b", cfg.mask2img.model.id]
    assert pf.fetch_targets(_cfg("seggen-sdxl.yaml", "text2mask.model.local_path=null", "captions=template",
                                 "text2mask.model.revision=abc"))[0].revision == "abc"
    imgsyn = _cfg("seggen-sdxl.yaml", "pipeline=imgsyn", "text2mask.model.local_path=null",
                  "text2mask.model.revision=abc", "captions=template")
    assert [r.revision for r in pf.fetch_targets(imgsyn)] == [cfg.mask2img.model.revision]


def test_eligible_nodes_follow_the_stage_resources():
    nodes = [{"NodeID": "cpu", "Alive": True, "Resources": {"CPU": 16.0}},
             {"NodeID": "a100", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}},
             {"NodeID": "h100", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0, "accelerator_type:H100": 1.0}},
             {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    assert pf.eligible_nodes(pf.FetchTarget("m", "r", num_gpus=1), nodes) == ["a100", "h100"]
    assert pf.eligible_nodes(pf.FetchTarget("m", "r", num_gpus=2), nodes) == ["h100"]
    assert pf.eligible_nodes(pf.FetchTarget("m", "r", num_gpus=0.5, accelerator_type="A100"), nodes) == ["a100"]
    assert pf.eligible_nodes(pf.FetchTarget("m", "r", num_cpus=12), nodes) == ["cpu"]
