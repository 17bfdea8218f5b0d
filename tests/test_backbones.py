"""Backbones: the real offline MobileNetV2 weights, Birder architectures with random
weights through the same wrapper, and clear errors for missing weights."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stages.backbones import REGISTRY, BackboneError, load_backbone, spec


def _batch(arrays, size):
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(a).convert("RGB").resize((size, size),
                                                                                          Image.Resampling.BILINEAR))
                                      for a in arrays]))


def test_real_mobilenet_weights_see_a_photo_in_its_edited_copy(photos):
    bb = load_backbone("mobilenet_v2_imagenet")  # weights from the installed offline package
    names = ["astronaut", "coffee", "chelsea", "rocket", "china", "flower"]
    originals = [photos[n] for n in names]
    copies = []
    for a in originals:  # re-encoded at low quality, downsized, slightly cropped
        img = Image.fromarray(a)
        w, h = img.size
        img = img.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((w // 2, h // 2))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=60)
        copies.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    e = bb(_batch(originals, 224))
    c = bb(_batch(copies, 224))
    assert e.shape == (6, 1280) and torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-4)
    sim = (e @ c.T).numpy()
    for i in range(6):
        assert sim[i, i] > np.delete(sim[i], i).max(), (names[i], sim[i])


@pytest.mark.parametrize("name", ["vit_b16_pn_bioclip-v1", "resnet_v1_50_c1_sscd"])
def test_birder_architectures_with_random_weights(name):
    s = spec(name)
    bb = load_backbone(name, random_init=True)
    x = torch.randint(0, 256, (2, s.size, s.size, 3), dtype=torch.uint8)
    out = bb(x)
    assert out.shape == (2, s.dim) and torch.isfinite(out).all()
    # the same preprocessing as a direct model call
    direct = bb.features(((x.permute(0, 3, 1, 2).float() - bb.mean) / bb.std)).float()
    assert torch.allclose(out, torch.nn.functional.normalize(direct, dim=-1), atol=1e-5)


def test_registry_matches_the_issue():
    assert spec("vit_l14_pn_bioclip-v2").dim == 1024
    assert spec("vit_l14_pn_quick_gelu_openai-clip").dim == 768
    assert spec("vit_l14_pn_quick_gelu_openai-clip").output == "head"  # the CLIP projection
    assert {spec(f"vit_reg4_so150m_p14_ls_dino-v2-bio-{p}px").size for p in (224, 252, 336)} == {224, 252, 336}
    assert (spec("resnet_v1_50_c1_sscd").dim, spec("resnet_v1_50_c1_sscd").size) == (512, 320)
    assert len(REGISTRY) == 8


def test_missing_weights_and_unknown_names_are_clear(tmp_path):
    with pytest.raises(BackboneError) as e:
        load_backbone("vit_l14_pn_bioclip-v2", models_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "vit_l14_pn_bioclip-v2.pt" in msg and "load_pretrained_model" in msg
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("mobilenet_v2_imagenet", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("resnet_9000")


def test_fast_path_input_matches_birders_reference_transform(photos):
    """The fast input (libjpeg DCT-scaled decode covering the model input -> model_input)
    gives the real MobileNetV2 the same embedding as Birder's inference transform on a full
    decode. (Going through validate's 256-px image first costs ~0.006 of cosine: the embed
    stage resizes from the DCT-scaled decode.)"""
    import io

    from birder.data.transforms.classification import inference_preset

    from pipeline.testdata import images
    from stages.backbones import IMAGENET_STATS, model_input
    from stages.validate import decode_jpeg_scaled

    bb = load_backbone("mobilenet_v2_imagenet")
    reference = inference_preset((224, 224), {"mean": IMAGENET_STATS[0], "std": IMAGENET_STATS[1]})
    for name in ("astronaut", "coffee", "chelsea", "china", "flower"):
        big = Image.fromarray(photos[name]).resize((1600, 1100), Image.Resampling.LANCZOS)
        data = images.encode(big, "JPEG", quality=92)
        decoded = decode_jpeg_scaled(data, Image.open(io.BytesIO(data)), 224)
        assert decoded is not None and min(decoded.shape[:2]) < 1100  # DCT-scaled, not a full decode
        fast = bb(torch.from_numpy(model_input(decoded, 224).copy())[None])
        ref_x = reference(Image.open(io.BytesIO(data)).convert("RGB"))[None]  # normalized float
        with torch.inference_mode():
            ref = torch.nn.functional.normalize(bb.net(ref_x).float(), dim=-1)
        cos = float((fast * ref).sum())
        assert cos >= 0.995, (name, cos)
