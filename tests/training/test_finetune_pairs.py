"""Fine-tuning pairs: captions from the captioner (generation's gated BLIP-2 pool), rows that make
no pair sent to ``rejected/`` in the dataset contract's schema, and a source on s3:// read by
Ray workers (moto's S3 server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core import schema as S
from core.config import ConfigError, load_config
from pipelines.source_index import index_source
from pipelines.sources import caption_from_mask, load_pixels
from training.finetune.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]
LATENT_SHAPE = (4, 16, 16)  # the tiny SDXL VAE at the tiny recipes' 32 px: 4 channels, 2 blocks (/2)
TINY_CAPTIONER = ["captions.source=captioner", "captioner.max_new_tokens=4", "captioner.min_new_tokens=2"]


def cfg_of(kind: str, source, out="", *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, ROOT / "training" / "configs" / f"{kind}-tiny.yaml",
                       [f"source.path={source}", f"output.path={out}", *extra])


def source_captions(src: Path) -> dict[str, str]:
    return {json.loads(line)["id"]: json.loads(line)["caption"] for line in (src / "captions.jsonl").read_text().splitlines()}


def template_captions(src, ids) -> dict[str, str]:
    """The class-name caption of each row's full mask and of its centre crop (either could be
    what the template would say)."""
    index = index_source(src, "voc")
    rows = {r[S.SOURCE_ID]: r for r in index.rows}
    out = {}
    for sid in ids:
        _, mask = load_pixels(rows[sid], "voc", len(index.classes))
        out[sid] = caption_from_mask(mask, index.classes, 0)
    return out


def test_captioner_captions_every_pair_through_the_generation_pool(toy_source, monkeypatch):
    from actors.captioner import SEGGEN_QUESTION, Captioner
    from training.finetune.local import pairs_from_source

    seen: list[tuple[str, int, list[str]]] = []
    real_call = Captioner.__call__

    def spy(self, batch):
        out = real_call(self, batch)
        seen.append((self.prompt, len(batch[S.SOURCE_ID]), list(out[S.CAPTION])))
        return out

    monkeypatch.setattr(Captioner, "__call__", spy)
    cfg = cfg_of("text2mask", toy_source, "", *TINY_CAPTIONER)
    pairs, _, _ = pairs_from_source(cfg, "train", 3)
    # one gated call on the three rows, with SegGen's question (the blip2 default), and the
    # pairs' captions are exactly what the model returned
    assert [(p, n) for p, n, _ in seen] == [(SEGGEN_QUESTION, 3)]
    assert list(pairs["caption"]) == seen[0][2]
    given, template = source_captions(toy_source), template_captions(toy_source, pairs["source_id"])
    for sid, cap in zip(pairs["source_id"], pairs["caption"], strict=True):
        assert cap.strip() and cap != given[sid] and cap != template[sid]  # the model's, not the file's or template's
    assert set(pairs) >= {"caption", "target", "cond"} and "drop_reason" not in pairs

    # auto under the tiny preset: the source's captions, the model is not called
    seen.clear()
    auto, _, _ = pairs_from_source(cfg_of("text2mask", toy_source), "train", 3)
    assert seen == [] and list(auto["caption"]) == [given[s] for s in auto["source_id"]]


def test_caption_modes_file_template_and_auto_fill(toy_source):
    from training.finetune.pairs import caption_fill, make_pairs

    index = index_source(toy_source, "voc")
    rows = sorted(index.rows, key=lambda r: r[S.SOURCE_ID])[:2]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch[S.CAPTION] = np.array(["a caption from the file", ""], dtype=object)  # the second row has none
    kw = {"format": "voc", "classes": list(index.classes), "background": 0, "palette": [[0, 0, 0]] * 6,
          "resolution": 16, "template": "{caption}, toy style"}
    file = make_pairs(batch, caption_source="file", **kw)
    assert list(file["caption"]) == ["a caption from the file", ""]
    assert file["drop_reason"][0] == "" and file["drop_reason"][1].startswith("missing_caption: ")
    assert rows[1][S.SOURCE_PATH] in file["drop_reason"][1]  # names the image whose caption is missing
    tmpl = make_pairs(batch, caption_source="template", **kw)
    assert all(c.startswith("a photo of") and c.endswith(", toy style") for c in tmpl["caption"])
    auto_fill = make_pairs(batch, caption_source="auto", fill="captioner", **kw)
    assert list(auto_fill["caption"]) == ["a caption from the file", ""]  # "" = left for the captioner pool
    assert caption_fill(cfg_of("text2mask", toy_source)) == "template"
    assert caption_fill(load_config(FinetuneConfig, ROOT / "training/configs/text2mask-sdxl.yaml", [])) == "captioner"


def test_sdxl_captions_without_a_captioner_model_are_a_clear_error(toy_source, tmp_path):
    from training.finetune.run import run_finetune

    src = tmp_path / "src"
    shutil.copytree(toy_source, src)
    (src / "captions.jsonl").unlink()
    cfg = load_config(FinetuneConfig, ROOT / "training/configs/text2mask-sdxl.yaml",
                      [f"source.path={src}", "source.format=voc", f"output.path={tmp_path / 'run'}",
                       "captioner.model.id=", "palette=voc"])
    with pytest.raises(ConfigError, match=r"^captioner.model.id: required"):
        run_finetune(cfg)
    assert not (tmp_path / "run").exists()


def corrupt_copy(src: Path, dst: Path, n_train: int) -> tuple[Path, str, str]:
    """A copy of the first ``n_train`` training rows (and the val split) with one JPEG corrupted."""
    shutil.copytree(src, dst)
    sets = dst / "ImageSets" / "Segmentation"
    ids = (sets / "train.txt").read_text().split()[:n_train]
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    bad = ids[1]
    (dst / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return dst, bad, f"JPEGImages/{bad}.jpg"


def test_split_rejected_writes_the_bad_row_in_the_contract_schema(toy_source, tmp_path):
    from pipelines.writer import REJECTED_SCHEMA
    from training.finetune.data import resolve_palette
    from training.finetune.local import pairs_from_source
    from training.finetune.pairs import make_pairs, pair_kwargs, split_rejected

    src, bad, rel = corrupt_copy(toy_source, tmp_path / "src", 4)
    cfg = cfg_of("mask2img", src)
    index = index_source(src, "voc")
    rows = sorted(index.rows, key=lambda r: r[S.SOURCE_ID])
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    _, palette = resolve_palette(cfg, index)
    pairs = make_pairs(batch, **pair_kwargs(cfg, index, palette))
    kept = split_rejected(pairs, out=str(tmp_path / "out"), split="train")
    assert list(kept["source_id"]) == [r[S.SOURCE_ID] for r in rows if r[S.SOURCE_ID] != bad]
    assert kept["target"].shape == (3, 32, 32, 3) and set(kept) == {"caption", "target", "cond", "orig_hw",
                                                                      "crop_tl", "source_id"}
    files = list((tmp_path / "out" / "rejected").glob("*.parquet"))
    table = pq.read_table(files[0])
    assert len(files) == 1 and table.schema.equals(REJECTED_SCHEMA)
    got = table.to_pylist()
    assert [(r["source_id"], r["method"], r["source_path"]) for r in got] == [(bad, "finetune", str(src / rel))]
    assert got[0]["drop_reason"].startswith(f"corrupt_image: {src / rel}: corrupt or unreadable image")
    # the same batch again (a retried task) rewrites the same file
    split_rejected(pairs, out=str(tmp_path / "out"), split="train")
    assert list((tmp_path / "out" / "rejected").glob("*.parquet")) == files
    # in-process pairs (no output directory) drop the row too
    local, _, _ = pairs_from_source(cfg, "train")
    assert bad not in set(local["source_id"]) and len(local["source_id"]) == 3


@pytest.mark.timeout(300, method="thread")
def test_pairs_and_latent_cache_on_s3_on_ray_with_the_captioner_pool(ray_local, s3_bucket, toy_source, tmp_path):
    """The index lists s3:// keys; Ray tasks decode the pairs from the bucket; the captioner runs
    as an actor pool; the corrupt image lands in rejected/ naming its s3:// key; the rest are
    encoded by the caching pass into a latent cache on s3:// and read back."""
    from core import storage
    from training.finetune.data import (
        cache_current,
        cache_key,
        cache_root,
        cached_datasets,
        pair_datasets,
        resolve_palette,
        write_index_problems,
    )
    from training.finetune.pairs import captioner_stage

    local, bad, rel = corrupt_copy(toy_source, tmp_path / "src", 6)
    (local / "SegmentationClass" / "toy_train_00003.png").unlink()  # a missing mask: an index problem
    s3, root = pafs.FileSystem.from_uri(s3_bucket)
    pafs.copy_files(str(local), f"{root}/toy", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    uri = f"{s3_bucket}/toy"
    cfg = cfg_of("text2mask", uri, tmp_path / "run", *TINY_CAPTIONER, "captioner.resources.num_cpus=0.25",
                 "data.encode_num_cpus=0.25", f"data.cache_path={s3_bucket}/cache", "data.flip=false")
    assert captioner_stage(cfg).kwargs["fn_constructor_kwargs"]["actor_kwargs"]["image_column"] == "target"
    index = index_source(uri, "voc")
    assert index.problems and index.problems[0][2].startswith("missing_mask")
    _, palette = resolve_palette(cfg, index)
    run = tmp_path / "run"
    write_index_problems(run, index.problems)
    pairs = pair_datasets(cfg, palette, index, [], run)
    cache, key = cache_root(cfg, run), cache_key(cfg, palette, "cond", True)
    assert cache.uri == f"{s3_bucket}/cache" and not cache_current(cache, key)
    cached = cached_datasets(cfg, {"train": pairs["train"]}, cache, key, "cond")["train"].take_all()
    assert cache_current(cache, key) and storage.listdir(cache / "train", ".parquet")  # written to the bucket
    ids = sorted(r["source_id"] for r in cached)
    assert len(ids) == 4 and bad not in ids and "toy_train_00003" not in ids
    assert all(r["latents"].shape == LATENT_SHAPE and np.isfinite(r["latents"]).all() for r in cached)
    given = source_captions(local)
    assert all(r["caption"].strip() and r["caption"] != given[r["source_id"]] for r in cached)  # the captioner's
    rejected = {r["source_id"]: r for f in sorted((run / "rejected").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    assert sorted(rejected) == sorted([bad, "toy_train_00003"])
    assert rejected[bad]["source_path"] == f"{uri}/{rel}"
    assert rejected[bad]["drop_reason"].startswith(f"corrupt_image: {uri}/{rel}: corrupt or unreadable image")
    assert rejected["toy_train_00003"]["drop_reason"].startswith("missing_mask")


def test_textual_inversion_instances_send_an_unreadable_row_to_rejected(toy_source, tmp_path):
    from training.finetune.textual_inversion import make_instances

    src, bad, rel = corrupt_copy(toy_source, tmp_path / "src", 3)
    index = index_source(src, "voc")
    rows = sorted(index.rows, key=lambda r: r[S.SOURCE_ID])
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = make_instances(batch, format="voc", classes=list(index.classes), background=0, resolution=16, only=None,
                         min_fraction=0.0, rejected_to=str(tmp_path / "ti"))
    assert bad not in set(out["source_id"]) and set(out["source_id"]) == {r[S.SOURCE_ID] for r in rows} - {bad}
    got = pq.read_table(tmp_path / "ti" / "rejected").to_pylist()
    assert [(r["source_id"], r["source_path"]) for r in got] == [(bad, str(src / rel))]
    assert got[0]["drop_reason"].startswith(f"corrupt_image: {src / rel}")


def test_a_run_directory_in_a_missing_bucket_exits_2_with_one_line_naming_it(s3_server, toy_source, capsys):
    from segfactory.cli import main

    out = "s3://no-such-bucket-here/run"
    argv = ["finetune", "--config", str(ROOT / "training" / "configs" / "text2mask-tiny.yaml"),
            f"source.path={toy_source}", f"output.path={out}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{out}: bucket 'no-such-bucket-here' does not exist" in errors[0], err
    assert "Traceback" not in err
