"""Thumbnails found again from a row's uri, whatever the source kind (file, webdataset
member, parquet row with bytes), as self-contained data: URIs."""

import base64
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import thumbs
from pipeline.testdata import images
from manifests.config import StorageConfig


def test_fetch_many_across_source_kinds(tmp_path, photos):
    jpg = images.encode(Image.fromarray(photos["chelsea"]), "JPEG", quality=90)
    png = images.encode(Image.fromarray(photos["coffee"]), "PNG")
    (tmp_path / "a.jpg").write_bytes(jpg)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.jpg", jpg), ("k1.json", b"{}"), ("k2.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"uuid": ["u1", "u2"], "image": [png, jpg]}), tmp_path / "t.parquet")
    uris = [str(tmp_path / "a.jpg"), f"{shard}#k2.png", f"{shard}#k1.jpg", f"{tmp_path / 't.parquet'}#uuid=u1",
            str(tmp_path / "gone.jpg"), f"{shard}#nope.jpg"]
    got = thumbs.fetch_many(uris, StorageConfig())
    assert got[uris[0]] == jpg and got[uris[1]] == png and got[uris[2]] == jpg and got[uris[3]] == png
    assert got[uris[4]] is None and got[uris[5]] is None
    src = thumbs.data_uri(got[uris[1]], size=64)
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) == 64
    assert thumbs.data_uri(b"not an image") is None and thumbs.data_uri(None) is None
