"""The shard writer: staged rows, bounded row groups, verified files, commit records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import schema as S
from pipelines.commits import CorruptCommit, committed_shards, read_commits, summarize_output
from pipelines.stages import SIBLINGS
from pipelines.writer import ShardRanges, ShardWriter, prepare_output


def rows(source: str, shard: int, n: int, dropped: int = 0, truncated: int = 0, image: bytes = b"i") -> pa.Table:
    return pa.Table.from_pylist([{
        S.SAMPLE_ID: f"{source}/imgsyn/{k}", S.SOURCE_ID: source, S.METHOD: "imgsyn", S.CAPTION: "c",
        S.PROMPT: "c", S.IMAGE: image, S.MASK: b"m", S.HEIGHT: 1, S.WIDTH: 1, S.SEED: k, S.GENERATOR: "g",
        S.DROP_REASON: "image_constant" if k < dropped else "", S.SHARD: shard, SIBLINGS: n,
        S.SOURCE_PATH: f"/src/{source}.png", S.PROMPT_TRUNCATED: int(k < truncated)} for k in range(n)])


def test_shard_written_when_complete_sorted_split_and_committed(tmp_path):
    writer = ShardWriter(tmp_path, "abc", {0: 2, 1: 1})
    writer.add(rows("b", 0, 3, dropped=1).slice(0, 2))
    writer.add(rows("z", 1, 2, truncated=2))
    assert writer.written == [1] and writer.pending() == [0]
    writer.add(rows("a", 0, 2, truncated=1))
    assert writer.pending() == [0]  # 'b' still owes one row
    assert not (tmp_path / "shards" / "part-abc-00000.parquet").exists()
    writer.add(rows("b", 0, 3, dropped=1).slice(2, 1))
    assert writer.pending() == []
    shard0 = pq.read_table(tmp_path / "shards" / "part-abc-00000.parquet")
    assert shard0.column(S.SAMPLE_ID).to_pylist() == ["a/imgsyn/0", "a/imgsyn/1", "b/imgsyn/1", "b/imgsyn/2"]
    rejected = pq.read_table(tmp_path / "rejected" / "part-abc-00000.parquet")
    assert rejected.column(S.SOURCE_PATH).to_pylist() == ["/src/b.png"]
    summary = summarize_output(tmp_path)
    assert summary["rows"] == 6 and summary["rejected_rows"] == 1
    assert summary["drops_per_reason"] == {"image_constant": 1}
    assert summary["prompts_truncated"] == 3
    assert summary["shards"] == [{"file": "shards/part-abc-00000.parquet", "rows": 4},
                                 {"file": "shards/part-abc-00001.parquet", "rows": 2}]
    assert not list(tmp_path.rglob("*.tmp")) and not list((tmp_path / ".staging").rglob("*.arrow"))


def test_resent_rows_are_ignored_and_completion_records_are_small(tmp_path):
    assert dict(ShardRanges(5, 2)) == {0: 2, 1: 2, 2: 1}
    writer = ShardWriter(tmp_path, "abc", ShardRanges(3, 2))  # shard 0: 2 sources, shard 1: 1
    assert writer.add(rows("a", 0, 2)) == []
    assert writer.add(rows("a", 0, 2)) == []  # a retried task re-sends: nothing counted twice
    assert writer.buffered_rows() == 2
    records = writer.add(rows("b", 0, 2, dropped=1))
    assert records == [{"shard": 0, "kept": 3, "rejected": 1, "filtered": 0, "truncated": 0}]
    assert writer.add(rows("b", 0, 2)) == [] and writer.buffered_rows() == 0  # shard 0 is committed
    assert pq.read_table(tmp_path / "shards" / "part-abc-00000.parquet").num_rows == 3
    assert writer.pending() == [1]


def test_row_groups_are_bounded_by_rows_and_bytes_and_the_bytes_do_not_depend_on_arrival(tmp_path):
    big = b"x" * 1000
    table = pa.concat_tables([rows(f"s{i:02d}", 0, 3, image=big) for i in range(10)])  # 30 rows, one shard
    files = []
    for k, order in enumerate([range(10), reversed(range(10))]):
        out = tmp_path / f"o{k}"
        writer = ShardWriter(out, "abc", {0: 10}, row_group_rows=8, row_group_bytes=5 * 1001)
        for i in order:
            writer.add(table.slice(3 * i, 3))
        files.append((out / "shards" / "part-abc-00000.parquet").read_bytes())
    meta = pq.ParquetFile(tmp_path / "o0" / "shards" / "part-abc-00000.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [5, 5, 5, 5, 5, 5]  # 5 x 1001 payload bytes reach the byte cap before 8 rows
    assert files[0] == files[1]
    record = read_commits(ShardWriter(tmp_path / "o0", "abc", {0: 10}).out)[0]
    assert record["rows"] == 30 and record["row_groups"] == 6 and record["bytes"] == len(files[0])


def test_a_restarted_writer_picks_up_staged_rows(tmp_path):
    first = ShardWriter(tmp_path, "abc", {0: 2, 1: 1}, owns=lambda s: s == 0)
    first.add(rows("a", 0, 2))
    del first  # its process is gone; the staged rows are on storage
    again = ShardWriter(tmp_path, "abc", {0: 2, 1: 1}, owns=lambda s: s == 0)
    assert again.recovered == 2
    assert again.add(rows("b", 0, 1))[0]["kept"] == 3
    assert committed_shards(again.out, "abc") == {0}


def test_only_commit_records_count_and_a_rerun_removes_the_rest(tmp_path):
    writer = ShardWriter(tmp_path, "abc", {0: 1, 1: 1})
    writer.add(rows("a", 0, 1))
    writer.add(rows("b", 1, 2).slice(0, 1))  # staged, shard 1 unfinished
    # a partial object of a killed upload: the file exists, no record commits it
    (tmp_path / "shards" / "part-abc-00001.parquet").write_bytes(b"PAR1 truncated")
    assert committed_shards(writer.out, "abc") == {0}
    assert prepare_output(tmp_path, "abc", {}, overwrite=False) == {0}
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["part-abc-00000.parquet"]
    assert not (tmp_path / ".staging").exists()


def test_a_corrupt_commit_record_is_named(tmp_path):
    ShardWriter(tmp_path, "abc", {0: 1}).add(rows("a", 0, 1))
    record = tmp_path / "_commits" / "part-abc-00000.json"
    assert json.loads(record.read_text())["rows"] == 1
    record.write_text('{"shard": 0')
    with pytest.raises(CorruptCommit, match="part-abc-00000.json: corrupt commit record"):
        summarize_output(tmp_path)


def test_shards_written_before_commit_records_are_adopted_not_redone(tmp_path):
    from pipelines.commits import adopt_legacy_shards

    ShardWriter(tmp_path, "abc", {0: 1, 1: 1}).add(pa.concat_tables([rows("a", 0, 2, dropped=1), rows("b", 1, 1)]))
    records = {r["shard"]: r for r in read_commits(ShardWriter(tmp_path, "abc", {}).out)}
    for f in (tmp_path / "_commits").iterdir():  # as the writer left an output before records existed
        f.unlink()
    (tmp_path / "shards" / "part-abc-00001.parquet").write_bytes(b"PAR1 torn")  # unreadable: not adopted
    out = ShardWriter(tmp_path, "abc", {}).out
    assert adopt_legacy_shards(out, "abc") == 1
    adopted = read_commits(out)[0]
    assert {k: adopted[k] for k in records[0] if k not in ("bytes",)} == {k: records[0][k] for k in records[0]
                                                                         if k != "bytes"}
    assert prepare_output(tmp_path, "abc", {}, overwrite=False) == {0}  # the torn file is removed
    assert not (tmp_path / "shards" / "part-abc-00001.parquet").exists()
    assert adopt_legacy_shards(out, "abc") == 0  # records exist now: nothing to adopt


def test_training_reads_only_committed_shards(tmp_path):
    from training.data import _shard_files

    ShardWriter(tmp_path, "abc", {0: 1, 1: 1}).add(rows("a", 0, 1))
    (tmp_path / "shards" / "part-abc-00001.parquet").write_bytes(b"PAR1 a killed run's partial file")
    assert [f.rsplit("/", 1)[1] for f in _shard_files(str(tmp_path))] == ["part-abc-00000.parquet"]
