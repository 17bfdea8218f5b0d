"""Catalog join and subset selection end to end (real Ray, real encoded images)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline import plan
from manifests.config import load_config
from stages.kernels.hashing import seeded_rank, stable_id
from tests.test_pipeline import check_invariant, tables
from tests.test_select import tol_catalog

pytestmark = pytest.mark.slow


def run(overrides, ray_local, until="exact_dedup"):
    return plan.run(load_config(None, overrides), until=until)


def image_bytes(good, i):
    names = sorted(good)
    return good[names[i % len(names)]]


def test_manifest_selection_before_any_fetch(tmp_path, ray_local, good):
    cat = tol_catalog(400, seed=3).to_pandas()
    (tmp_path / "img").mkdir()
    pred = cat["class"].isin(["Aves", "Mammalia"]) & (cat["basisOfRecord"] != "PreservedSpecimen")
    uris = []
    for i, row in cat.iterrows():
        p = tmp_path / "img" / f"{row.uuid}.jpg"
        if pred[i]:  # unselected images do not even exist: fetching one would be a 'missing' reject
            p.write_bytes(image_bytes(good, i) if i % 5 else samples_variant(good, i))
        uris.append(str(p))
    cat["uri"] = uris
    pq.write_table(pa.Table.from_pandas(cat, preserve_index=False), tmp_path / "manifest.parquet")
    s = run({"input.path": str(tmp_path / "manifest.parquet"), "output": str(tmp_path / "run"),
             "select": {"where": [{"column": "class", "in": ["Aves", "Mammalia"]},
                                  {"column": "basisOfRecord", "ne": "PreservedSpecimen"}],
                        "max_per_taxon": {"column": "species", "max": 3}}}, ray_local)
    selected = cat[pred].copy()
    # the cap keeps, per species, the 3 lowest hash(seed, id) (id = stable_id(uri), seed 0)
    selected["rank"] = seeded_rank(0, [stable_id(u) for u in selected["uri"]]).astype(np.float64)
    expected = set(selected.sort_values("rank").groupby("species").head(3)["uri"])
    capped_sizes = selected.groupby("species").size().clip(upper=3)
    curated, rejected = tables(tmp_path / "run")
    rows = curated + rejected
    assert not any(r["reason"] == "missing" for r in rejected)  # nothing unselected was fetched
    got = pd.DataFrame(rows)
    assert set(got["uri"]) == expected and len(got) == len(expected)
    assert s["selection"]["select"] == {"catalog_rows": 400, "selected": int(capped_sizes.sum()),
                                        "unselected": 400 - int(capped_sizes.sum()), "duplicate_keys": 0}
    assert s["inputs"] == int(capped_sizes.sum())
    check_invariant(tmp_path / "run", list(got["uri"]))


def samples_variant(good, i):
    from PIL import Image

    from pipeline.testdata import images

    img = Image.open(io.BytesIO(image_bytes(good, i))).convert("RGB")
    return images.encode(img.rotate(i % 7), "JPEG", quality=80)


def test_webdataset_with_catalog_join(tmp_path, ray_local, good):
    cat = tol_catalog(60, seed=5)
    keys = cat.column("uuid").to_pylist()
    with_image = keys[:50] + ["orphan-1", "orphan-2"]  # 10 catalog rows without image, 2 images without row
    (tmp_path / "shards").mkdir()
    for k in range(2):
        with tarfile.open(tmp_path / "shards" / f"image_set_{k:02d}.tar.gz", "w:gz") as tar:
            for j, key in enumerate(with_image[k::2]):
                blob = samples_variant(good, j * 2 + k)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    pacsv.write_csv(cat, tmp_path / "catalog.csv")
    s = run({"input.path": str(tmp_path / "shards"), "output": str(tmp_path / "run"),
             "catalog": {"path": str(tmp_path / "catalog.csv"), "key": "uuid"},
             "select": {"where": [{"column": "kingdom", "eq": "Animalia"}]}}, ray_local)
    df = cat.to_pandas().set_index("uuid")
    animal = {k for k in keys[:50] if df.loc[k, "kingdom"] == "Animalia"}
    shard_of = {key: k for k in range(2) for key in with_image[k::2]}
    check_invariant(tmp_path / "run", [f"{tmp_path}/shards/image_set_{shard_of[key]:02d}.tar.gz#{key}.jpg"
                                       for key in animal | {"orphan-1", "orphan-2"}])
    curated, rejected = tables(tmp_path / "run")
    base = lambda r: r["uri"].rsplit("#", 1)[1].removesuffix(".jpg")
    seen = {base(r) for r in curated + rejected}
    assert seen == animal | {"orphan-1", "orphan-2"}
    orphans = [r for r in rejected if r["reason"] == "not_in_catalog"]
    assert sorted(base(r) for r in orphans) == ["orphan-1", "orphan-2"] and orphans[0]["stage"] == "select"
    for r in curated:  # catalog metadata reached the manifest
        assert r["species"] == df.loc[base(r), "species"] and r["kingdom"] == "Animalia"
    assert s["selection"]["join"] == {"unselected": 50 - len(animal), "not_in_catalog": 2,
                                      "catalog_without_image": 10}
    ids = [r["id"] for r in curated + rejected]
    assert len(ids) == len(set(ids))
    # unselected members were skipped unread by the shard readers (a Bloom filter of the
    # selected keys): no bytes, no decode, in the narrow table
    scan = pq.read_table(tmp_path / "run" / "stages" / "validate").to_pylist()
    plants = {k for k in keys[:50] if df.loc[k, "kingdom"] != "Animalia"}
    skipped = {base(r) for r in scan if r["reason"] == "skipped_unselected"}
    assert skipped <= plants | {"orphan-1", "orphan-2"}  # never a selected member
    assert len(plants - skipped) <= max(1, len(plants) // 10)  # all but Bloom false positives
    assert all(r["sha256"] is None for r in scan if base(r) in skipped)
    assert not any(r["reason"] == "skipped_unselected" for r in rejected)


def test_parquet_bytes_selected_on_own_metadata(tmp_path, ray_local, good):
    cat = tol_catalog(40, seed=9)
    blobs = [samples_variant(good, i) for i in range(40)]
    t = cat.append_column("image", pa.array(blobs, pa.binary()))
    pq.write_table(t, tmp_path / "tol.parquet", row_group_size=8)
    s = run({"input.path": str(tmp_path / "tol.parquet"), "output": str(tmp_path / "run"),
             "select": {"where": [{"column": "license", "in": ["cc0", "cc-by"]}]}}, ray_local, until="validate")
    want = set(cat.to_pandas().query("license in ['cc0', 'cc-by']")["uuid"])
    check_invariant(tmp_path / "run", [f"{tmp_path}/tol.parquet#uuid={k}" for k in want])
    curated, rejected = tables(tmp_path / "run")
    assert {r["uuid"] for r in curated + rejected} == want
    assert s["selection"]["select"] == {"catalog_rows": 40, "selected": len(want), "unselected": 40 - len(want), "duplicate_keys": 0}
    assert all(r["license"] in ("cc0", "cc-by") for r in curated)


class CountingFS(LocalFileSystem):
    """Local files through a protocol that logs every read as (offset, length)."""

    protocol = "counting"
    reads: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("counting://"))

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        read, readinto = f.read, getattr(f, "readinto", None)

        def counted_read(n=-1):
            pos = f.tell()
            data = read(n)
            CountingFS.reads.append((pos, len(data)))
            return data

        def counted_readinto(b):
            pos = f.tell()
            n = readinto(b)
            CountingFS.reads.append((pos, n or 0))
            return n

        f.read = counted_read
        if readinto is not None:
            f.readinto = counted_readinto
        return f


def image_bytes_read(path, column="image") -> int:
    """Bytes read that fall inside the image column's chunks (footer and metadata excluded)."""
    md = pq.ParquetFile(path).metadata
    idx = md.schema.to_arrow_schema().get_field_index(column)
    spans = []
    for g in range(md.num_row_groups):
        c = md.row_group(g).column(idx)
        start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
        spans.append((start, start + c.total_compressed_size))
    return sum(max(0, min(p + n, b) - max(p, a)) for p, n in CountingFS.reads for a, b in spans)


def test_parquet_image_bytes_read_only_for_selected_row_groups(tmp_path, good):
    """The I/O bound of the selection, counted by a wrapping filesystem (no Ray)."""
    import fsspec

    from manifests.config import StorageConfig
    from stages import ingest
    from stages.kernels.select import predicate_mask

    fsspec.register_implementation("counting", CountingFS, clobber=True)
    n, per_class = 60, 15
    cat = tol_catalog(n, seed=11).to_pandas()
    cat["class"] = np.repeat(["Aves", "Mammalia", "Insecta", "Reptilia"], per_class)  # catalogs come grouped
    blobs = [samples_variant(good, i) for i in range(n)]
    table = pa.Table.from_pandas(cat, preserve_index=False).append_column("image", pa.array(blobs, pa.binary()))
    path = tmp_path / "tol.parquet"
    pq.write_table(table, path, row_group_size=5)
    uri = f"counting://{path}"
    storage = StorageConfig()

    CountingFS.reads = []
    groups = ingest.parquet_row_groups(pa.table({"file": [uri]}), storage)
    assert groups.column("rows").to_pylist() == [5] * 12
    meta = pa.concat_tables([ingest.parquet_metadata_rows(groups.slice(i, 1), storage, "image")
                             for i in range(len(groups))])
    assert "image" not in meta.column_names and len(meta) == n
    assert image_bytes_read(path) == 0  # the metadata pass reads no image byte
    for where in ([{"column": "class", "eq": "Mammalia"}], [{"column": "class", "in": ["Aves", "Insecta"]}]):
        chosen = meta.filter(pa.array(predicate_mask(meta, where)))
        CountingFS.reads = []
        parts = []
        for (f, rg), idx in pd.DataFrame({"f": chosen.column(ingest.PQ_FILE).to_pylist(),
                                          "g": chosen.column(ingest.PQ_GROUP).to_pylist()}).groupby(["f", "g"]).groups.items():
            parts.append(ingest.parquet_selected_images(chosen.take(pa.array(list(idx))), storage, "image", "uuid"))
        got = pa.concat_tables(parts)
        selected_bytes = sum(len(blobs[i]) for i in np.flatnonzero(predicate_mask(table, where)))
        read_bytes = image_bytes_read(path)
        assert 0.9 * selected_bytes <= read_bytes <= 1.1 * selected_bytes, (read_bytes, selected_bytes)
        want = {u: blobs[i] for i, u in enumerate(cat["uuid"]) if predicate_mask(table, where)[i]}
        assert {r["uuid"]: r["image_bytes"] for r in got.to_pylist()} == want
    # A scattered selection still reads only the row groups it touches (the unit of a
    # parquet read: a default writer puts a row group's images in one dictionary page).
    scattered = meta.filter(pa.array(np.arange(n) % 10 == 0))  # rows 0, 10, ...: 6 of 12 row groups
    CountingFS.reads = []
    for i in range(len(scattered)):
        ingest.parquet_selected_images(scattered.slice(i, 1), storage, "image", "uuid")
    touched = sum(len(blobs[j]) for g in range(0, 12, 2) for j in range(g * 5, g * 5 + 5))
    assert 0.9 * touched <= image_bytes_read(path) <= 1.1 * touched


def test_parquet_with_separate_catalog(tmp_path, ray_local, good):
    cat = tol_catalog(30, seed=13)
    keys = cat.column("uuid").to_pylist()
    img_keys = keys[:24] + ["orphan-a"]  # 6 catalog rows without image, 1 image without catalog row
    blobs = [samples_variant(good, i) for i in range(len(img_keys))]
    pq.write_table(pa.table({"uuid": img_keys, "image": pa.array(blobs, pa.binary())}), tmp_path / "imgs.parquet",
                   row_group_size=4)
    pq.write_table(cat, tmp_path / "catalog.parquet")
    s = run({"input.path": str(tmp_path / "imgs.parquet"), "output": str(tmp_path / "run"),
             "catalog": {"path": str(tmp_path / "catalog.parquet")},
             "select": {"where": [{"column": "license", "ne": "all-rights-reserved"}]}}, ray_local, until="validate")
    df = cat.to_pandas().set_index("uuid")
    want = {k for k in keys[:24] if df.loc[k, "license"] != "all-rights-reserved"}
    check_invariant(tmp_path / "run", [f"{tmp_path}/imgs.parquet#uuid={k}" for k in want | {"orphan-a"}])
    curated, rejected = tables(tmp_path / "run")
    assert {r["uuid"] for r in curated} == want
    assert [(r["uuid"], r["reason"]) for r in rejected] == [("orphan-a", "not_in_catalog")]
    assert all(r["species"] == df.loc[r["uuid"], "species"] for r in curated)
    assert s["selection"]["join"] == {"unselected": 24 - len(want), "not_in_catalog": 1, "catalog_without_image": 6}
    assert "select.join" not in s["fingerprints"]  # selected before the scan
