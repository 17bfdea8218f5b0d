"""Webdataset shards that try to break the run: gzip bombs, huge sidecars, names that are
not UTF-8, repeated names, a connection reset mid-shard, members cut off; objects and
parquet cells over max_bytes. All built on the fly (pipeline.testdata.hostile), read for real."""

from __future__ import annotations

import hashlib
import io
import json
import time
import tarfile
import tracemalloc

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from manifests.schema import BYTES
from pipeline.testdata import hostile
from manifests.config import StorageConfig
from stages import ingest, reads, shards
from stages.kernels.hashing import stable_id

EXT = ["jpg", "png", "webp"]
FAST = StorageConfig(retry_base_s=0.001, max_retries=3)


def read_shard(uri, storage=FAST, **kw):
    return [r for t in shards.iter_shard(str(uri), storage, EXT, 100, **kw) for r in t.to_pylist()]


def by_member(rows):
    return {r["uri"].split("#", 1)[1] if "#" in r["uri"] else "<shard>": r for r in rows}


def traced(fn):
    """(result, peak bytes Python allocated while ``fn`` ran)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- bounded reads

def test_gzip_bomb_member_is_skipped_in_bounded_memory(tmp_path, good):
    # 128 MiB of zeros in a ~130 KB .tar.gz, then a real image that must still be read.
    bomb = hostile.gzip_bomb_tar(tmp_path / "bomb.tar.gz", 128 << 20, after=[("s/0001.jpg", good["astronaut.jpg"])])
    assert bomb.stat().st_size < 1 << 20
    rows, peak = traced(lambda: by_member(read_shard(bomb)))
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held to skip a 128 MiB member"
    assert rows["bomb/0000.jpg"]["reason"] == "file_too_large" and rows["bomb/0000.jpg"][BYTES] is None
    assert str(128 << 20) in rows["bomb/0000.jpg"]["detail"]
    assert rows["s/0001.jpg"]["reason"] is None and rows["s/0001.jpg"][BYTES] == good["astronaut.jpg"]


def test_many_images_under_one_key_are_held_at_most_sample_bytes(tmp_path):
    """Rows of a sample are emitted when its key changes: 40 members of 5 MiB under one key
    (200 MiB) were all held at once; now past shards.SAMPLE_BYTES they are rejected."""
    path = tmp_path / "onekey.tar.gz"
    zeros = b"\0" * (5 << 20)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(40):
            info = tarfile.TarInfo(f"x.{i:02d}.jpg")
            info.size = len(zeros)
            tar.addfile(info, io.BytesIO(zeros))
    rows, peak = traced(lambda: read_shard(path))
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    held = [r for r in rows if r["reason"] is None]
    over = [r for r in rows if r["reason"] == "file_too_large"]
    assert len(held) == shards.SAMPLE_BYTES // len(zeros) and len(held) + len(over) == 40
    assert all("per sample" in r["detail"] for r in over)
    # the held bytes and their Arrow copy in the emitted block (was: 200 MiB twice)
    assert peak < 2 * shards.SAMPLE_BYTES + (32 << 20), f"{peak / 2**20:.0f} MiB held"


def test_member_declaring_more_than_max_skip_bytes_stops_the_shard_at_once(tmp_path, good):
    bomb = hostile.gzip_bomb_tar(tmp_path / "big.tar.gz", 300 << 20, after=[("s/0001.jpg", good["astronaut.jpg"])])
    t0 = time.perf_counter()
    rows, peak = traced(lambda: read_shard(bomb))
    assert time.perf_counter() - t0 < 1.0 and peak < 4 << 20
    got = by_member(rows)
    assert set(got) == {"bomb/0000.jpg", "<shard>"}  # nothing after the member was reached
    assert got["bomb/0000.jpg"]["reason"] == "file_too_large" and "max_skip_bytes" in got["bomb/0000.jpg"]["detail"]
    assert got["<shard>"]["reason"] == "file_too_large" and "not reached" in got["<shard>"]["detail"]


def test_huge_sidecar_is_not_read_and_its_sample_is_rejected(tmp_path, good):
    shard = hostile.huge_sidecar_tar(tmp_path / "side.tar", good["astronaut.jpg"], 32 << 20)
    rows, peak = traced(lambda: read_shard(shard))
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB held for a 32 MiB sidecar"
    (row,) = rows
    assert row["uri"].endswith("#s/0001.jpg") and row["reason"] == "file_too_large" and row[BYTES] is None
    assert "'s/0001.json'" in row["detail"] and str(32 << 20) in row["detail"] and "max_sidecar_bytes" in row["detail"]


class CountingFS(MemoryFileSystem):
    """In-memory objects; counts the bytes each read hands out."""

    protocol = "counting-h2"
    given: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("counting-h2://"))

    def cat_file(self, path, start=None, end=None, **kw):
        out = super().cat_file(path, start, end, **kw)
        CountingFS.given[path] = CountingFS.given.get(path, 0) + len(out)
        return out


fsspec.register_implementation("counting-h2", CountingFS, clobber=True)


def test_object_over_max_bytes_is_not_read_whole():
    fs = CountingFS()
    fs.pipe_file("/o/big.jpg", b"x" * 5_000_000)
    fs.pipe_file("/o/ok.jpg", b"y" * 1000)
    CountingFS.given = {}
    rows = ingest.uri_rows(["counting-h2:///o/big.jpg", "counting-h2:///o/ok.jpg"])
    out = ingest.fetch_batch(rows, StorageConfig(allowed_protocols=["counting-h2"]), max_bytes=1000).to_pylist()
    assert out[0]["reason"] == "file_too_large" and "5000000 bytes > max_bytes 1000" in out[0]["detail"]
    assert out[0][BYTES] is None and CountingFS.given["/o/big.jpg"] <= 1001
    assert out[1]["reason"] is None and out[1][BYTES] == b"y" * 1000


@pytest.mark.slow
def test_object_size_bound_on_s3_is_one_ranged_get(bucket):
    import boto3

    endpoint, name = bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for key, body in (("big.jpg", b"x" * 50_000), ("ok.jpg", b"y" * 10), ("empty.jpg", b"")):
        s3.put_object(Bucket=name, Key=key, Body=body)
    rows = ingest.uri_rows([f"s3://{name}/{k}" for k in ("big.jpg", "ok.jpg", "empty.jpg")])
    out = ingest.fetch_batch(rows, StorageConfig(endpoint_url=endpoint), max_bytes=1000).to_pylist()
    assert [r["reason"] for r in out] == ["file_too_large", None, None]
    assert "50000 bytes" in out[0]["detail"] and [r[BYTES] for r in out[1:]] == [b"y" * 10, b""]


def _parquet(path, groups: list[dict]) -> str:
    """A zstd parquet file, one row group per dict of columns."""
    tables = [pa.table(g) for g in groups]
    with pq.ParquetWriter(path, tables[0].schema, compression="zstd") as w:
        for t in tables:
            w.write_table(t)
    return str(path)


def test_parquet_cells_over_max_bytes_are_checked_before_use(tmp_path):
    small = [b"a" * 100, b"b" * 100, b"c" * 100]
    uri = _parquet(tmp_path / "p.parquet", [
        {"uuid": ["u0", "u1", "u2", "u3"], "image": small[:2] + [b"\xff" * 3_000_000, small[2]]},
        {"uuid": ["bomb"], "image": [bytes(64 << 20)]},  # a few KB on disk, 64 MiB inflated
    ])
    groups = ingest.parquet_row_groups(pa.table({"file": [uri]}), StorageConfig())
    meta = pa.concat_tables([ingest.parquet_metadata_rows(groups.slice(i, 1), StorageConfig(), "image")
                             for i in range(len(groups))])

    def read():
        return [r for rg in (0, 1) for r in ingest.parquet_selected_images(
            meta.filter(pc.equal(meta[ingest.PQ_GROUP], rg)), StorageConfig(), "image", "uuid",
            max_bytes=1_000_000).to_pylist()]

    rows, peak = traced(read)
    got = {r["uuid"]: r for r in rows}
    assert [got[k][BYTES] for k in ("u0", "u1", "u3")] == small and got["u0"]["reason"] is None
    assert got["u2"]["reason"] == "file_too_large" and "3000000 bytes" in got["u2"]["detail"]
    assert got["bomb"]["reason"] == "file_too_large" and "row group 1" in got["bomb"]["detail"]
    assert got["bomb"][BYTES] is None and peak < 16 << 20


def test_parquet_metadata_cell_over_the_cap_is_not_read(tmp_path):
    uri = _parquet(tmp_path / "m.parquet", [
        {"uuid": ["a", "b"], "caption": ["ok", "é" * (4 << 20)], "image": [b"x", b"y"]},
        {"uuid": ["c"], "caption": ["fine"], "image": [b"z"]},
    ])
    groups = ingest.parquet_row_groups(pa.table({"file": [uri]}), StorageConfig())
    rows = pa.concat_tables([ingest.parquet_metadata_rows(groups.slice(i, 1), StorageConfig(), "image")
                             for i in range(len(groups))], promote_options="default").to_pylist()
    got = {r["uuid"]: r for r in rows}
    assert got["a"]["reason"] == got["b"]["reason"] == "file_too_large" and got["a"]["caption"] is None
    assert "caption" in got["b"]["detail"] and "max_sidecar_bytes" in got["b"]["detail"]
    assert got["c"]["caption"] == "fine" and got["c"].get("reason") is None


# --------------------------------------------------------------------------- names

def test_member_names_that_are_not_utf8_get_ids_from_their_bytes(tmp_path, good):
    images = [good["astronaut.jpg"], good["chelsea.webp"]]
    shard = hostile.non_utf8_tar(tmp_path / "latin1.tar", images)
    rows = read_shard(shard)
    assert [r["reason"] for r in rows] == [None, None] and [r[BYTES] for r in rows] == images
    for raw, r in zip(hostile.NON_UTF8_NAMES, rows):
        assert r["id"] == hashlib.blake2b(f"{shard}#".encode() + raw, digest_size=16).hexdigest()
        assert r["uri"] == f"{shard}#" + raw.decode("utf-8", "backslashreplace")
    assert rows[0]["uri"].endswith("#s/caf\\xe9.jpg")
    # the uri finds the member again (thumbnails, export)
    refs = {r["uri"].split("#", 1)[1] for r in rows}
    assert shards.read_members(str(shard), StorageConfig(), refs) == {
        r["uri"].split("#", 1)[1]: im for r, im in zip(rows, images)}


def test_a_repeated_member_name_gets_one_row_and_id_per_occurrence(tmp_path, good):
    images = [good["astronaut.jpg"], good["chelsea.webp"], good["rotated6.jpg"]]
    shard = hostile.duplicate_names_tar(tmp_path / "dup.tar", images)
    rows = read_shard(shard)
    assert [r[BYTES] for r in rows] == images and len({r["id"] for r in rows}) == 3
    assert rows[0]["id"] == stable_id(f"{shard}#s/0001.jpg")  # the first keeps the id it always had
    assert rows[1]["id"] == stable_id(f"{shard}#s/0001.jpg\x002")
    assert [r["uri"].split("#", 1)[1] for r in rows] == ["s/0001.jpg", "s/0001.jpg#2", "s/0001.jpg#3"]
    got = shards.read_members(str(shard), StorageConfig(), {"s/0001.jpg#2", "s/0001.jpg#3"})
    assert got == {"s/0001.jpg#2": images[1], "s/0001.jpg#3": images[2]}


# --------------------------------------------------------------------------- errors mid-shard

class ResetFS(MemoryFileSystem):
    """In-memory files whose reads fail with a connection reset once ``fail_after`` bytes
    of the file were handed out, ``fail_times`` times per path."""

    protocol = "resetting"
    fail_after = 0
    fail_times = 1
    failures: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("resetting://"))

    def _open(self, path, mode="rb", **kw):
        if "r" not in mode:
            return super()._open(path, mode, **kw)
        return _ResettingFile(self.cat_file(path), self._strip_protocol(path))


class _ResettingFile(io.BytesIO):
    def __init__(self, data: bytes, path: str):
        super().__init__(data)
        self.path = path

    def read(self, n=-1):
        out = super().read(n)
        if self.tell() > ResetFS.fail_after and ResetFS.failures.get(self.path, 0) < ResetFS.fail_times:
            ResetFS.failures[self.path] = ResetFS.failures.get(self.path, 0) + 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return out


fsspec.register_implementation("resetting", ResetFS, clobber=True)


@pytest.fixture
def reset_shard(good):
    """A 10-member .tar.gz of real images on a filesystem that resets mid-shard."""
    names = [n for n in sorted(good) if n.rsplit(".", 1)[1] in EXT]
    members = [(f"s/{i:04d}.{n.rsplit('.', 1)[1]}", good[n]) for i, n in enumerate((names * 2)[:10])]
    data = hostile.gzip_repeats([(hostile.tar_bytes(members), 1)])
    fs = ResetFS()
    fs.pipe_file("/c/s.tar.gz", data)
    ResetFS.fail_after, ResetFS.failures = len(data) // 2, {}
    return "resetting:///c/s.tar.gz", members


def test_connection_reset_mid_shard_is_retried_from_where_it_stopped(reset_shard):
    uri, members = reset_shard
    ResetFS.fail_times = 1
    rows = read_shard(uri)
    assert ResetFS.failures == {"/c/s.tar.gz": 1}
    assert [r["uri"].split("#", 1)[1] for r in rows] == [m for m, _ in members]  # each member exactly once
    assert all(r["reason"] is None for r in rows) and [r[BYTES] for r in rows] == [d for _, d in members]


def test_connection_reset_that_persists_fails_or_rejects_the_rest(reset_shard):
    uri, members = reset_shard
    ResetFS.fail_times = 100
    with pytest.raises(reads.TransientReadError, match="not reached"):
        read_shard(uri)
    ResetFS.failures = {}
    rows = read_shard(uri, FAST.model_copy(update={"on_transient_exhausted": "reject"}))
    alive = [r for r in rows if r["reason"] is None]
    assert 0 < len(alive) < 10 and [r[BYTES] for r in alive] == [d for _, d in members[:len(alive)]]
    (rest,) = [r for r in rows if r["reason"] is not None]
    assert rest["reason"] == "read_error" and "#" not in rest["uri"]
    assert f"{len(alive)} members read" in rest["detail"] and "not reached" in rest["detail"]


@pytest.mark.parametrize("gz", [False, True])
def test_member_cut_off_mid_read_is_a_read_error_not_missing(tmp_path, good, gz):
    members = [("s/0001.jpg", good["astronaut.jpg"]), ("s/0002.json", b'{"species": "x"}'),
               ("s/0002.jpg", good["rotated6.jpg"])]
    data = hostile.tar_bytes(members)
    data = data[: len(data) - 1024 - len(good["rotated6.jpg"]) // 2]  # half of the last member's data
    shard = tmp_path / ("cut.tar.gz" if gz else "cut.tar")
    shard.write_bytes(hostile.gzip_repeats([(data, 1)]) if gz else data)
    rows = by_member(read_shard(shard))
    assert set(rows) == {"s/0001.jpg", "s/0002.jpg", "<shard>"}  # no 'sample has no image' row
    assert rows["s/0001.jpg"]["reason"] is None
    assert rows["s/0002.jpg"]["reason"] == "read_error" and "cut off" in rows["s/0002.jpg"]["detail"]
    assert rows["<shard>"]["reason"] == "read_error" and "broken" in rows["<shard>"]["detail"]


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_hostile_shards_end_to_end(tmp_path, ray_local, good):
    """One run over a folder of hostile shards: exit 0, every member exactly once in
    curated or rejected, each with the expected reason."""
    from manifests.io import read_committed_table
    from pipeline import run

    d = tmp_path / "shards"
    d.mkdir()
    img = good["astronaut.jpg"]
    hostile.gzip_bomb_tar(d / "bomb.tar.gz", 40 << 20, after=[("s/0001.jpg", img)])
    hostile.huge_sidecar_tar(d / "side.tar", img, 2_000_000)
    hostile.non_utf8_tar(d / "latin1.tar", [img, good["chelsea.webp"]])
    hostile.duplicate_names_tar(d / "dup.tar", [img, good["rotated6.jpg"]])
    cut = hostile.tar_bytes([("s/0001.jpg", img), ("s/0002.jpg", good["rotated6.jpg"])])
    (d / "cut.tar").write_bytes(cut[: len(cut) - 1024 - len(good["rotated6.jpg"]) // 2])
    expected = {  # uri -> ingest reason (None: read, validate decides)
        f"{d}/bomb.tar.gz#bomb/0000.jpg": "file_too_large", f"{d}/bomb.tar.gz#s/0001.jpg": None,
        f"{d}/side.tar#s/0001.jpg": "file_too_large",
        f"{d}/latin1.tar#s/caf\\xe9.jpg": None, f"{d}/latin1.tar#s/\\xff\\xfe.jpg": None,
        f"{d}/dup.tar#s/0001.jpg": None, f"{d}/dup.tar#s/0001.jpg#2": None,
        f"{d}/cut.tar#s/0001.jpg": None, f"{d}/cut.tar#s/0002.jpg": "read_error", f"{d}/cut.tar": "read_error",
    }
    (tmp_path / "c.yaml").write_text(json.dumps({"input": {"path": str(d), "kind": "webdataset"}}))
    out = tmp_path / "run"
    assert run.main(["--config", str(tmp_path / "c.yaml"), "--output", str(out), "--until", "validate"]) == 0
    curated = read_committed_table(f"{out}/curated").to_pylist()
    rejected = read_committed_table(f"{out}/rejected").to_pylist()
    rows = curated + rejected
    assert sorted(r["uri"] for r in rows) == sorted(expected) and len({r["id"] for r in rows}) == len(rows)
    for r in rejected:
        assert r["detail"], r
        if expected[r["uri"]] is not None:
            assert (r["stage"], r["reason"]) == ("ingest", expected[r["uri"]]), r
        else:
            assert r["stage"] != "ingest", r
    assert {r["uri"] for r in curated} <= {u for u, why in expected.items() if why is None}
