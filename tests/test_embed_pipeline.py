"""The embedding stage through real Ray Data: pipeline embeddings equal direct model calls
(a random-weight Birder ViT and the real MobileNetV2), the fast decode sees what Birder's
reference transform sees, the cache on a real S3-protocol server makes a second run compute
nothing, and clear errors for missing weights, wrong dimensions and GPUs that never come."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from manifests.io import filesystem, read_committed_table
from pipeline import embedding, plan
from pipeline.progress import is_progress
from pipeline.testdata import images
from manifests.config import ConfigError, StorageConfig, ValidateConfig, load_config
from stages.backbones import (IMAGENET_STATS, _packaged_mobilenet, load_backbone, model_input, resolve_spec,
                              save_birder_checkpoint)
from stages.validate import validate_image
from tests.test_cli import cli, one_line_error
from tests.test_pipeline import check_invariant

pytestmark = pytest.mark.slow


def jpeg_corpus(root, photos, names, size=(900, 640)):
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in names:
        img = Image.fromarray(photos[n]).convert("RGB").resize(size, Image.Resampling.LANCZOS)
        files[f"{n}.jpg"] = images.encode(img, "JPEG", quality=90)
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def tiny_vit(path):
    """A random-weight Birder ViT (the real vit_t16 code) saved as a Birder checkpoint."""
    from birder.model_registry import registry

    s = resolve_spec("tiny_vit", network="vit_t16", size=96, dim=192)
    torch.manual_seed(0)
    save_birder_checkpoint(registry.net_factory("vit_t16", 0, size=(96, 96)), path, s)
    return s


def embeddings(out, name):
    t = read_committed_table(f"{out}/stages/embed.{name}")
    return t, {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in t.to_pylist()}


def test_pipeline_embeddings_equal_direct_model_calls(tmp_path, ray_local, photos, good):
    names = ["astronaut", "chelsea", "coffee", "rocket", "china", "flower"]
    files = jpeg_corpus(tmp_path / "in", photos, names)
    for other in ("coffee_rgba.png", "chelsea.webp", "flower_cmyk.jpg", "rotated6.jpg"):  # other decode paths
        files[other] = good[other]
        (tmp_path / "in" / other).write_bytes(good[other])
    vit = tiny_vit(tmp_path / "tiny_vit.pt")
    out = tmp_path / "run"
    cfg = load_config(None, {
        "input.path": str(tmp_path / "in"), "output": str(out),
        "embed.models": [{"name": "mobilenet_v2_imagenet"},
                         {"name": "tiny_vit", "network": "vit_t16", "size": 96, "dim": 192,
                          "weights": str(tmp_path / "tiny_vit.pt")}],
        "embed.dtype": "float32", "embed.batch_size": 3})
    summary = plan.run(cfg, until="filter")  # (the png/webp copies are near-duplicates of the jpegs)
    curated, _ = check_invariant(out, [str(tmp_path / "in" / f) for f in files])
    assert summary["embed"]["mobilenet_v2_imagenet"]["computed"] == len(files) == len(curated)
    assert summary["embed"]["tiny_vit"]["computed"] == len(files)
    assert not any(c.startswith("emb_") for c in read_committed_table(f"{out}/curated").column_names)

    mnet = load_backbone("mobilenet_v2_imagenet")
    tiny = load_backbone(vit, weights=str(tmp_path / "tiny_vit.pt"))
    t_m, got_m = embeddings(out, "mobilenet_v2_imagenet")
    t_v, got_v = embeddings(out, "tiny_vit")
    import pyarrow as pa

    assert t_m.schema.field("embedding").type.equals(pa.list_(pa.float32(), 1280), check_metadata=False)
    assert t_v.schema.field("embedding").type.equals(pa.list_(pa.float32(), 192))
    from birder.data.transforms.classification import inference_preset

    reference = inference_preset((224, 224), {"mean": IMAGENET_STATS[0], "std": IMAGENET_STATS[1]})
    for uri, row in curated.items():
        data = open(uri, "rb").read()
        decoded = validate_image(data, ValidateConfig(), cover=224).decoded  # what the pipeline decodes
        direct_m = mnet(torch.from_numpy(model_input(decoded, 224).copy())[None])[0].numpy()
        direct_v = tiny(torch.from_numpy(model_input(decoded, 96).copy())[None])[0].numpy()
        assert np.allclose(got_m[row["id"]], direct_m, atol=1e-4), uri
        assert np.allclose(got_v[row["id"]], direct_v, atol=1e-4), uri
        if not any(uri.endswith(f"/{n}.jpg") for n in names):
            continue
        # the fast path (DCT-scaled decode) vs Birder's transform on a full decode
        with torch.inference_mode():
            ref = mnet.net(reference(Image.open(io.BytesIO(data)).convert("RGB"))[None]).float()
        cos = float(np.dot(got_m[row["id"]], torch.nn.functional.normalize(ref, dim=-1)[0].numpy()))
        assert cos >= 0.995, (uri, cos)


def test_cache_on_s3_second_run_computes_nothing(bucket, ray_local, photos):
    import boto3

    endpoint, name = bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    files = jpeg_corpus(samples_dir := _tmp_dir(), photos, ["astronaut", "chelsea", "coffee", "rocket"],
                        size=(500, 400))
    for rel, data in files.items():
        s3.put_object(Bucket=name, Key=f"in/{rel}", Body=data)
    s3.put_object(Bucket=name, Key="models/mnet.pth", Body=_packaged_mobilenet().read_bytes())
    common = {"storage.endpoint_url": endpoint, "input.path": f"s3://{name}/in",
              "embed.models": [{"name": "mobilenet_v2_imagenet", "weights": f"s3://{name}/models/mnet.pth"}],
              "embed.cache_path": f"s3://{name}/cache"}
    storage = StorageConfig(endpoint_url=endpoint)

    def run(out):
        return plan.run(load_config(None, {**common, "output": f"s3://{name}/{out}"}))["embed"]["mobilenet_v2_imagenet"]

    first = run("run1")
    assert (first["computed"], first["cached"]) == (4, 0) and first["dtype"] == "float16"
    second = run("run2")  # a fresh run directory, the same shared cache
    assert (second["computed"], second["cached"]) == (0, 4) and second["model_id"] == first["model_id"]
    a = {r["sha256"]: r["embedding"] for r in read_committed_table(f"s3://{name}/run1/stages/embed.mobilenet_v2_imagenet", storage).to_pylist()}
    b = {r["sha256"]: r["embedding"] for r in read_committed_table(f"s3://{name}/run2/stages/embed.mobilenet_v2_imagenet", storage).to_pylist()}
    assert a == b and len(a) == 4
    more = jpeg_corpus(samples_dir / "more", photos, ["china", "flower"], size=(500, 400))
    for rel, data in more.items():
        s3.put_object(Bucket=name, Key=f"in/{rel}", Body=data)
    third = run("run3")
    assert (third["computed"], third["cached"]) == (2, 4)
    fs, root = filesystem(f"s3://{name}/cache", storage)
    parts = [p for p in fs.find(root) if p.endswith(".parquet")]
    assert sum(pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows for p in parts) == 6  # each image once


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="biocurate-embed-"))


def test_gpu_that_never_comes_is_a_clear_error(ray_local, monkeypatch, capfd):
    with pytest.raises(ConfigError, match="no GPU became available within embed.gpu_timeout_s=1"):
        embedding.wait_for_gpu(1, 1.0)
    assert "waiting" not in capfd.readouterr().err  # under embedding.GPU_WAIT_SAY_S: nothing to say
    with pytest.raises(ConfigError, match="no GPU became available within embed.gpu_timeout_s=6"):
        embedding.wait_for_gpu(1, 6.0)
    assert ("biocurate: waiting up to embed.gpu_timeout_s=6 s for a GPU (1 per actor): the cluster has 0 now, "
            "its autoscaler can add up to 0\n") in capfd.readouterr().err  # said once, while it waits
    now, can = embedding.gpu_capacity()
    assert (now, can) == (0.0, 0.0)  # this machine: no GPU, no autoscaler to add one
    cfg = lambda device: load_config(None, {"input.path": "x", "output": "y", "embed.device": device,  # noqa: E731
                                            "embed.gpu_timeout_s": 1, "embed.models": [{"name": "m"}]})
    assert embedding.resolve_device(cfg("auto")) == "cpu"
    with pytest.raises(ConfigError, match="can add none"):
        embedding.resolve_device(cfg("cuda"))
    # an autoscaling GPU group at zero nodes: auto means GPU, and a GPU that never starts
    # (here: the autoscaler says it could, the local cluster never will) times out clearly
    monkeypatch.setattr(embedding, "gpu_capacity", lambda: (0.0, 8.0))
    with pytest.raises(ConfigError, match="no GPU became available"):
        embedding.resolve_device(cfg("auto"))
    assert embedding.resolve_device(cfg("cpu")) == "cpu"


def test_cli_errors_for_weights_dimension_and_cuda(tmp_path, photos):
    jpeg_corpus(tmp_path / "in", photos, ["astronaut"])
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--config"]
    cases = {
        "embed: {models: [{name: vit_l14_pn_bioclip-v2}], models_dir: %s}" % (tmp_path / "models"):
            ["weights for backbone vit_l14_pn_bioclip-v2 not found", "vit_l14_pn_bioclip-v2.pt", "load_pretrained_model"],
        "embed: {models: [{name: mobilenet_v2_imagenet, dim: 768}]}": ["dim 768 in the config", "1280-d"],
        # a species-level model named for dedup, with no threshold: said before Ray starts
        "embed: {models: [{name: mobilenet_v2_imagenet}, {name: tiny, network: vit_t16, size: 96, dim: 192, "
        "weights: %s}], roles: {dedup: tiny}}" % (tmp_path / "tiny.pt"): ["near_dedup.threshold", "'tiny'"],
    }
    tiny_vit(tmp_path / "tiny.pt")
    for text, wanted in cases.items():
        (tmp_path / "c.yaml").write_text(text + "\n")
        line = one_line_error(cli(*base, str(tmp_path / "c.yaml"))[0])
        assert all(w in line for w in wanted), line
    (tmp_path / "c.yaml").write_text("embed: {models: [{name: mobilenet_v2_imagenet}], device: cuda}\n"
                                     "run: {num_cpus: 1}\n")
    p, _ = cli(*base, str(tmp_path / "c.yaml"), timeout=360)
    assert p.returncode == 2, (p.stdout, p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("biocurate:") and not is_progress(line)]
    assert len(errors) == 1 and "embed.device is cuda, but the Ray cluster has no GPU" in errors[0], p.stderr
    assert not (tmp_path / "o" / "_SUCCESS").exists()
    # a custom network whose real output differs from its configured dim: found when the
    # actor loads it, reported as one line naming the model
    tiny_vit(tmp_path / "tiny.pt")
    (tmp_path / "c.yaml").write_text(
        "embed: {models: [{name: tiny, network: vit_t16, size: 96, dim: 100, weights: %s}]}\n"
        "run: {num_cpus: 2}\n" % (tmp_path / "tiny.pt"))
    p, _ = cli(*base, str(tmp_path / "c.yaml"), timeout=480)  # CI, two test processes on 2 cores: > 240 s
    assert p.returncode == 1, (p.stdout, p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("biocurate:") and not is_progress(line)]
    assert errors == ["biocurate: run failed: BackboneError: backbone tiny gives 192-d outputs, but 100 are "
                      "expected (its dim in the config or the registry)"], p.stderr[-3000:]
    assert not (tmp_path / "o" / "_SUCCESS").exists()
