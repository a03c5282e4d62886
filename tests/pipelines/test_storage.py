"""core.storage against the local disk and a real S3 API (moto's server)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import storage as st


def _table() -> pa.Table:
    return pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})


def test_local_paths_keep_their_bytes_and_leave_no_temp(tmp_path):
    out = st.resolve(str(tmp_path / "out"), "output.path")
    assert out.is_local and not out.is_object_store and str(out) == str(tmp_path / "out")
    st.write_parquet(_table(), out / "shards" / "part-0.parquet")
    pq.write_table(_table(), tmp_path / "ref.parquet", compression="zstd")
    assert (tmp_path / "out/shards/part-0.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    st.write_text(out / "manifest.json", "{}")
    assert [x.name for x in st.listdir(out, recursive=True)] == ["manifest.json", "part-0.parquet"]
    assert [x.name for x in st.listdir(out / "shards", ".parquet")] == ["part-0.parquet"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert st.resolve(f"file://{tmp_path}/out").join("manifest.json").fs.type_name == "local"
    assert st.read_text(st.resolve(f"file://{tmp_path}/out/manifest.json")) == "{}"
    st.remove(out / "manifest.json")
    assert not st.exists(out / "manifest.json") and st.is_dir(out / "shards")


@pytest.mark.parametrize("bad, words", [("", "output.path: required"), ("  ", "output.path: required"),
                                        ("ftp://host/x", "unknown URI scheme 'ftp'"),
                                        ("s3://", "output.path=s3://: names no bucket")])
def test_bad_paths_are_one_line_errors_naming_the_key(bad, words):
    with pytest.raises(st.StorageError, match=words.replace("(", r"\(")) as e:
        st.resolve(bad, "output.path")
    assert "\n" not in str(e.value)


def test_s3_round_trip_whole_objects_and_listing(s3_bucket):
    root = st.resolve(f"{s3_bucket}/data", "output.path")
    assert root.is_object_store and root.path == s3_bucket[5:] + "/data"
    st.check_writable_root(root)
    st.makedirs(root)
    st.write_parquet(_table(), root / "shards" / "part-0.parquet")
    st.write_bytes(root / "rejected" / "x.bin", b"\x00\x01")
    names = [x.uri for x in st.listdir(root, recursive=True)]
    assert names == [f"{s3_bucket}/data/rejected/x.bin", f"{s3_bucket}/data/shards/part-0.parquet"]
    assert pq.read_table(f"{root.path}/shards/part-0.parquet", filesystem=root.fs).equals(_table())
    assert st.read_bytes(root / "rejected" / "x.bin") == b"\x00\x01"
    assert st.is_file(root / "rejected" / "x.bin") and st.is_dir(root / "shards")
    st.remove(root / "rejected" / "x.bin")
    assert not st.exists(root / "rejected" / "x.bin")
    with pytest.raises(FileNotFoundError):
        st.read_bytes(root / "nope")


def test_missing_bucket_is_named(s3_server):
    loc = st.resolve("s3://no-such-bucket-here/out", "output.path")
    with pytest.raises(st.StorageError, match="s3://no-such-bucket-here/out: bucket 'no-such-bucket-here' does not"):
        st.check_writable_root(loc)
