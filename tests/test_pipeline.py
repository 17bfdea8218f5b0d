"""End to end through real Ray Data: every input layout, local and S3, the invariant
(each input exactly once in curated or rejected), resume, --until. (Determinism of every
stage: tests/test_refresh.py.)"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from manifests.io import filesystem, is_committed, read_committed_table
from manifests.schema import BYTES, Reason
from pipeline import plan
from pipeline.testdata import images
from manifests.config import StorageConfig, load_config

pytestmark = pytest.mark.slow


def run(input_path, out, ray_local, until="exact_dedup", resume=False, **overrides):
    cfg = load_config(None, {"input.path": input_path, "output": str(out), **overrides})
    return plan.run(cfg, until=until, resume=resume)


def tables(out, storage=None):
    return (read_committed_table(f"{out}/curated", storage).to_pylist(),
            read_committed_table(f"{out}/rejected", storage).to_pylist())


def check_invariant(out, expected_uris, storage=None):
    """Each input exactly once in curated ∪ rejected; each reject fully explained."""
    curated, rejected = tables(out, storage)
    uris = sorted(r["uri"] for r in curated + rejected)
    assert uris == sorted(expected_uris)
    ids = [r["id"] for r in curated + rejected]
    assert len(ids) == len(set(ids))
    valid = {r.value for r in Reason}
    for r in rejected:
        assert r["stage"] and r["reason"] in valid and r["detail"], r
    for r in curated:
        assert BYTES not in r and "reason" not in r
    return {r["uri"]: r for r in curated}, {r["uri"]: r for r in rejected}


def folder_corpus(root, good, hostile):
    """Real encoded images in nested folders + hostile files + duplicates + placeholders."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    files = {}
    for i, (name, data) in enumerate(sorted(good.items())):
        files[["", "a/", "a/b/"][i % 3] + name] = data
    for name, (data, _) in hostile.items():
        files["c/" + name] = data
    wrong_name, wrong = images.wrong_extension()
    files["c/" + wrong_name] = wrong
    files["c/astronaut_copy.jpg"] = good["astronaut.jpg"]  # exact duplicate
    placeholder = images.encode(images.Image.new("RGB", (200, 150), (128, 128, 128)), "PNG")
    for i in range(3):
        files[f"a/unavailable_{i}.png"] = placeholder
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def test_folder_run_accounts_for_every_input(tmp_path, ray_local, good, hostile):
    files = folder_corpus(tmp_path / "in", good, hostile)
    out = tmp_path / "run"
    summary = run(str(tmp_path / "in"), out, ray_local, **{"exact_dedup.placeholder_min_copies": 3})
    curated, rejected = check_invariant(out, [str(tmp_path / "in" / f) for f in files])
    by_name = {u.split("/in/", 1)[1]: r for u, r in rejected.items()}
    for name, (_, reason) in hostile.items():
        assert by_name["c/" + name]["reason"] == reason, name
    for i in range(3):
        assert by_name[f"a/unavailable_{i}.png"]["reason"] == "placeholder"
    original = next(f for f in files if f.endswith("/astronaut.jpg") or f == "astronaut.jpg")
    pair = [f"{tmp_path}/in/c/astronaut_copy.jpg", f"{tmp_path}/in/{original}"]
    kept = [u for u in pair if u in curated]
    dropped = [u for u in pair if u in rejected]
    assert len(kept) == 1 and len(dropped) == 1
    assert rejected[dropped[0]]["duplicate_of"] == curated[kept[0]]["id"]
    assert curated[f"{tmp_path}/in/c/actually_png.jpg"]["format"] == "PNG"
    assert summary["inputs"] == len(files) and summary["curated"] == len(curated)
    assert summary["rejected_by_stage"]["exact_dedup"] == {"exact_duplicate": 1, "placeholder": 3}
    assert set(summary["versions"]) >= {"biocurate", "ray", "torch"}
    assert is_committed(*filesystem(str(out))) and json.loads((out / "summary.json").read_text())["inputs"] == len(files)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_input_carries_metadata(tmp_path, ray_local, good, fmt):
    (tmp_path / "img").mkdir()
    uris, species = [], []
    for i, (name, data) in enumerate(sorted(good.items())[:5]):
        p = tmp_path / "img" / name
        p.write_bytes(data)
        uris.append(str(p))
        species.append(f"species_{i}")
    uris.append(str(tmp_path / "img" / "gone.jpg"))
    species.append("species_missing")
    table = pa.table({"uri": uris, "species": species, "kingdom": ["Animalia"] * len(uris)})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, path)
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in table.to_pylist()))
    out = tmp_path / "run"
    run(str(path), out, ray_local)
    curated, rejected = check_invariant(out, uris)
    assert rejected[uris[-1]]["reason"] == "missing" and rejected[uris[-1]]["species"] == "species_missing"
    for u, s in zip(uris[:-1], species):
        assert curated[u]["species"] == s and curated[u]["kingdom"] == "Animalia"


def test_parquet_with_image_bytes(tmp_path, ray_local, good, hostile):
    names = sorted(good)[:6]
    blobs = [good[n] for n in names] + [hostile["truncated.jpg"][0], None]
    keys = [f"uuid-{i}" for i in range(len(blobs))]
    (tmp_path / "tol").mkdir()
    half = len(blobs) // 2
    for j, sl in enumerate([slice(0, half), slice(half, None)]):
        pq.write_table(pa.table({"uuid": keys[sl], "image": pa.array(blobs[sl], pa.binary()),
                                 "family": ["Felidae"] * len(keys[sl])}), tmp_path / "tol" / f"part{j}.parquet")
    out = tmp_path / "run"
    summary = run(str(tmp_path / "tol"), out, ray_local)
    assert summary["input_kind"] == "parquet_bytes"
    files = [f"{tmp_path}/tol/part{0 if i < half else 1}.parquet" for i in range(len(keys))]
    check_invariant(out, [f"{f}#uuid={k}" for f, k in zip(files, keys)])
    curated, rejected = tables(out)
    assert sorted(r["uri"].split("#uuid=")[1] for r in curated + rejected) == sorted(keys)
    reasons = {r["uri"].split("#uuid=")[1]: r["reason"] for r in rejected}
    assert reasons == {keys[-2]: "corrupt", keys[-1]: "missing"}
    assert all(r["family"] == "Felidae" for r in curated) and len(curated) == 6


def test_webdataset_shards(tmp_path, ray_local, good):
    (tmp_path / "shards").mkdir()
    expected = []
    for k, gz in enumerate([False, True]):
        name = f"image_set_{k:02d}.tar" + (".gz" if gz else "")
        with tarfile.open(tmp_path / "shards" / name, "w:gz" if gz else "w") as tar:
            for i, (n, data) in enumerate(sorted(good.items())[k * 4:(k + 1) * 4]):
                ext = n.rsplit(".", 1)[1]
                for member, blob in ((f"{k}_{i}.{ext}", data), (f"{k}_{i}.json", b'{"uuid": "x"}')):
                    info = tarfile.TarInfo(member)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                expected.append(f"{tmp_path}/shards/{name}#{k}_{i}.{ext}")
    out = tmp_path / "run"
    summary = run(str(tmp_path / "shards"), out, ray_local)
    assert summary["input_kind"] == "webdataset"
    curated, rejected = check_invariant(out, expected)
    assert len(curated) == 8 and all(json.loads(r["sidecars"]) == {"json": '{"uuid": "x"}'} for r in curated.values())


def test_s3_input_and_s3_output(bucket, ray_local, good, hostile):
    import boto3

    endpoint, name = bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = []
    for i, (n, data) in enumerate(sorted(good.items())[:6]):
        key = f"corpus/{'sub/' if i % 2 else ''}{n}"
        s3.put_object(Bucket=name, Key=key, Body=data)
        keys.append(key)
    s3.put_object(Bucket=name, Key="corpus/sub/deep/bad.jpg", Body=hostile["truncated.jpg"][0])
    keys.append("corpus/sub/deep/bad.jpg")
    storage = StorageConfig(endpoint_url=endpoint)
    out = f"s3://{name}/runs/r1"
    run(f"s3://{name}/corpus", out, ray_local, **{"storage.endpoint_url": endpoint})
    curated, rejected = check_invariant(out, [f"s3://{name}/{k}" for k in keys], storage)
    assert rejected[f"s3://{name}/corpus/sub/deep/bad.jpg"]["reason"] == "corrupt"
    listing = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="runs/r1/")["Contents"]]
    assert "runs/r1/_SUCCESS" in listing and "runs/r1/curated/_SUCCESS" in listing
    assert not any(".tmp-" in k or ".staging" in k for k in listing)


def test_until_validate_and_resume_by_fingerprint(tmp_path, ray_local, good, hostile):
    files = folder_corpus(tmp_path / "in", good, hostile)
    expected = [str(tmp_path / "in" / f) for f in files]
    out = tmp_path / "run"
    s = run(str(tmp_path / "in"), out, ray_local, until="validate")
    assert s["stages_run"] == ["validate"]
    curated, rejected = check_invariant(out, expected)
    assert not any(r["stage"] == "exact_dedup" for r in rejected.values())
    assert f"{tmp_path}/in/c/astronaut_copy.jpg" in curated  # no dedup before --until validate

    s = run(str(tmp_path / "in"), out, ray_local, resume=True)
    assert s["stages_reused"] == ["validate"] and s["stages_run"] == ["exact_dedup"]
    s = run(str(tmp_path / "in"), out, ray_local, resume=True)
    assert s["stages_reused"] == ["validate", "exact_dedup"] and s["stages_run"] == []
    s = run(str(tmp_path / "in"), out, ray_local, resume=True, **{"exact_dedup.placeholder_min_copies": 3})
    assert s["stages_reused"] == ["validate"] and s["stages_run"] == ["exact_dedup"]
    _, rejected = check_invariant(out, expected)
    assert sum(r["reason"] == "placeholder" for r in rejected.values()) == 3
    s = run(str(tmp_path / "in"), out, ray_local, resume=True, **{"validate.min_side": 300})
    assert s["stages_run"] == ["validate", "exact_dedup"]
    _, rejected = check_invariant(out, expected)
    assert any(r["reason"] == "too_small" and "300" in r["detail"] for r in rejected.values())


def test_failed_run_leaves_nothing_that_looks_complete(tmp_path, ray_local, good):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(good["astronaut.jpg"])
    out = tmp_path / "run"
    run(str(tmp_path / "img"), out, ray_local)
    assert (out / "_SUCCESS").exists() and (out / "curated" / "_SUCCESS").exists()
    # A manifest row on an S3 endpoint that refuses connections: a transient error that
    # outlives its retries fails the run (never a silent drop).
    from tests.conftest import free_port

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{tmp_path}/img/a.jpg\ns3://nobucket/x.jpg\n")
    with pytest.raises(Exception, match="persisted|TransientReadError"):
        run(str(manifest), out, ray_local, **{"storage.endpoint_url": f"http://127.0.0.1:{free_port()}",
                                               "storage.max_retries": 1, "storage.retry_base_s": 0.01})
    assert not (out / "_SUCCESS").exists()
    assert not (out / "curated" / "_SUCCESS").exists() and not (out / "rejected" / "_SUCCESS").exists()
    with pytest.raises(FileNotFoundError):
        read_committed_table(str(out / "curated"))


def test_until_ingest_and_empty_input(tmp_path, ray_local, good):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(good["astronaut.jpg"])
    (tmp_path / "img" / "b.jpg").write_bytes(b"not really")
    s = run(str(tmp_path / "img"), tmp_path / "r1", ray_local, until="ingest")
    curated, rejected = check_invariant(tmp_path / "r1", [str(tmp_path / "img" / n) for n in ("a.jpg", "b.jpg")])
    assert s["stages_run"] == ["ingest"] and not rejected  # nothing validated yet
    assert curated[str(tmp_path / "img" / "a.jpg")]["n_bytes"] == len(good["astronaut.jpg"])
    (tmp_path / "empty").mkdir()
    s = run(str(tmp_path / "empty"), tmp_path / "r2", ray_local)
    assert (s["inputs"], s["curated"], s["rejected"]) == (0, 0, 0)
    check_invariant(tmp_path / "r2", [])
