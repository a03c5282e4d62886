"""Inputs are checked before Ray starts: one line, exit 2, a hint when a path is one level off;
--dry-run lists the same problems and still prints the plan. No Ray in this file."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest

from pipelines.inputs import source_problems
from segfactory.cli import _check_submitted_generate, main


@pytest.fixture(scope="module")
def voc_devkit(tmp_path_factory):
    from pipelines.toy_data import make_toy_dataset

    root = tmp_path_factory.mktemp("devkit") / "VOCdevkit"
    make_toy_dataset(root / "VOC2012", n_train=2, n_val=1, size=16)
    return root


def test_source_one_level_off_gets_a_hint(voc_devkit):
    [down] = source_problems(str(voc_devkit), "voc")
    assert down.startswith(f"source.path={voc_devkit}: not a voc dataset (no JPEGImages/ inside")
    assert down.endswith(f"did you mean source.path={voc_devkit / 'VOC2012'}? (one level down)")
    [up] = source_problems(str(voc_devkit / "VOC2012" / "JPEGImages"), "voc")
    assert up.endswith(f"did you mean source.path={voc_devkit / 'VOC2012'}? (one level up)")
    assert source_problems(str(voc_devkit / "VOC2012"), "voc") == []
    [typo] = source_problems(str(voc_devkit.parent / "VOCdevkt"), "voc")
    assert typo == f"source.path={voc_devkit.parent / 'VOCdevkt'}: not found; did you mean source.path={voc_devkit}?"
    [ade] = source_problems(str(voc_devkit / "VOC2012"), "ade20k")
    assert "no images/, annotations/ inside" in ade


def test_generate_exits_2_with_one_line_before_ray(voc_devkit, tmp_path, capsys):
    started = time.monotonic()
    code = main(["generate", "--config", "seggen-toy", f"source.path={voc_devkit}", f"output.path={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean source.path=" in err
    assert time.monotonic() - started < 5  # no Ray start (~5 s here)
    assert not (tmp_path / "o").exists()


def test_unknown_key_suggests_the_nearest(capsys):
    assert main(["generate", "--config", "seggen-toy", "--dry-run", "imgsyn.samples_per_sorce=3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: imgsyn.samples_per_sorce: unknown key; "
                                               "did you mean imgsyn.samples_per_source?")
    assert main(["train", "--config", "toy", "real.pth=x"]) == 2
    assert "did you mean real.path?" in capsys.readouterr().err


def _bank(path):
    from actors.textual_inversion import BankEntry, save_bank

    save_bank(str(path), [BankEntry("<v0>", "a/1", "a", 1, "circle")], [np.zeros((1, 32), np.float32)])


def test_aligndiff_bank_takes_the_run_directory_and_dry_run_always_prints_the_plan(voc_devkit, tmp_path,
                                                                                    capsys, monkeypatch):
    monkeypatch.setattr("pipelines.dryrun.detect_gpus", lambda cfg: (1, "a one-GPU box", "test"))
    src = f"source.path={voc_devkit / 'VOC2012'}"
    # no bank at all: the plan in JSON, with the problem in it
    assert main(["generate", "--config", "aligndiff-sd15", src, "--dry-run", "--format", "json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in plan["stages"]] == ["expand", "generate", "refine", "finalize"]
    assert plan["problems"][0].startswith("aligndiff.bank: required")
    # a bank and a source that do not exist: both listed, plan printed
    assert main(["generate", "--config", "aligndiff-tiny", f"aligndiff.bank={tmp_path / 'nope'}",
                 f"source.path={tmp_path / 'nosrc'}", "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert f"problem: source.path={tmp_path / 'nosrc'}: not found" in out and "stages:" in out
    assert f"problem: aligndiff.bank={tmp_path / 'nope'}: not found" in out
    # the run directory of textual inversion: its bank.safetensors
    run = tmp_path / "ti"
    run.mkdir()
    _bank(run / "bank.safetensors")
    assert main(["generate", "--config", "aligndiff-tiny", f"aligndiff.bank={run}", src, "--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("problems: none")
    (tmp_path / "fake.safetensors").write_bytes(b"not a bank")
    assert main(["generate", "--config", "aligndiff-tiny", f"aligndiff.bank={tmp_path / 'fake.safetensors'}",
                 src, f"output.path={tmp_path / 'o'}"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_submit_checks_a_shipped_config_name_and_a_repo_relative_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repository: names and repo paths still resolve
    for config in ("seggen-toy", "pipelines/configs/seggen-toy.yaml"):
        args = argparse.Namespace(command=["--", "segfactory", "generate", "--config", config,
                                           "source.path=/data/voc", "output.path=/data/out"])
        assert _check_submitted_generate(args) is None


def test_toy_data_refuses_negative_counts_and_leaves_no_stale_files(tmp_path, capsys):
    assert main(["toy-data", str(tmp_path / "t"), "--train", "-1"]) == 2
    assert "--train: -1 is negative" in capsys.readouterr().err
    assert main(["toy-data", str(tmp_path / "t"), "--train", "4", "--val", "1", "--size", "16"]) == 0
    assert main(["toy-data", str(tmp_path / "t"), "--train", "2", "--val", "1", "--size", "16"]) == 0
    assert len(list((tmp_path / "t" / "JPEGImages").iterdir())) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["toy-data", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_progress_and_summary_agree_and_a_rerun_reports_no_rate():
    from pipelines.progress import Progress
    from pipelines.report import _rate_line

    p = Progress(2, 0, 60, rejected_before=1)
    p.record({"kept": 10, "rejected": 1, "node": "n"})
    assert "kept 10, rejected 2" in p.line()
    m = {"shards": [{}, {}]}
    assert _rate_line(m, {"wall_s": 3.0, "rows_this_run": 0, "stream_s": 0.0, "samples_per_s": 0.0}) == (
        "wall time: 3.0 s   nothing generated: all 2 shards were already complete")
    line = _rate_line(m, {"wall_s": 30.0, "rows_this_run": 20, "stream_s": 10.0, "samples_per_s": 2.0})
    assert "2.00 samples/s over 10.0 s of generation" in line


def test_training_commands_check_data_before_ray(voc_devkit, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(voc_devkit)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"did you mean --data={voc_devkit / 'VOC2012'}? (one level down)")
    assert main(["train", "--config", "toy", f"real.path={voc_devkit / 'VOC2012'}",
                 f"synthetic.paths=[{tmp_path / 'none'}]", f"output.path={tmp_path / 'r'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: synthetic.paths={tmp_path / 'none'}: not found"
