"""TrainConfig, the shipped toy config, and the train/evaluate command-line wiring."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
from pydantic import BaseModel

from core.config import ConfigError, load_config
from training.config import TrainConfig
from training.recipe import check_inputs

TOY_CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "toy.yaml"

pytestmark = pytest.mark.timeout(60)


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        for sub in getattr(ann, "__args__", (ann,)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, f"{prefix}{name}.")


def test_every_field_has_a_description():
    missing = [k for k, f in _fields(TrainConfig) if not f.description]
    assert missing == []


def test_toy_config_first_line_is_the_command_and_it_parses():
    first = TOY_CONFIG.read_text().splitlines()[0]
    assert first == ("# segfactory train --config training/configs/toy.yaml real.path=DIR real.format=voc "
                     "synthetic.paths=[OUT] strategy=mix p_aug=0.6 output.path=RUN")
    argv = shlex.split(first[2:])[1:]
    assert argv[:3] == ["train", "--config", "training/configs/toy.yaml"]
    cfg = load_config(TrainConfig, TOY_CONFIG, argv[3:])
    assert cfg.real.path == "DIR" and cfg.synthetic.paths == ["OUT"] and cfg.strategy == "mix"
    assert cfg.p_aug == 0.6 and cfg.output.path == "RUN" and cfg.model.arch == "segformer"
    assert cfg.workers.cpus_per_worker < 1  # leaves room for Ray Data on 2 cores


@pytest.mark.parametrize("override, key", [
    ("strategy=bogus", "strategy"), ("p_aug=1.5", "p_aug"), ("optim.nme=sgd", "optim.nme"),
    ("workers.num_workers=0", "workers.num_workers"), ("aug.scale_min=3", "aug")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, TOY_CONFIG, [override])
    assert str(e.value).startswith(f"{key}:") and "\n" not in str(e.value)


def test_check_inputs():
    ok = ["real.path=R", "output.path=RUN"]
    check_inputs(load_config(TrainConfig, TOY_CONFIG, ok + ["strategy=real_only"]))
    with pytest.raises(ConfigError, match=r"^synthetic.paths: strategy=mix needs"):
        check_inputs(load_config(TrainConfig, TOY_CONFIG, ok))
    with pytest.raises(ConfigError, match=r"^output.path: required"):
        check_inputs(load_config(TrainConfig, TOY_CONFIG, ["real.path=R", "strategy=real_only"]))
    with pytest.raises(ConfigError, match=r"^real.path: required"):
        check_inputs(load_config(TrainConfig, TOY_CONFIG, ["output.path=RUN", "strategy=real_only"]))


def test_p_synthetic_and_budget():
    cfg = load_config(TrainConfig, TOY_CONFIG, ["iterations=100", "batch_size=4", "data.margin=1.0"])
    assert cfg.p_synthetic == 0.6
    assert cfg.model_copy(update={"strategy": "synthetic_only"}).p_synthetic == 1.0
    assert cfg.model_copy(update={"strategy": "real_only"}).p_synthetic == 0.0
    assert cfg.samples_needed(0.5) == 200 + 16 and cfg.samples_needed(0) == 0


def test_cli_registers_train_and_evaluate():
    from training.cli import add_training_commands

    parser = argparse.ArgumentParser(prog="segfactory")
    add_training_commands(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "--config", "c.yaml", "--resume", "strategy=mix", "p_aug=0.4"])
    assert a.config == "c.yaml" and a.resume and a.overrides == ["strategy=mix", "p_aug=0.4"]
    a = parser.parse_args(["evaluate", "--checkpoint", "RUN", "--data", "DIR"])
    assert (a.checkpoint, a.data, a.format, a.split, a.workers) == ("RUN", "DIR", "voc", "val", 1)
    assert callable(a.func)


def test_train_command_raises_config_error_for_bad_keys(tmp_path):
    from training.cli import add_training_commands

    parser = argparse.ArgumentParser(prog="segfactory")
    add_training_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(TOY_CONFIG), "nope=1"])
    with pytest.raises(ConfigError, match="^nope: unknown key"):
        args.func(args)


def test_demo_trains_real_only_then_mix_with_the_same_budget(monkeypatch, tmp_path):
    import training.recipe
    from training.demo import train_real_vs_mix

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"miou": 0.7 if cfg.strategy == "mix" else 0.6}

    monkeypatch.setattr(training.recipe, "run_train", fake)
    out = train_real_vs_mix(tmp_path / "real", tmp_path / "syn", tmp_path / "runs")
    assert [c.strategy for c in seen] == ["real_only", "mix"]
    assert seen[0].iterations == seen[1].iterations and seen[0].seed == seen[1].seed
    assert seen[1].synthetic.paths == [str((tmp_path / "syn").resolve())]
    assert out["miou_real_only"] == 0.6 and out["miou_mix"] == 0.7


def test_synthetic_classes_must_match_the_real_ones(small_real, tmp_path):
    import json

    from training.data import index_inputs

    syn = tmp_path / "syn"
    (syn / "shards").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core import schema as S

    pq.write_table(pa.Table.from_pylist([], schema=S.DATASET_SCHEMA), syn / "shards" / "part-0.parquet")
    (syn / "manifest.json").write_text(json.dumps({"classes": ["background", "cat"]}))
    cfg = load_config(TrainConfig, TOY_CONFIG, [f"real.path={small_real}", f"synthetic.paths=[{syn}]", "output.path=x"])
    with pytest.raises(ConfigError, match=r"^synthetic.paths\[0\]: classes \['background', 'cat'\] differ"):
        index_inputs(cfg)
    src = index_inputs(cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"paths": []})}))
    assert len(src.real_rows) == 48 and len(src.val_rows) == 24 and src.classes[0] == "background"
