"""Small thumbnails of a few corpus images, for pages people look at (examples report, run
report): the image bytes found again from a row's ``uri`` whatever the source kind, made
into self-contained ``data:`` URIs (no network needed to view the page).

``uri`` forms (see ``stages.ingest``): a file or object; ``shard.tar#member`` (webdataset);
``file.parquet#<key column>=<value>`` (parquet with bytes).
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

from PIL import Image, ImageOps

from manifests.io import filesystem
from pipeline.config import StorageConfig
from stages import ingest, shards


def _container(uri: str) -> tuple[str, str, str] | None:
    """('tar'|'parquet', container uri, member) for a uri inside a shard or table."""
    if "#" not in uri:
        return None
    base, member = uri.split("#", 1)
    if base.lower().endswith(ingest.TAR_SUFFIXES):
        return "tar", base, member
    if base.lower().endswith(".parquet") and "=" in member:
        return "parquet", base, member
    return None


def fetch_many(uris: list[str], storage: StorageConfig, bytes_column: str = "image") -> dict[str, bytes | None]:
    """uri -> encoded bytes (None when it cannot be read). Members of one shard or table are
    read in one pass over it."""
    out: dict[str, bytes | None] = {}
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for u in uris:
        c = _container(u)
        if c is None:
            got = ingest.fetch_object(u, storage)
            out[u] = got if isinstance(got, bytes) else None
        else:
            grouped[(c[0], c[1])].append((c[2], u))
    for (kind, base), members in grouped.items():
        wanted = dict(members)
        for u in wanted.values():
            out[u] = None
        try:
            fs, path = filesystem(base, storage)
            if kind == "tar":
                # members found again by the names their rows' uris hold (stages.shards.member_ref:
                # non-UTF-8 bytes as \xNN, '#n' for a repeated name), reads bounded as in ingest
                for ref, data in shards.read_members(base, storage, set(wanted)).items():
                    out[wanted[ref]] = data
            else:
                import pyarrow as pa
                import pyarrow.compute as pc
                import pyarrow.parquet as pq

                column = next(iter(wanted)).split("=", 1)[0]
                values = [k.split("=", 1)[1] for k in wanted]
                with fs.open(path, "rb") as f:
                    t = pq.read_table(f, columns=[column, bytes_column])
                t = t.filter(pc.is_in(pc.cast(t[column], "string"), value_set=pa.array(values)))
                for k, b in zip(t[column].to_pylist(), t[bytes_column].to_pylist()):
                    out[wanted[f"{column}={k}"]] = b
        except Exception:  # noqa: BLE001 - a thumbnail that cannot be read is shown as missing
            continue
    return out


def data_uri(data: bytes | None, size: int = 160, quality: int = 80) -> str | None:
    """A JPEG thumbnail (long side ``size``, EXIF orientation applied) as a data: URI."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - a broken image has no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
