"""`segfactory generate --dry-run` and the GPU accounting behind it: no Ray start, no model
load, offline; the one-GPU profile; a run whose pools cannot get their GPUs fails at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_config
from pipelines.config import GenerateConfig
from pipelines.dryrun import dry_run
from pipelines.graphs import get_graph
from pipelines.resources import PoolNeed, apply_profile, gpu_shortage, min_gpus, packs, pool_needs
from segfactory.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
REAL = [p for p in CONFIGS if "-sd" in p.name]
# keys a config leaves to the user (its first line names them): the aligndiff graphs need a bank,
# given as the run directory of textual inversion (its bank.safetensors is found there)
USER_KEYS = {"aligndiff-tiny": ["aligndiff.bank={bank_run}"], "aligndiff-sd15": ["aligndiff.bank={bank_run}"]}


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory):
    import numpy as np

    from actors.textual_inversion import BankEntry, save_bank

    run = tmp_path_factory.mktemp("ti-run")
    save_bank(str(run / "bank.safetensors"), [BankEntry("<v0>", "toy_0/1", "toy_0", 1, "circle")],
              [np.zeros((1, 32), np.float32)])
    return run


def _cfg(path, *overrides) -> GenerateConfig:
    return load_config(GenerateConfig, path, list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_json_of_every_shipped_config(path, capsys, monkeypatch, bank_run):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("pipelines.dryrun.detect_gpus", lambda cfg: (1, "a one-GPU box", "test"))
    extra = [k.format(bank_run=bank_run) for k in USER_KEYS.get(path.stem, [])]
    code = main(["generate", "--config", str(path), *extra, "--dry-run", "--format", "json"])
    plan = json.loads(capsys.readouterr().out)
    cfg = _cfg(path, *extra).model_copy()
    if cfg.pipeline == "aligndiff":  # the run directory resolves to the bank inside it
        cfg.aligndiff.bank = str(bank_run / "bank.safetensors")
    assert {"stages", "models", "min_gpus", "problems"} <= set(plan)
    pools = [s for s in plan["stages"] if s["kind"] == "pool"]
    assert [s["name"] for s in pools] == [m.name for m in get_graph(cfg.pipeline).model_stages(cfg)]
    # min_gpus: every pool's min_actors x num_gpus, after the default fit profile on one GPU
    assert plan["min_gpus"] == pytest.approx(sum(s["min_actors"] * s["num_gpus"] for s in pools), abs=1e-4)
    assert plan["min_gpus"] <= 1.0  # one GPU runs every shipped graph
    assert plan["config_hash"] == cfg.config_hash()
    if path in REAL:
        # the real presets name weights; those given as local files that are not on this machine
        # (local_path / checkpoints) are problems, hub ids are not looked up
        assert plan["models"] and all(m["id"] or m["local_path"] for m in plan["models"])
        absent = [m for m in plan["models"] if m["local_path"] and not Path(m["local_path"]).exists()]
        missing = [p for p in plan["problems"] if "does not exist here" in p]
        assert len(missing) == len(absent) and code == (2 if plan["problems"] else 0)
        hub = [m for m in plan["models"] if m["from"] == "hub"]
        assert all(len(m["revision"]) == 40 for m in hub)  # pinned
    else:
        assert plan["models"] == [] and plan["problems"] == [] and code == 0


def test_factory_sdxl_needs_three_gpus_as_configured_and_fits_one_by_default():
    cfg = _cfg(ROOT / "pipelines/configs/factory-sdxl.yaml")
    assert min_gpus(pool_needs(cfg)) == 3.0  # 0.25 + 0.25 + 0.5 + 1 + 0.25 + 0.25 + 0.5
    one = apply_profile(cfg, 1)
    needs = {n.stage: n.num_gpus for n in pool_needs(one)}
    assert sum(needs.values()) <= 1.0 and needs["mask2img"] == pytest.approx(1 / 3, abs=1e-4)
    assert needs["sam"] == pytest.approx(2 * needs["grounding"], abs=1e-4)  # ratios kept
    assert gpu_shortage(one, 1, "x") is None
    assert apply_profile(cfg, 4) == cfg  # fits as configured on 4 GPUs: untouched
    assert apply_profile(cfg.model_copy(update={"resources_profile": "per-pool"}), 1) == cfg.model_copy(
        update={"resources_profile": "per-pool"})
    assert one.config_hash() == cfg.config_hash()  # resources never enter the hash


def test_gpu_packing_is_per_gpu_not_a_sum():
    two_halves_and_whole = [PoolNeed("a", "a", 2, 0.6), PoolNeed("b", "b", 1, 1.0)]
    assert min_gpus(two_halves_and_whole) == 2.2
    assert not packs(two_halves_and_whole, 2) and packs(two_halves_and_whole, 3)
    assert packs([PoolNeed("a", "a", 3, 0.3333)], 1) and not packs([PoolNeed("a", "a", 1, 2.0)], 1)
    assert packs([PoolNeed("cpu", "cpu", 4, 0.0)], 0)


def test_dry_run_flags_relative_paths_for_a_cluster_and_a_gpu_shortage(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "cn").mkdir()
    local = _cfg(ROOT / "pipelines/configs/seggen-sdxl.yaml", "text2mask.model.local_path=null", "captions=template",
                 f"mask2img.controlnet.local_path={tmp_path / 'cn'}", "resources_profile=per-pool")
    plan = dry_run(local, 1, "a one-GPU box")
    assert plan["min_gpus"] == 2.0 and plan["min_gpus_configured"] == 2.0
    assert len(plan["problems"]) == 1 and plan["problems"][0].startswith("resources: the pools' minimum sizes need 2 GPU")
    assert dry_run(local.model_copy(update={"resources_profile": "fit"}), 1, "x")["problems"] == []
    models = {m["key"]: m for m in plan["models"]}
    assert models["mask2img.model"]["id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert models["mask2img.controlnet"] == {
        "key": "mask2img.controlnet", "stage": "mask2img", "kind": "diffusers-model", "id": None, "revision": None,
        "local_path": str(tmp_path / "cn"), "variant": None, "dtype": "float16", "from": "local"}
    rel = local.model_copy(update={"resources_profile": "fit"})
    rel.mask2img.controlnet.local_path = "cn"
    monkeypatch.chdir(tmp_path)  # exists here, relative: fine locally, a problem for a cluster run
    assert dry_run(rel, 1, "x")["problems"] == [] and "relative" in dry_run(rel, 1, "x")["notes"][0]
    remote = rel.model_copy(update={"ray": rel.ray.model_copy(update={"address": "ray://head:10001"})})
    [problem] = dry_run(remote, 1, "x")["problems"]
    assert problem.startswith("mask2img.controlnet.local_path: cn is relative: it will not exist on a cluster")


def test_text_dry_run_and_exit_codes(capsys, monkeypatch):
    monkeypatch.setattr("pipelines.dryrun.detect_gpus", lambda cfg: (0, "this machine", "test"))
    assert main(["generate", "--config", str(ROOT / "pipelines/configs/seggen-toy.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mask2img         pool 1-1 x (gpus 0, cpus 0.5) batch 16  actors.toy_mask2img:ToyMask2Img" in out
    assert out.rstrip().endswith("problems: none")
    assert main(["generate", "--config", str(ROOT / "pipelines/configs/seggen-sdxl.yaml"), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert ("problem: resources: the pools' minimum sizes need 1 GPU(s) (captioner 1x0.2, text2mask 1x0.4, "
            "mask2img 1x0.4) but this machine has 0") in out


def test_a_run_whose_pools_need_missing_gpus_fails_at_once(ray_local, toy_source, tmp_path, capsys):
    """On the 0-GPU test cluster a pool of num_gpus=1 would wait for ever: exit 2, one line."""
    code = main(["generate", "--config", str(ROOT / "pipelines/configs/seggen-toy.yaml"), f"source.path={toy_source}",
                 f"output.path={tmp_path / 'out'}", "mask2img.resources.num_gpus=1", "ray.show_progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2  # not a wait: the test would hang until pytest's timeout
    assert err[-1].startswith("error: resources: the pools' minimum sizes need 1 GPU(s) (mask2img 1x1) but the Ray "
                              "cluster has 0")


def test_submit_refuses_relative_model_paths_before_submitting(capsys):
    from segfactory.cli import _check_submitted_generate, build_parser

    sdxl = str(ROOT / "pipelines/configs/seggen-sdxl.yaml")
    assert main(["submit", "--", "generate", "--config", sdxl, "source.path=s3://b/src", "output.path=s3://b/out",
                 "captioner.model.local_path=/mnt/blip2"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: submit: text2mask.model.local_path: models/seggen-text2mask-sdxl is relative")
    ok = build_parser().parse_args(["submit", "--", "generate", "--config", sdxl, "text2mask.model.local_path=/mnt/t2m",
                                    "mask2img.controlnet.local_path=/mnt/cn", "captioner.model.local_path=/mnt/blip2"])
    assert _check_submitted_generate(ok) is None  # absolute paths: left to the cluster to have
    toy = build_parser().parse_args(["submit", "--", "generate", "--config", str(ROOT / "pipelines/configs/seggen-toy.yaml")])
    assert _check_submitted_generate(toy) is None
