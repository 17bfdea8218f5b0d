"""Resume after a crash, worker faults, determinism of every stage, and a periodic refresh,
on one real corpus (views of real photos with a species column, a few broken files, an
exact copy) through every stage: select, scan with the real MobileNetV2, exact dedup,
filter, near-dedup, sampling.

One uninterrupted run (``clean``) is the reference: a run killed (SIGKILL) in the middle
of its embedding and resumed, a run whose embedding actor is killed, and runs with other
concurrency and block sizes must all give exactly its curated and rejected rows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

from manifests.io import read_committed_table
from pipeline import plan
from pipeline.testdata import images
from manifests.config import load_config
from tests.test_pipeline import check_invariant

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

SPECIES = {"astronaut": 7, "coffee": 6, "chelsea": 5, "rocket": 4, "camera": 3, "coins": 2, "moon": 2}
REMOVED = ["rocket_00", "camera_00", "coins_00"]  # gone from the source in v2


def _views(source: dict, counts: dict, seed0: int) -> dict[str, bytes]:
    """Distinct views of real photos: random crops of 40-70% of each side, resized."""
    from tests.test_sampling import _crops

    out = {}
    for i, (name, c) in enumerate(counts.items()):
        for j, im in enumerate(_crops(source[name], c, seed=seed0 + i)):
            out[f"{name}_{j:02d}"] = images.encode(im, "JPEG", quality=90)
    return out


def _write_manifest(root: Path, images: dict[str, bytes], path: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    uris, species = [], []
    for key, data in sorted(images.items()):
        p = root / f"{key}.jpg"
        p.write_bytes(data)
        uris.append(str(p))
        species.append(key.rsplit("_", 1)[0])
    pacsv.write_csv(pa.table({"uri": uris, "species": species}), path)
    return uris


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos):
    """v1: 29 views of 7 photos + 2 broken files + an exact copy; v2: v1 minus 3 views,
    plus 4 new views and 2 edited copies of v1 views (near-duplicates)."""
    import skimage.data as sd

    from PIL import Image

    root = tmp_path_factory.mktemp("refresh")
    source = {**photos, "coins": sd.coins(), "moon": sd.moon()}
    v1 = _views(source, SPECIES, 0)
    hostile = images.hostile_images(photos)
    v1["broken_truncated"] = hostile["truncated.jpg"][0]
    v1["broken_tiny"] = hostile["one_pixel.png"][0]
    v1["astronaut_copy"] = v1["astronaut_01"]
    v2 = {k: v for k, v in v1.items() if k not in REMOVED}
    new = _views(source, {"chelsea": 2, "coffee": 2}, 100)
    v2.update({f"new{k}": v for k, v in new.items()})
    edits = images.edited_copies(np.asarray(Image.open(__import__("io").BytesIO(v1["coffee_02"]))))
    v2["editcoffee_q30"] = images.encode(edits["q30"], "JPEG", quality=90)
    edits = images.edited_copies(np.asarray(Image.open(__import__("io").BytesIO(v1["chelsea_01"]))))
    v2["editchelsea_bright"] = images.encode(edits["bright"], "JPEG", quality=90)
    uris1 = _write_manifest(root / "img", v1, root / "v1.csv")
    uris2 = _write_manifest(root / "img", v2, root / "v2.csv")
    # select.where drops the moon views: unselected rows are not part of the subset
    selected = lambda uris: [u for u in uris if not Path(u).stem.startswith("moon")]  # noqa: E731
    return {"root": root, "v1": root / "v1.csv", "v2": root / "v2.csv", "uris1": selected(uris1),
            "uris2": selected(uris2)}


def overrides(corpus, out, **more):
    return {"input.path": str(corpus["v1"]), "output": str(out),
            "embed.models": [{"name": "mobilenet_v2_imagenet"}], "embed.batch_size": 4,
            "embed.cache_path": str(Path(out) / "cache"),
            "select.where": [{"column": "species", "ne": "moon"}],
            "quality.min_entropy": None,
            "near_dedup.threshold": 0.92,  # MobileNetV2 on overlapping crops of one photo: keep the views
            "sample.target": 14, "sample.levels": [6, 2], "sample.resample_steps": 3,
            "run.batch_size": 4, "run.read_batch_size": 4, "run.seed": 3, **more}


def rows(out) -> tuple[list[str], list[str]]:
    """Curated and rejected rows, order-independent (decode_ms is a timing)."""
    def strip(t):
        return sorted(json.dumps({k: v for k, v in r.items() if k != "decode_ms"}, sort_keys=True, default=str)
                      for r in t.to_pylist())
    return strip(read_committed_table(f"{out}/curated")), strip(read_committed_table(f"{out}/rejected"))


@pytest.fixture(scope="module")
def clean(corpus, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    summary = plan.run(load_config(None, overrides(corpus, out)))
    check_invariant(out, corpus["uris1"])
    return out, summary


def test_every_stage_runs_on_the_corpus(clean):
    _, s = clean
    assert s["stages_run"] == ["select", "embed", "embed.mobilenet_v2_imagenet", "exact_dedup", "filter",
                               "near_dedup", "sample"]
    assert s["curated"] == 14 and s["rejected_by_stage"]["sample"]["not_sampled"] > 0
    assert s["selection"]["select"]["unselected"] == 2 and s["rejected_by_stage"]["validate"]
    assert s["rejected_by_stage"]["exact_dedup"]["exact_duplicate"] == 1


def test_deterministic_every_stage_concurrency_and_block_sizes(clean, corpus, tmp_path):
    """Same inputs, config and seed: identical rows with other concurrency, block and batch
    sizes, joins and deciders (the model calls have a fixed shape: embeddings are
    bit-identical). One run varies all of them at once (CI time: one run, not one per knob);
    the reference runs at Ray's default concurrency, one embedding actor, broadcast joins,
    groups decided in the driver."""
    out, ref = clean
    assert ref["near_dedup"]["decided_in"] == "driver"
    want = rows(out)
    more = {"run.concurrency": 2, "run.batch_size": 16, "run.read_batch_size": 2,
            "embed.concurrency": 2, "embed.num_cpus": 0.5,
            "run.broadcast_join_mb": 0,  # every join a hash shuffle, not a broadcast
            "near_dedup.decide_in_driver": 0}  # groups decided by tasks
    s = plan.run(load_config(None, overrides(corpus, tmp_path / "c2", **more)))
    assert rows(tmp_path / "c2") == want
    assert s["near_dedup"]["decided_in"] == "tasks"
    assert s["near_dedup"]["members"] > 0 and s["near_dedup"]["removed"] > 0


def _cache_blocks(cache: Path) -> list[Path]:
    return sorted(cache.rglob("blk-*.parquet")) if cache.exists() else []


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        d = out
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return out


def test_resume_after_the_driver_is_killed_mid_embedding(clean, corpus, tmp_path):
    """SIGKILL the driver (and the local Ray it started) once the embedding actors have
    committed a cache block, rerun with --resume: the manifest equals the clean run's,
    the finished select stage is reused, and images embedded before the kill are not
    embedded again (model calls: computed + cached = rows embedded, no image twice)."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_nested(overrides(corpus, out, **{"run.num_cpus": 2}))))
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(cfg_file)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not _cache_blocks(out / "cache") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    blocks = _cache_blocks(out / "cache")
    embedded_before = sum(len(read_committed_table_file(b)) for b in blocks)
    assert not (out / "stages" / "embed" / "_SUCCESS").exists() and not (out / "_SUCCESS").exists()
    assert (out / "stages" / "select" / "_SUCCESS").exists()
    print(f"\nkilled with {len(blocks)} cache blocks ({embedded_before} embeddings) committed")

    summary = plan.run(load_config(None, overrides(corpus, out)), resume=True)
    assert summary["stages_reused"] == ["select"]
    emb = summary["embed"]["mobilenet_v2_imagenet"]
    clean_emb = clean[1]["embed"]["mobilenet_v2_imagenet"]
    assert emb["computed"] + emb["cached"] == clean_emb["computed"] + clean_emb["cached"]
    assert emb["cached"] >= embedded_before > 0 and emb["computed"] < clean_emb["computed"]
    assert rows(out) == rows(clean[0])


def read_committed_table_file(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _map_workers() -> set[int]:
    """pids of the embedding actors (Ray titles the process ray::MapWorker(MapBatches(EmbedModels)))."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                title = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::") and b"EmbedModels" in title.split(b"\0")[0]:
                pids.add(int(d.name))
    return pids


def test_killed_embedding_actor_is_restarted_and_the_manifest_is_unchanged(clean, corpus, tmp_path):
    out = tmp_path / "run"
    result: dict = {}

    def go():
        try:
            result["summary"] = plan.run(load_config(None, overrides(corpus, out)))
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=go)
    t.start()
    deadline = time.time() + 300
    while not _cache_blocks(out / "cache") and t.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    victims = _map_workers()
    assert victims and t.is_alive(), "the embedding actor was not found running"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    t.join(600)
    assert "error" not in result, result.get("error")
    assert rows(out) == rows(clean[0])
    assert not (victims & _map_workers())


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def refreshed(clean, corpus, tmp_path_factory):
    """v2 refreshed against the clean v1 run; the v1 directory's digest before it."""
    prev, _ = clean
    digest = _tree_digest(prev)
    out = tmp_path_factory.mktemp("v2") / "run"
    cfg = load_config(None, overrides(corpus, out, **{"input.path": str(corpus["v2"]), "refresh.previous": str(prev)}))
    return out, plan.run(cfg), digest


def test_refresh_embeds_only_new_images_and_catches_copies_of_kept_ones(clean, corpus, refreshed):
    prev, s1 = clean
    out, s2, digest = refreshed
    curated, rejected = check_invariant(out, corpus["uris2"])
    assert _tree_digest(prev) == digest  # the previous run is never modified
    assert s2["version"] == 2
    diff = s2["refresh"]["diff"]
    assert diff == {"added": 6, "removed": 3, "changed": 0, "unchanged": len(corpus["uris1"]) - 3}
    assert (out / "diff" / "_SUCCESS").exists()
    removed = read_committed_table_file(out / "diff" / "change=removed").to_pylist()
    assert sorted(Path(r["uri"]).stem for r in removed) == sorted(REMOVED)
    added = read_committed_table_file(out / "diff" / "change=added").to_pylist()
    assert all(r["previous_status"] is None and r["status"] in ("curated", "rejected") for r in added)
    # zero re-embedding of v1 images: only the 6 new ones met the model
    emb = s2["embed"]["mobilenet_v2_imagenet"]
    assert emb["computed"] == 6, emb
    # v1 images were not decoded again: their validation came from the previous run
    assert s2["refresh"]["validate"]["rows_not_decoded"] > 0
    prev_rows = {r["uri"]: r for r in read_committed_table(f"{prev}/curated").to_pylist()
                 + read_committed_table(f"{prev}/rejected").to_pylist()}
    now = {**curated, **rejected}
    for uri, r in now.items():
        if uri in prev_rows:
            for col in ("phash", "width", "height", "q_blur", "sha256"):
                assert r[col] == prev_rows[uri][col], (uri, col)
            if prev_rows[uri].get("stage") == "validate":
                assert r["reason"] == prev_rows[uri]["reason"]
    # copies of v1 images are removed in favour of the v1 image, which stays
    kept_before = {u for u, r in prev_rows.items() if r.get("reason") in (None, "not_sampled")}
    for stem in ("editcoffee_q30", "editchelsea_bright"):
        r = next(r for u, r in now.items() if Path(u).stem == stem)
        assert r.get("reason") in ("perceptual_duplicate", "semantic_duplicate"), r
        assert next(u for u, x in now.items() if x["id"] == r["duplicate_of"]) in kept_before
    # sampling: the previous centroids, so cluster ids of v1 images are unchanged
    assert s2["sample"]["previous_centroids"] == "reused"
    for uri, r in now.items():
        if uri in prev_rows and prev_rows[uri].get("cluster_l1") is not None:
            assert r["cluster_l1"] == prev_rows[uri]["cluster_l1"]
    assert len(curated) == 14


def test_refresh_with_shuffle_joins_equals_the_broadcast_one(clean, corpus, refreshed, tmp_path):
    """Every join of a run (validation fill, embedding lookup, near-dedup and sampling
    decisions, the diff's full outer join) is a broadcast at this size; with
    ``run.broadcast_join_mb: 0`` each is Ray Data's hash shuffle. Same rows, same diff."""
    prev, _ = clean
    out, s2, _ = refreshed
    other = tmp_path / "shuffled"
    s3 = plan.run(load_config(None, overrides(corpus, other, **{
        "input.path": str(corpus["v2"]), "refresh.previous": str(prev), "run.broadcast_join_mb": 0})))
    check_invariant(other, corpus["uris2"])
    assert rows(other) == rows(out)
    assert s3["refresh"]["diff"] == s2["refresh"]["diff"]

    def diff_rows(run):
        t = pa.concat_tables([read_committed_table_file(f).append_column("change", pa.array([f.parent.name] * len(
            read_committed_table_file(f)))) for f in sorted((run / "diff").rglob("*.parquet"))])
        return sorted(json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist())

    assert diff_rows(other) == diff_rows(out)


def test_export_webdataset_shards_round_trip(clean, tmp_path):
    """curated/ -> webdataset shards (WebP capped at a pixel count) read back with the
    webdataset package: one sample per curated row, the sidecar equals the manifest row,
    every image decodes within the cap; the attribution file lists every image."""
    import csv

    import webdataset as wds
    from PIL import Image

    from pipeline.export import export_run

    out, _ = clean
    curated = {r["id"]: r for r in read_committed_table(f"{out}/curated").to_pylist()}
    report = export_run(str(out), str(tmp_path / "wds"), shard_size=5, fmt="webp", max_pixels=20_000, quality=80)
    assert report["images"] == len(curated) and not report["skipped"]
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("shard-*.tar"))
    assert len(shards) == -(-len(curated) // 5) and (tmp_path / "wds" / "_SUCCESS").exists()
    seen = {}
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        img = Image.open(__import__("io").BytesIO(sample["webp"]))
        assert img.format == "WEBP" and img.width * img.height <= 20_000
        assert (img.width, img.height) == (meta["export"]["width"], meta["export"]["height"])
        assert sample["__key__"] == meta["id"]
        seen[meta["id"]] = meta
    assert sorted(seen) == sorted(curated)
    for i, meta in seen.items():
        row = curated[i]
        for k in ("uri", "species", "sha256", "cluster_l1", "cluster_l2", "sampled"):
            assert meta[k] == row[k], k
        assert meta["q_blur"] == pytest.approx(row["q_blur"])
    with open(tmp_path / "wds" / "ATTRIBUTION.csv") as f:
        attribution = list(csv.DictReader(f))
    assert sorted(r["id"] for r in attribution) == sorted(curated)
    assert all(r["title"] for r in attribution)  # the species column


def test_report_renders_in_headless_chromium(refreshed, tmp_path):
    """report.html of a real run (a refresh: every stage, near-duplicate groups, clusters,
    taxonomy) in a real browser: no console errors, every image decoded, every section
    there, no network URL, under 20 MB; a screenshot is kept next to it."""
    from selenium import webdriver

    out, summary, _ = refreshed
    page = (out / "report.html").read_text()
    assert len(page.encode()) < 20 * 2**20
    assert "http://" not in page and "https://" not in page
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,3000"):
        opts.add_argument(a)
    import shutil

    opts.binary_location = shutil.which("chromium")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get((out / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        sections = driver.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.id)")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        driver.save_screenshot(str(out / "report.png"))
    finally:
        driver.quit()
    assert not errors, errors
    assert len(images) >= 20 and all(done and width > 0 for done, width, _ in images), images
    assert {"funnel", "scores", "rejects", "duplicates", "thresholds", "clusters", "taxonomy",
            "timings"} <= set(sections), sections
    assert (out / "report.png").stat().st_size > 10_000
    for reason in ("not_sampled", "exact_duplicate", "corrupt"):
        assert f"<h3>{reason}</h3>" in page


def test_report_command_rewrites_a_finished_runs_report(clean, tmp_path):
    """`biocurate report --output RUN` (no Ray) writes report.html again; a folder that is
    not a run is a one-line error."""
    from tests.test_cli import cli, one_line_error

    out, _ = clean
    (out / "report.html").unlink()
    p, _ = cli("report", "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert (out / "report.html").stat().st_size > 10_000
    assert "not a run directory" in one_line_error(cli("report", "--output", str(tmp_path))[0])
