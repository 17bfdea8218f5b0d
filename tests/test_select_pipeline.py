"""Catalog join and subset selection end to end (real Ray, real encoded images)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline import plan
from pipeline.config import load_config
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
                                        "unselected": 400 - int(capped_sizes.sum())}
    assert s["inputs"] == int(capped_sizes.sum())
    check_invariant(tmp_path / "run", list(got["uri"]))


def samples_variant(good, i):
    from PIL import Image

    from pipeline import samples

    img = Image.open(io.BytesIO(image_bytes(good, i))).convert("RGB")
    return samples.encode(img.rotate(i % 7), "JPEG", quality=80)


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


def test_parquet_bytes_selected_on_own_metadata(tmp_path, ray_local, good):
    cat = tol_catalog(40, seed=9)
    blobs = [samples_variant(good, i) for i in range(40)]
    t = cat.append_column("image", pa.array(blobs, pa.binary()))
    pq.write_table(t, tmp_path / "tol.parquet", row_group_size=8)
    s = run({"input.path": str(tmp_path / "tol.parquet"), "output": str(tmp_path / "run"),
             "select": {"where": [{"column": "license", "in": ["cc0", "cc-by"]}]}}, ray_local, until="validate")
    want = set(cat.to_pandas().query("license in ['cc0', 'cc-by']")["uuid"])
    curated, rejected = tables(tmp_path / "run")
    assert {r["uuid"] for r in curated + rejected} == want
    assert s["selection"]["join"]["unselected"] == 40 - len(want)
    assert all(r["license"] in ("cc0", "cc-by") for r in curated)
