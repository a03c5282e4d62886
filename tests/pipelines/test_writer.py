"""The shard writer: a shard is written only once every source row is accounted for."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from core import schema as S
from pipelines.stages import SIBLINGS
from pipelines.writer import ShardWriter, summarize_output


def rows(source: str, shard: int, n: int, dropped: int = 0, truncated: int = 0) -> pa.Table:
    return pa.Table.from_pylist([{
        S.SAMPLE_ID: f"{source}/imgsyn/{k}", S.SOURCE_ID: source, S.METHOD: "imgsyn", S.CAPTION: "c",
        S.PROMPT: "c", S.IMAGE: b"i", S.MASK: b"m", S.HEIGHT: 1, S.WIDTH: 1, S.SEED: k, S.GENERATOR: "g",
        S.DROP_REASON: "image_constant" if k < dropped else "", S.SHARD: shard, SIBLINGS: n,
        S.SOURCE_PATH: f"/src/{source}.png", S.PROMPT_TRUNCATED: int(k < truncated)} for k in range(n)])


def test_shard_written_when_complete_sorted_split_and_counted(tmp_path):
    writer = ShardWriter(tmp_path, "abc", {0: 2, 1: 1})
    writer.add(rows("b", 0, 3, dropped=1).slice(0, 2))
    writer.add(rows("z", 1, 2, truncated=2))
    assert writer.written == [1] and writer.pending() == [0]
    writer.add(rows("a", 0, 2, truncated=1))
    assert writer.pending() == [0]  # 'b' still owes one row
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
    assert not list(tmp_path.rglob("*.tmp"))


def test_resent_rows_are_ignored_and_completion_records_are_small(tmp_path):
    from pipelines.writer import ShardRanges

    assert dict(ShardRanges(5, 2)) == {0: 2, 1: 2, 2: 1}
    writer = ShardWriter(tmp_path, "abc", ShardRanges(3, 2))  # shard 0: 2 sources, shard 1: 1
    assert writer.add(rows("a", 0, 2)) == []
    assert writer.add(rows("a", 0, 2)) == []  # a retried task re-sends: nothing counted twice
    assert writer.buffered_rows() == 2
    records = writer.add(rows("b", 0, 2, dropped=1))
    assert records == [{"shard": 0, "kept": 3, "rejected": 1, "filtered": 0, "truncated": 0}]
    assert writer.add(rows("b", 0, 2)) == [] and writer.buffered_rows() == 0  # shard 0 is written
    assert pq.read_table(tmp_path / "shards" / "part-abc-00000.parquet").num_rows == 3
    assert writer.pending() == [1]
