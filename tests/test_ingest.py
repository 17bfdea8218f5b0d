"""Ingest without Ray: listing, concurrent fetch with retries, webdataset shards, parquet
with bytes, manifests, S3 through s3fs against a real S3-protocol server."""

import io
import json
import tarfile

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.io import filesystem
from manifests.schema import BYTES, Reason
from manifests.config import InputConfig, StorageConfig
from stages import ingest, reads

FAST = StorageConfig(retry_base_s=0.001, max_retries=3, allowed_protocols=["flaky"])


class FlakyFS(MemoryFileSystem):
    """An in-memory filesystem whose reads fail transiently ``fail_times`` times per path."""

    protocol = "flaky"
    fail_times = 2
    calls: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kw):
        n = FlakyFS.calls.get(path, 0)
        FlakyFS.calls[path] = n + 1
        if n < FlakyFS.fail_times:
            raise OSError(f"SlowDown: please reduce your request rate (attempt {n})")
        return super().cat_file(path, start, end, **kw)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.fixture
def flaky():
    fs = FlakyFS()
    fs.store.clear()
    FlakyFS.calls = {}
    fs.pipe_file("/c/a.jpg", b"AAA")
    fs.pipe_file("/c/b.jpg", b"BBB")
    return fs


def _rows(uris):
    return ingest.uri_rows(uris)


def test_transient_errors_are_retried_then_read(flaky):
    FlakyFS.fail_times = 2
    out = ingest.fetch_batch(_rows(["flaky:///c/a.jpg", "flaky:///c/b.jpg"]), FAST)
    assert out.column(BYTES).to_pylist() == [b"AAA", b"BBB"]
    assert out.column("reason").to_pylist() == [None, None]
    assert FlakyFS.calls["/c/a.jpg"] == 3


def test_transient_errors_that_persist_fail_loudly_or_reject(flaky):
    FlakyFS.fail_times = 100
    with pytest.raises(reads.TransientReadError, match="persisted after 3 retries"):
        ingest.fetch_batch(_rows(["flaky:///c/a.jpg"]), FAST)
    out = ingest.fetch_batch(_rows(["flaky:///c/a.jpg"]), FAST.model_copy(update={"on_transient_exhausted": "reject"}))
    assert out.column("reason").to_pylist() == ["read_error"]
    assert "persisted" in out.column("detail")[0].as_py()


def test_permanent_errors_are_rejects_without_retry(flaky, tmp_path):
    FlakyFS.fail_times = 0
    out = ingest.fetch_batch(_rows(["flaky:///c/nope.jpg", str(tmp_path / "missing.jpg"), ""]), FAST)
    assert out.column("reason").to_pylist() == ["missing", "missing", "missing"]
    assert out.column("stage").to_pylist() == ["ingest"] * 3
    assert FlakyFS.calls["/c/nope.jpg"] == 1


def test_error_classification():
    assert reads.classify_error(FileNotFoundError("x")) == Reason.MISSING
    assert reads.classify_error(PermissionError("x")) == Reason.PERMISSION_DENIED
    assert reads.classify_error(TimeoutError()) is None
    assert reads.classify_error(OSError("An error occurred (ServiceUnavailable) ... 503")) is None
    assert reads.classify_error(ValueError("bad")) == Reason.READ_ERROR


def test_folder_listing_is_split_by_subfolder(tmp_path, good):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "top.jpg").write_bytes(good["astronaut.jpg"])
    (tmp_path / "a" / "x.png").write_bytes(good["coffee.png"])
    (tmp_path / "a" / "b" / "y.webp").write_bytes(good["chelsea.webp"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    files, dirs = ingest.split_listing(str(tmp_path), StorageConfig(), InputConfig(path=".").extensions)
    assert files == [str(tmp_path / "top.jpg")] and dirs == [str(tmp_path / "a")]
    below = ingest.list_prefix(dirs[0], StorageConfig(), InputConfig(path=".").extensions)
    assert below == [str(tmp_path / "a" / "b" / "y.webp"), str(tmp_path / "a" / "x.png")]


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_shard(path, good, gz=False):
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        _add(tar, "s/0001.jpg", good["astronaut.jpg"])
        _add(tar, "s/0001.json", json.dumps({"species": "Homo sapiens"}).encode())
        _add(tar, "s/0001.com.txt", b"human")
        _add(tar, "s/0002.png", good["coffee.png"])
        _add(tar, "s/0003.json", b"{}")  # no image
        _add(tar, "../../etc/evil.jpg", good["astronaut.jpg"])
        _add(tar, "s/link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "s/0004.webp", good["chelsea.webp"])
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_webdataset_shard_rows_sidecars_and_unsafe_members(tmp_path, good, gz):
    shard = str(make_shard(tmp_path / ("s.tar.gz" if gz else "s.tar"), good, gz))
    tables = list(ingest.iter_shard(shard, StorageConfig(), InputConfig(path=".").extensions, rows_per_block=2))
    assert len(tables) >= 2  # streamed in blocks
    rows = {r["uri"].split("#", 1)[1]: r for t in tables for r in t.to_pylist()}
    assert rows["s/0001.jpg"][BYTES] == good["astronaut.jpg"] and rows["s/0001.jpg"]["key"] == "s/0001"
    assert json.loads(rows["s/0001.jpg"]["sidecars"]) == {"json": '{"species": "Homo sapiens"}', "com.txt": "human"}
    assert rows["s/0002.png"]["reason"] is None and rows["s/0004.webp"]["reason"] is None
    assert rows["s/0003"]["reason"] == "missing"
    assert rows["../../etc/evil.jpg"]["reason"] == "unsafe_path" and rows["../../etc/evil.jpg"][BYTES] is None
    assert rows["s/link.jpg"]["reason"] == "unsafe_path"
    assert len(rows) == 6 and len({r["id"] for r in rows.values()}) == 6


def test_broken_gzip_shard_keeps_rows_read_before_the_break(tmp_path, good):
    shard = make_shard(tmp_path / "s.tar.gz", good, gz=True)
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    rows = [r for t in ingest.iter_shard(str(cut), StorageConfig(), ["jpg", "png", "webp"], 100) for r in t.to_pylist()]
    broken = [r for r in rows if r["reason"] == "read_error" and "#" not in r["uri"]]  # the shard-level reject
    assert len(broken) == 1 and "broken" in broken[0]["detail"]
    assert any(r["reason"] is None for r in rows)  # the members before the break survive


def test_missing_shard_is_a_reject(tmp_path):
    rows = [r for t in ingest.iter_shard(str(tmp_path / "nope.tar"), StorageConfig(), ["jpg"], 10) for r in t.to_pylist()]
    assert [r["reason"] for r in rows] == ["missing"]


def test_parquet_bytes_rows(good):
    t = pa.table({"uuid": ["u1", "u2"], "image": [good["astronaut.jpg"], None], "species": ["a", "b"],
                  "path": ["/d/f.parquet"] * 2})
    out = ingest.parquet_bytes_batch(t, "image", "uuid")
    assert out.column("uri").to_pylist() == ["/d/f.parquet#uuid=u1", "/d/f.parquet#uuid=u2"]
    assert out.column("species").to_pylist() == ["a", "b"]
    assert out.column("reason").to_pylist() == [None, "missing"]
    assert ingest.resolve_key_column(["x", "uuid"], InputConfig(path=".")) == "uuid"
    with pytest.raises(ValueError, match="input.key_column"):
        ingest.resolve_key_column(["x"], InputConfig(path="."))


def _put(endpoint, bucket, key, data):
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(Bucket=bucket, Key=key, Body=data)


def test_s3_listing_and_fetch_against_a_real_s3_server(bucket, good):
    endpoint, name = bucket
    _put(endpoint, name, "img/a.jpg", good["astronaut.jpg"])
    _put(endpoint, name, "img/sub/b.png", good["coffee.png"])
    _put(endpoint, name, "img/sub/deep/c.webp", good["chelsea.webp"])
    storage = StorageConfig(endpoint_url=endpoint)
    files, dirs = ingest.split_listing(f"s3://{name}/img", storage, ["jpg", "png", "webp"])
    assert files == [f"s3://{name}/img/a.jpg"] and dirs == [f"s3://{name}/img/sub"]
    below = ingest.list_prefix(dirs[0], storage, ["jpg", "png", "webp"])
    assert below == [f"s3://{name}/img/sub/b.png", f"s3://{name}/img/sub/deep/c.webp"]
    out = ingest.fetch_batch(_rows(files + below + [f"s3://{name}/img/missing.jpg"]), storage)
    assert out.column(BYTES).to_pylist()[:3] == [good["astronaut.jpg"], good["coffee.png"], good["chelsea.webp"]]
    assert out.column("reason").to_pylist() == [None, None, None, "missing"]


def test_s3_endpoint_from_environment(bucket, good, monkeypatch):
    endpoint, name = bucket
    _put(endpoint, name, "x.jpg", good["astronaut.jpg"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    fs, path = filesystem(f"s3://{name}/x.jpg", StorageConfig())
    assert fs.cat_file(path) == good["astronaut.jpg"]


def test_large_flat_s3_prefix_is_listed_in_parallel_key_ranges(bucket):
    import boto3

    endpoint, name = bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [f"flat/{c}{i:04d}.jpg" for c in "-0Aaz~" for i in range(200)]  # edges of the ranges too
    keys += ["flat/a", "flat/0.jpg", "flat/z.jpg", "flat/sub/deep.png", "flat/notes.txt"]
    for k in keys:
        s3.put_object(Bucket=name, Key=k, Body=b"x")
    storage = StorageConfig(endpoint_url=endpoint)
    files, tasks = ingest.split_listing(f"s3://{name}/flat", storage, ["jpg", "png"])
    assert files == [] and len(tasks) == len(ingest.KEY_RANGE_BOUNDS) + 1
    listed = [u for t in tasks for u in ingest.list_prefix(t, storage, ["jpg", "png"])]
    want = sorted(f"s3://{name}/{k}" for k in keys if k.endswith((".jpg", ".png")))
    assert sorted(listed) == want and len(listed) == len(set(listed))  # complete and disjoint
    small, _ = ingest.split_listing(f"s3://{name}/flat/sub", storage, ["png"])
    assert small == [f"s3://{name}/flat/sub/deep.png"]  # a small prefix: listed level by level
