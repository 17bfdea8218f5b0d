"""Input kind detection (one page of names, never the whole tree), the account of the
files a listing skips (``input_skipped`` in summary.json) and local names that are not
UTF-8 (issue 17, points 1 and 2)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.io import filesystem
from manifests.config import ConfigError, InputConfig, StorageConfig
from pipeline.run import main
from stages import ingest, listing


def make_tar(path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def put_images(folder, good) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in good.items():
        (folder / name).write_bytes(data)
    return [str(folder / n) for n in good]


# --------------------------------------------------------------------------- detection

def test_images_with_shards_is_a_one_line_error_naming_the_counts(tmp_path, good, capsys):
    put_images(tmp_path / "in", good)
    for i in range(2):
        make_tar(tmp_path / "in" / f"part-{i}.tar", {f"{i:04d}.jpg": good["astronaut.jpg"]})
    rc = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{len(good)} image files" in err and "2 shards" in err and "input.kind" in err, err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_images_with_tables_or_shards_with_tables_are_ambiguous(tmp_path, good):
    put_images(tmp_path / "a", {"x.jpg": good["astronaut.jpg"]})
    pq.write_table(pa.table({"uri": ["x.jpg"]}), tmp_path / "a" / "labels.parquet")
    with pytest.raises(ConfigError, match="1 image files and 1 tables"):
        ingest.detect_kind(InputConfig(path=str(tmp_path / "a")), StorageConfig())
    make_tar(tmp_path / "b" / "s.tar", {"0.jpg": good["astronaut.jpg"]})
    (tmp_path / "b" / "meta.csv").write_text("uri\nx\n")
    with pytest.raises(ConfigError, match="1 shards .* and 1 tables"):
        ingest.detect_kind(InputConfig(path=str(tmp_path / "b")), StorageConfig())
    # an explicit kind is taken as given (the error's advice): no listing at all
    assert ingest.detect_kind(InputConfig(path=str(tmp_path / "a"), kind="folder"), StorageConfig()) == "folder"


def test_folder_of_only_shards_is_webdataset_at_any_depth(tmp_path, good):
    for day in ("01", "02"):  # date-partitioned, three levels down (today's maxdepth=2 missed them)
        make_tar(tmp_path / "2024" / "05" / day / "part-0.tar", {"0.jpg": good["astronaut.jpg"]})
    (tmp_path / "README.txt").write_text("shards by day")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    assert ingest.detect_kind(InputConfig(path=str(tmp_path)), StorageConfig()) == "webdataset"
    skipped = listing.Skipped()
    shards = ingest.list_shards([str(tmp_path)], StorageConfig(), skipped)
    assert len(shards) == 2
    assert skipped.to_dict() == {"count": 2, "by_extension": {"(hidden)": 1, ".txt": 1},
                                 "examples": sorted([str(tmp_path / ".DS_Store"), str(tmp_path / "README.txt")])}


def test_folder_of_only_tables_is_a_table_kind(tmp_path, good):
    pq.write_table(pa.table({"uuid": ["a"], "image": pa.array([good["astronaut.jpg"]], pa.binary())}),
                   tmp_path / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    assert ingest.detect_kind(InputConfig(path=str(tmp_path)), StorageConfig()) == "parquet_bytes"
    assert ingest.detect_kind(InputConfig(path=str(tmp_path), bytes_column="jpeg"), StorageConfig()) == "manifest"
    csvs = tmp_path / "csv"
    csvs.mkdir()
    (csvs / "a.csv").write_text("uri\nx.jpg\n")
    (csvs / "b.jsonl").write_text('{"uri": "y.jpg"}\n')
    assert ingest.detect_kind(InputConfig(path=str(csvs)), StorageConfig()) == "manifest"
    skipped = listing.Skipped()
    assert ingest.list_tables([str(tmp_path)], StorageConfig(), (".parquet",), skipped) == [
        str(tmp_path / "part-0.parquet")]
    assert skipped.by_extension == {"(none)": 1, ".csv": 1, ".jsonl": 1}


def test_local_detection_walks_a_bounded_sample(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"x")
    assert len(listing.sample_names(str(tmp_path), StorageConfig(), limit=10)) == 10
    assert listing.sample_names(str(tmp_path / "000.jpg"), StorageConfig()) == [str(tmp_path / "000.jpg")]


def put_many(endpoint, bucket, keys):
    """Objects straight into the loopback server's store (1,200 PUTs over HTTP take
    ~25 s here); everything read back goes through the S3 protocol."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for k in keys:
        store.put_object(bucket, k, b"x")


def _count_calls(fs):
    """Every S3 API call ``fs`` makes, by operation name (a botocore event hook)."""
    calls: list[str] = []
    fs.connect()

    def hook(model, **_):
        calls.append(model.name)

    fs.s3.meta.events.register("before-call.s3", hook)
    return calls, lambda: fs.s3.meta.events.unregister("before-call.s3", hook)


@pytest.mark.slow
def test_s3_detection_makes_one_list_call_and_listing_counts_what_it_skips(bucket):
    import boto3

    endpoint, name = bucket
    keys = [f"p/img/{i:05d}.jpg" for i in range(1200)] + ["p/zz/part-0.tar", "p/zz/part-1.tar"]
    put_many(endpoint, name, keys)
    storage = StorageConfig(endpoint_url=endpoint)
    fs, _ = filesystem(f"s3://{name}/p", storage)
    calls, done = _count_calls(fs)
    try:
        kind = ingest.detect_kind(InputConfig(path=f"s3://{name}/p"), storage)
    finally:
        done()
    assert calls == ["ListObjectsV2"]  # one page of 1000 keys, whatever the size of the prefix
    assert kind == "folder"  # the shards lie past the first page: the listing accounts for them
    skipped = listing.Skipped()
    _, dirs = ingest.split_listing(f"s3://{name}/p", storage, ["jpg"], skipped)
    listed = [u for d in dirs for u in ingest.list_prefix(d, storage, ["jpg"], skipped)]
    assert len(listed) == 1200
    assert skipped.to_dict() == {"count": 2, "by_extension": {".tar": 2},
                                 "examples": [f"s3://{name}/p/zz/part-0.tar", f"s3://{name}/p/zz/part-1.tar"]}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for i in range(0, len(keys), 1000):  # 2 calls (the fixture would delete them one by one)
        s3.delete_objects(Bucket=name, Delete={"Objects": [{"Key": k} for k in keys[i: i + 1000]]})


# --------------------------------------------------------------------------- names that are not UTF-8

def test_a_name_that_is_not_utf8_is_a_row_rejected_unsafe_path(tmp_path, good):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(good["astronaut.jpg"])
    uris = ingest.list_prefix(str(tmp_path), StorageConfig(), ["jpg"])
    rows = ingest.fetch_batch(ingest.uri_rows(uris), StorageConfig()).to_pylist()
    assert len(rows) == 1 and rows[0]["reason"] == "unsafe_path" and rows[0]["image_bytes"] is None
    assert rows[0]["uri"] == f"{tmp_path}/caf\\xe9.jpg"
    assert "caf\\\\xe9.jpg" in rows[0]["detail"] and "rename" in rows[0]["detail"]
    valid = ingest.uri_rows([f"{tmp_path}/caf\\xe9.jpg"])  # the same text, a real (valid) name: another id
    assert valid.column("id")[0] != rows[0]["id"] and valid.column("reason")[0].as_py() is None


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_run_counts_skipped_files_and_rejects_names_that_are_not_utf8(tmp_path, ray_local, good, capsys):
    from tests.test_pipeline import check_invariant

    src = tmp_path / "in"
    names = sorted(good)
    images = put_images(src, {n: good[n] for n in names[:3]})
    images += put_images(src / "sub" / "deep", {n: good[n] for n in names[3:6]})
    (src / "notes.txt").write_text("field notes")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "IMG_0001.HEIC").write_bytes(b"\0" * 64)
    make_tar(src / "sub" / "old.tar", {"0.jpg": good["astronaut.jpg"]})
    (src / "sub" / "meta.csv").write_text("uri\nx\n")
    (src / "sub" / "deep" / "README").write_text("readme")
    top, below = os.fsencode(str(src)), os.fsencode(str(src / "sub"))
    for raw in (top + b"/caf\xe9.jpg", below + b"/\xff\xfe.png", top + b"/d\xe9j\xe0/x.jpg"):
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as f:
            f.write(good["astronaut.jpg"])
    escaped = [f"{src}/caf\\xe9.jpg", f"{src}/sub/\\xff\\xfe.png", f"{src}/d\\xe9j\\xe0/x.jpg"]
    config = tmp_path / "c.yaml"  # a folder also holding a shard and a table: the kind must be said
    config.write_text(json.dumps({"input": {"path": str(src), "kind": "folder"}}))
    out = tmp_path / "run"

    assert main(["--config", str(config), "--output", str(out), "--until", "validate"]) == 0
    assert "6 files skipped" in capsys.readouterr().out
    curated, rejected = check_invariant(out, images + escaped)
    assert sorted(curated) == sorted(images)
    for uri in escaped:
        assert rejected[uri]["reason"] == "unsafe_path" and "rename" in rejected[uri]["detail"]
    summary = json.loads((out / "summary.json").read_text())
    want = {"count": 6, "by_extension": {"(hidden)": 1, "(none)": 1, ".csv": 1, ".heic": 1, ".tar": 1, ".txt": 1},
            "examples": sorted(str(p) for p in (src / ".DS_Store", src / "IMG_0001.HEIC", src / "notes.txt",
                                                src / "sub" / "deep" / "README", src / "sub" / "meta.csv"))}
    assert summary["input_skipped"] == want
    # --resume reads the count from the pass's marker (the listing reports are gone)
    marker = json.loads((out / "stages" / "validate" / "_SUCCESS").read_text())
    assert marker["counts"]["input_skipped"] == want and not (out / "stages" / "ingest.listing").exists()
