"""Embedding stage kernels without Ray: one decode for every model, model input columns,
embedding columns, cache keys, the per-sha256 resolution of cached embeddings."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.testdata import images
from manifests.config import ConfigError, ValidateConfig, load_config
from stages import embed as emb
from stages.backbones import BackboneError, load_backbone, model_input, resolve_spec, save_birder_checkpoint, spec
from stages.validate import validate_batch_decodes, validate_image


def _plan(name="mobilenet_v2_imagenet", dtype="float16"):
    s = spec(name)
    return emb.ModelPlan(s, None, f"{name}@test", emb.prep_signature(s), dtype)


def _validated(good, n):
    """The first ``n`` real images validated with a decode covering 224 px."""
    names = sorted(good)[:n]
    nulls = pa.nulls(n, pa.string())
    table = pa.table({"id": names, "uri": names, "image_bytes": [good[k] for k in names],
                      "stage": nulls, "reason": nulls, "detail": nulls})
    return validate_batch_decodes(table, ValidateConfig(), 224)


def test_validate_decode_covers_the_largest_model_input(photos):
    big = Image.fromarray(photos["chelsea"]).resize((1600, 1200), Image.Resampling.LANCZOS)
    data = images.encode(big, "JPEG", quality=90)
    cfg = ValidateConfig()
    info = validate_image(data, cfg, cover=336)
    assert min(info.decoded.shape[:2]) >= 336 and min(info.decoded.shape[:2]) < 1200  # DCT-scaled, covers 336
    assert min(info.image.shape[:2]) == 256  # validate's own image is unchanged
    plain = validate_image(data, cfg)
    assert plain.decoded is None and plain.sha256 == info.sha256 and plain.width == 1600


def test_exif_orientation_reaches_the_model_input(photos):
    """A portrait stored sideways with EXIF orientation 6 gives the model the upright image."""
    upright = Image.fromarray(photos["astronaut"]).resize((300, 400))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    info = validate_image(buf.getvalue(), ValidateConfig(), cover=224)
    h, w = info.decoded.shape[:2]
    assert h > w and min(h, w) >= 256  # upright, and covering validate's 256 px
    ref = np.asarray(upright.resize((w, h), Image.Resampling.BICUBIC))
    diff = np.abs(info.decoded.astype(int) - ref.astype(int)).mean()
    assert diff < 6, diff


def test_model_inputs_shared_by_size_and_skipped_when_cached(good):
    out, decodes = _validated(good, 4)
    a, b = _plan(), _plan("vit_b16_pn_bioclip-v1")  # both 224 px: one pixel column
    sha = out.column("sha256").to_pylist()
    known = {b.name: emb.known_set([sha[1]])}
    got = emb.add_model_inputs(out, decodes, [a, b], known)
    assert [c for c in got.column_names if c.startswith("_px_")] == ["_px_224"]
    assert got.column(emb.need_column(a.name)).to_pylist() == [True] * 4
    assert got.column(emb.need_column(b.name)).to_pylist() == [True, False, True, True]
    imgs = emb.pixels(got.column("_px_224"), np.array([True, False, True, False]), 224)
    assert imgs.shape == (2, 224, 224, 3)
    assert np.array_equal(imgs[1], model_input(decodes[2], 224))


def test_embedding_column_round_trip():
    p = _plan()
    vals = np.random.default_rng(0).normal(size=(3, 1280)).astype(np.float32)
    mask = np.array([True, False, True, True])
    col = emb.embedding_array(vals, mask, p)
    assert col.type == pa.list_(pa.float16(), 1280) and col.null_count == 1
    back = np.array(col.filter(pa.array(mask)).to_pylist(), dtype=np.float32)
    assert np.allclose(back, vals, atol=2e-3 * np.abs(vals).max())


def test_cache_keys_and_known_sets():
    import hashlib

    sha = {i: hashlib.sha256(str(i).encode()).hexdigest() for i in range(6)}
    known = emb.known_set([sha[5], sha[1], sha[3]])
    assert emb.is_known(known, [sha[3], sha[4], None, sha[5], sha[0]]).tolist() == [True, False, False, True, False]
    assert emb.is_known(None, [sha[3]]).tolist() == [False]
    zero_tail = "ab" + "00" * 31  # numpy S16 drops trailing NULs: keys must still compare exactly
    assert emb.is_known(emb.known_set([zero_tail]), ["ab" + "00" * 15 + "11" * 16, "ab" + "00" * 14 + "01" + "00" * 16]).tolist() == [True, False]
    # as an Arrow column and back: the trailing NUL bytes survive (pa.array of numpy bytes drops them)
    keys = emb.cache_keys([zero_tail, sha[2]])
    col = emb.key_array(keys)
    assert col.type == pa.binary(16) and [len(b) for b in col.to_pylist()] == [16, 16]
    assert (np.asarray(col.to_pylist(), dtype="S16") == keys).all()


def test_resolve_group_fills_from_cache_and_marks_new_entries():
    p = _plan(dtype="float32")
    t = pa.list_(pa.float32(), 2)
    e = lambda *v: list(v)  # noqa: E731
    group = pa.table({"id": ["a", None, "b", None], "sha256": ["s"] * 4,
                      "embedding": pa.array([None, e(1.0, 0.0), e(0.0, 1.0), e(9.0, 9.0)], t)})
    out = emb.resolve_group(group, p).to_pylist()
    assert out == [{"id": "a", "sha256": "s", "embedding": [1.0, 0.0], "computed": False, "cache_new": False},
                   {"id": "b", "sha256": "s", "embedding": [0.0, 1.0], "computed": True, "cache_new": False}]
    fresh = pa.table({"id": ["x", "y"], "sha256": ["t", "t"], "embedding": pa.array([e(1.0, 2.0), None], t)})
    out = emb.resolve_group(fresh, p).to_pylist()
    assert [r["embedding"] for r in out] == [[1.0, 2.0], [1.0, 2.0]]
    assert [r["cache_new"] for r in out] == [True, False]
    lost = pa.table({"id": ["z"], "sha256": ["u"], "embedding": pa.array([None], t)})
    assert emb.resolve_group(lost, p).column("embedding").null_count == 1


def test_embed_models_callable_matches_a_direct_call(good):
    """The actor class on a batch equals the backbone called on the same inputs."""
    out, decodes = _validated(good, 3)
    p = _plan(dtype="float32")
    batch = emb.add_model_inputs(out, decodes, [p])
    stage = emb.EmbedModels([p], batch_size=2)
    got = stage(batch)
    assert not any(c.startswith(("_px_", "_need_")) for c in got.column_names)
    assert stage.calls == {p.name: 3}
    direct = load_backbone(p.name)(torch.from_numpy(np.stack([model_input(d, 224) for d in decodes])))
    assert np.allclose(np.array(got.column(p.column).to_pylist()), direct.numpy(), atol=1e-5)


def test_embedding_does_not_depend_on_batch_mates_and_each_call_commits_to_the_cache(good, tmp_path):
    """Model calls always hold batch_size images (the last chunk padded): an image gives
    the same bits alone, in a padded chunk or in a full one. Each call writes its new
    embeddings as one whole blk-*.parquet file before it returns (the unit of resume)."""
    import pyarrow.parquet as pq

    out, decodes = _validated(good, 6)
    p = _plan(dtype="float16")
    batch = emb.add_model_inputs(out, decodes, [p])
    stage = emb.EmbedModels([p], batch_size=4, cache_dirs={p.name: str(tmp_path / "cache")})
    whole = stage(batch)  # a full chunk of 4, then 2 padded to 4
    alone = [stage(batch.slice(i, 1)) for i in range(len(batch))]  # each padded to 4
    a = np.array(whole.column(p.column).to_pylist(), dtype=np.float16)
    b = np.array([t.column(p.column)[0].as_py() for t in alone], dtype=np.float16)
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    files = sorted((tmp_path / "cache").glob("blk-*.parquet"))
    assert len(files) == 1 + len(batch) and not list((tmp_path / "cache").glob(".*"))
    cached = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    by_sha = {r["sha256"]: np.asarray(r["embedding"], np.float16) for r in cached}
    for sha, row in zip(out.column("sha256").to_pylist(), a):
        assert np.array_equal(by_sha[sha], row)


def test_custom_birder_network_round_trips_through_a_checkpoint(tmp_path):
    s = resolve_spec("tiny", network="vit_t16", size=64, dim=192)
    torch.manual_seed(0)
    from birder.model_registry import registry

    net = registry.net_factory("vit_t16", 0, size=(64, 64))
    save_birder_checkpoint(net, tmp_path / "tiny.pt", s)
    bb = load_backbone(s, weights=str(tmp_path / "tiny.pt"))
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    ref = torch.nn.functional.normalize(net.eval().embedding(((x.permute(0, 3, 1, 2).float() - bb.mean) / bb.std)), dim=-1)
    assert torch.allclose(bb(x), ref, atol=1e-5)
    wrong = resolve_spec("tiny", network="vit_t16", size=64, dim=100)
    with pytest.raises(BackboneError, match="gives 192-d outputs, but 100 are expected"):
        load_backbone(wrong, weights=str(tmp_path / "tiny.pt"))(x)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(BackboneError, match="dim 512 in the config, but the model gives 1280"):
        resolve_spec("mobilenet_v2_imagenet", dim=512)
    with pytest.raises(BackboneError, match="needs size and dim"):
        resolve_spec("x", network="vit_t16")
    with pytest.raises(BackboneError, match="not a Birder network"):
        resolve_spec("x", network="no_such_net", size=64, dim=8)
    with pytest.raises(ConfigError, match="role sample names 'b'"):
        load_config(None, {"input.path": "x", "output": "y", "embed.models": [{"name": "a"}],
                           "embed.roles": {"sample": "b"}})
    with pytest.raises(ConfigError, match="embed.device"):
        load_config(None, {"input.path": "x", "output": "y", "embed.device": "tpu"})
    cfg = load_config(None, {"input.path": "x", "output": "y",
                             "embed.models": [{"name": "a"}, {"name": "b"}], "embed.roles": {"dedup": "b"}})
    assert cfg.embed.model_for("dedup") == "b" and cfg.embed.model_for("sample") == "a"

