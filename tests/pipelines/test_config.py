"""Config loading: YAML + overrides, one-line errors naming the key, exit code 2."""

from pathlib import Path

import pytest

from core.config import ConfigError, load_config, parse_overrides
from pipelines.config import GenerateConfig
from segfactory.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def test_overrides_nest_and_parse_yaml_values():
    tree = parse_overrides(["a.b=3", "a.c=[x, y]", "d=true", "e=0.5", "f=hello"])
    assert tree == {"a": {"b": 3, "c": ["x", "y"]}, "d": True, "e": 0.5, "f": "hello"}


def test_override_beats_yaml(tmp_path):
    cfg = load_config(GenerateConfig, CONFIGS / "seggen-toy.yaml",
                      ["seed=7", "imgsyn.samples_per_source=5", "mask2img.resources.max_actors=3"])
    assert (cfg.seed, cfg.imgsyn.samples_per_source, cfg.mask2img.resources.max_actors) == (7, 5, 3)
    assert cfg.preset == "toy" and cfg.mask2img.resources.num_cpus == 0.5


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate_and_name_their_command(name):
    path = CONFIGS / name
    assert path.read_text().startswith("# segfactory generate --config pipelines/configs/" + name)
    load_config(GenerateConfig, path)


def test_seggen_defaults_follow_the_paper():
    cfg = GenerateConfig()
    assert cfg.text2mask.steps == 200 and cfg.mask2img.steps == 40  # SegGen App. A.4
    assert cfg.text2mask.resolution == cfg.mask2img.resolution == 768


@pytest.mark.parametrize("override, message", [
    (["imgsyn.samples_per_sorce=2"], "imgsyn.samples_per_sorce: unknown key"),
    (["preset=huge"], "preset: Input should be"),
    (["mask2img.resources.num_gpus=-1"], "mask2img.resources.num_gpus: Input should be greater than or equal to 0"),
    (["text2mask.resources.min_actors=3", "text2mask.resources.max_actors=2"], "text2mask.resources: max_actors (2) < min_actors (3)"),
    (["seed"], "override 'seed' is not key=value"),
])
def test_bad_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(GenerateConfig, CONFIGS / "seggen-toy.yaml", override)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_cli_exit_code_2_and_one_line(capsys, tmp_path):
    code = main(["generate", "--config", str(CONFIGS / "seggen-toy.yaml"), "imgsyn.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: imgsyn.bogus: unknown key"
    assert main(["generate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["no-such-command"]) == 2


def test_config_hash_ignores_paths_and_resources_but_not_content():
    a = GenerateConfig(output={"path": "x"}, source={"path": "s"})
    b = GenerateConfig(output={"path": "y"}, source={"path": "t"}, mask2img={"resources": {"max_actors": 4}})
    c = GenerateConfig(seed=1)
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("key", ["output.samples_per_shard", "output.row_group_rows", "output.row_group_bytes"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_shard_and_row_group_sizes_below_one_exit_2_naming_the_key(key, value, capsys):
    code = main(["generate", "--config", str(CONFIGS / "seggen-toy.yaml"), "source.path=/nowhere", f"{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {key}: Input should be greater than or equal to 1")
    assert len(err.splitlines()) == 1


def test_samples_per_shard_sets_the_source_rows_per_shard():
    toy = load_config(GenerateConfig, CONFIGS / "seggen-toy.yaml", ["imgsyn.samples_per_source=3",
                                                                    "masksyn.samples_per_caption=2"])
    assert toy.shard_rows() == toy.output.rows_per_shard  # unset: rows_per_shard, and the same hash
    sized = toy.model_copy(update={"output": toy.output.model_copy(update={"samples_per_shard": 23})})
    assert sized.shard_rows() == 4  # 23 // (3 + 2)
    assert sized.config_hash() != toy.config_hash()  # other shards: another dataset
    tiny = sized.model_copy(update={"output": sized.output.model_copy(update={"samples_per_shard": 2})})
    assert tiny.shard_rows() == 1  # at least one source row
    layout = toy.model_copy(update={"output": toy.output.model_copy(update={"row_group_rows": 7})})
    assert layout.config_hash() == toy.config_hash()  # the same samples in other row groups


@pytest.mark.parametrize("name,resolution", [("seggen-sdxl", "mask2img"), ("factory-sdxl", "mask2img"),
                                             ("attn2mask-sdxl", "attn2mask")])
def test_shipped_sdxl_shards_hold_at_most_a_gib_of_pixels(name, resolution):
    from pipelines.graphs import get_graph

    cfg = load_config(GenerateConfig, CONFIGS / f"{name}.yaml")
    side = getattr(cfg, resolution).resolution
    samples = cfg.shard_rows() * get_graph(cfg.pipeline).samples_per_row(cfg)
    assert 256 <= samples and samples * side * side * 3 <= 1 << 30  # raw RGB: a PNG of it is smaller
