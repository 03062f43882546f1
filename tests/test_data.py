"Bad input to `ZSLData`, file-backed image sources, and Shapes generator determinism across processes."
import copy, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from niwt_nb.core import NIWTInputError
from niwt_nb.data import ZSLData, make_toy_data, load_image, Resize


def _set(**kw):
    "A mutation of a valid toy dataset: field -> value or function of the dataset."
    def f(d):
        for k, v in kw.items(): setattr(d, k, v(d) if callable(v) else v)
    return f

def _split(name, fn):
    return _set(splits=lambda d: {**d.splits, name: fn(d)})

# toy: 6 classes, seen 0-3, unseen 4-5, val_classes [0], 6 images per class (labels = arange(6).repeat_interleave(6))
BAD = {
    "empty name": (_set(name=""), r"`name`: expected a non-empty string"),
    "duplicate class names": (_set(classes=lambda d: ["a"] * d.n_cls), r"`classes`: class names are repeated"),
    "float labels": (_set(labels=lambda d: d.labels.float()), r"`labels`: expected integer"),
    "label out of range": (_set(labels=lambda d: torch.where(d.labels == 5, 6, d.labels)), r"`labels`: class ids must lie in \[0, 6\)"),
    "unsorted seen": (_set(seen=torch.tensor([1, 0, 2, 3])), r"`seen`: class ids are not sorted"),
    "seen/unseen overlap": (_set(unseen=torch.tensor([3, 4, 5])), r"`unseen`: classes \[3\] are both seen and unseen"),
    "class neither seen nor unseen": (_set(unseen=torch.tensor([4])), r"`seen`: 1 classes are neither seen nor unseen"),
    "val class not seen": (_set(val_classes=torch.tensor([0, 5])), r"`val_classes`: classes \[5\] are not seen classes"),
    "all seen held out": (_set(val_classes=torch.arange(4)), r"`val_classes`: holds 4 of the 4 seen classes"),
    "missing split": (_set(splits=lambda d: {k: v for k, v in d.splits.items() if k != "val"}), r"`splits`: missing split\(s\) \['val'\]"),
    "split index out of range": (_split("test_unseen", lambda d: torch.cat([d.splits["test_unseen"], torch.tensor([999])])), r"`splits\['test_unseen'\]`: contains image ids outside"),
    "repeated image in split": (_split("test_seen", lambda d: d.splits["test_seen"].repeat(2)), r"`splits\['test_seen'\]`: contains repeated image ids"),
    "trainval overlaps test_seen": (_split("test_seen", lambda d: torch.cat([d.splits["test_seen"], d.splits["train"][:2]])), r"`splits\['test_seen'\]`: shares 2 images with 'trainval'"),
    "train/val not a partition": (_split("train", lambda d: d.splits["train"][1:]), r"'train' and 'val' do not partition 'trainval'"),
    "unseen image in trainval": (_set(labels=lambda d: torch.where(torch.arange(d.n_img) == int(d.splits["train"][0]), 5, d.labels)), r"`splits\['trainval'\]`: contains 1 images of non-seen classes"),
    "seen image in test_unseen": (_set(labels=lambda d: torch.where(torch.arange(d.n_img) == int(d.splits["test_unseen"][0]), 0, d.labels)), r"`splits\['test_unseen'\]`: contains 1 images of non-unseen classes"),
    "unseen class without images": (_split("test_unseen", lambda d: d.splits["test_unseen"][d.labels[d.splits["test_unseen"]] == 4]), r"classes \[5\] have no images in 'test_unseen'"),
    "dom rows": (_set(dom=lambda d: {"attributes": d.dom["attributes"][:5]}), r"`dom\['attributes'\]`: has 5 rows but there are 6 classes"),
    "dom not finite": (_set(dom=lambda d: {"attributes": d.dom["attributes"].index_put((torch.tensor([2]),), torch.tensor(float("inf")))}), r"`dom\['attributes'\]`: contains .* NaN/inf"),
    "dom not a dict": (_set(dom=lambda d: d.dom["attributes"]), r"`dom`: expected a dict"),
    "float images": (_set(images=lambda d: d.images.float()), r"`images`: expected uint8 pixels"),
    "too few images": (_set(images=lambda d: d.images[:-1]), r"`images`: dimension 0 should be 36"),
    "grey image tensor": (_set(images=lambda d: d.images[:, :1]), r"`images`: dimension 1 should be 3"),
    "path list too short": (_set(images=lambda d: ["x.png"] * (d.n_img - 1)), r"`images`: lists 35 files but there are 36 labels"),
    "attr_names vs dom": (_set(attr_names=["a", "b"]), r"`attr_names`: names 2 attributes but dom\['attributes'\] has 5 columns"),
    "img_attrs out of [0, 1]": (_set(img_attrs=lambda d: d.img_attrs * 100), r"`img_attrs`: values lie outside \[0, 1\]"),
    "img_attrs rows": (_set(img_attrs=lambda d: d.img_attrs[:10]), r"`img_attrs`: dimension 0 should be 36"),
    "masks not bool": (_set(masks=lambda d: d.masks.float()), r"`masks`: expected a bool tensor"),
    "masks wrong size": (_set(masks=lambda d: d.masks[:, :, :5]), r"`masks`: are \(8, 5\) but images are \(8, 8\)"),
    "boxes inverted": (_set(boxes=lambda d: d.boxes[:, [2, 3, 0, 1]]), r"`boxes`: some boxes have x2 < x1"),
    "caption key out of range": (_set(captions=lambda d: {**d.captions, 9: ["x"]}), r"`captions`: keys \[9\] are not class ids"),
    "caption class missing": (_set(captions=lambda d: {k: v for k, v in d.captions.items() if k != 2}), r"`captions`: classes \[2\] have no captions"),
    "empty caption list": (_set(captions=lambda d: {**d.captions, 1: []}), r"`captions`: entry for class 1 is not a non-empty list"),
    "parts without names": (_set(parts=lambda d: torch.zeros(d.n_img, 2, 3)), r"`part_names`: parts and part_names go together"),
    "part names without parts": (_set(part_names=["beak"]), r"`parts`: parts and part_names go together"),
    "part names count": (_set(parts=lambda d: torch.zeros(d.n_img, 2, 3), part_names=["beak"]), r"`part_names`: expected 2 non-empty part-name strings"),
    "parts rows": (_set(parts=lambda d: torch.zeros(d.n_img - 1, 1, 3), part_names=["beak"]), r"`parts`: dimension 0 should be 36"),
    "parts not (x, y, visible)": (_set(parts=lambda d: torch.zeros(d.n_img, 1, 2), part_names=["beak"]), r"`parts`: dimension 2 should be 3"),
    "parts visible flag": (_set(parts=lambda d: torch.full((d.n_img, 1, 3), 0.5), part_names=["beak"]), r"`parts`: the visible flags .* not all 0 or 1"),
    "parts not finite": (_set(parts=lambda d: torch.full((d.n_img, 1, 3), float("nan")), part_names=["beak"]), r"`parts`: contains .*NaN/inf"),
    "visible part outside the image": (_set(parts=lambda d: torch.tensor([[[3., 8.5, 1]]]).repeat(d.n_img, 1, 1), part_names=["beak"]),
                                       r"`parts`: 36 visible part locations lie outside the 8 x 8 images"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_validate_rejects(case):
    mutate, msg = BAD[case]
    d = make_toy_data()
    mutate(d)
    with pytest.raises(NIWTInputError, match=msg):
        d.validate()


def test_validate_accepts_and_normalises_dtypes():
    d = make_toy_data()
    d.labels = d.labels.int(); d.dom = {"attributes": d.dom["attributes"].double()}
    assert d.validate() is d
    assert d.labels.dtype == torch.long and d.dom["attributes"].dtype == torch.float32


# ---- file-backed image sources -----------------------------------------------------------------------------

def _file_data(tmp_path, n_per_class=6):
    "The toy dataset with its images written as PNG/JPEG files of mixed modes (RGB, L, RGBA, CMYK, P)."
    d = make_toy_data(n_per_class=n_per_class)
    modes = ["RGB", "L", "RGBA", "CMYK", "P"]
    paths = []
    for i in range(d.n_img):
        arr = d.images[i].permute(1, 2, 0).numpy()
        im = Image.fromarray(arr, "RGB")
        mode = modes[i % len(modes)]
        if mode != "RGB": im = im.convert(mode)
        p = tmp_path / f"img_{i:03d}.{'jpg' if mode == 'CMYK' else 'png'}"
        im.save(p)
        paths.append(p.name if i % 2 else str(p))   # mix of relative (needs meta['image_root']) and absolute paths
    d.images = paths; d.meta = {"image_root": str(tmp_path)}
    d.masks = None   # masks are only size-checked against in-memory images; keep this source minimal
    return d.validate()


def test_file_source_decodes_every_mode_to_rgb(tmp_path):
    d = _file_data(tmp_path)
    ref = make_toy_data()
    for i in range(5):
        x = d.image(i)
        assert x.dtype == torch.uint8 and x.shape == (3, 8, 8), (i, x.shape)
    assert torch.equal(d.image(0), ref.image(0))                         # RGB PNG is lossless
    grey = d.image(1)                                                     # mode L -> 3 equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    xb, yb, ib = next(iter(torch.utils.data.DataLoader(d.dataset("train", Resize(4)), batch_size=5)))
    assert xb.shape == (5, 3, 4, 4) and torch.equal(yb, d.labels[ib])


def test_greyscale_file_decodes_to_three_channels(tmp_path):
    p = tmp_path / "grey.png"
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6), "L").save(p)
    x = load_image(p)
    assert x.shape == (3, 5, 6)
    assert torch.equal(x[0], torch.arange(30, dtype=torch.uint8).view(5, 6)) and torch.equal(x[0], x[2])


def test_missing_file_names_path_and_index(tmp_path):
    d = _file_data(tmp_path)
    i = int(d.splits["test_seen"][1])
    victim = d.image_path(i); victim.unlink()
    ds = d.dataset("test_seen")
    with pytest.raises(NIWTInputError, match=rf"image {i} file '{victim}' does not exist.*Fix: check the dataset folder"):
        ds[1]
    with pytest.raises(NIWTInputError, match=rf"image {i} file"):
        list(torch.utils.data.DataLoader(ds, batch_size=4))


def test_corrupt_file_names_path_and_index(tmp_path):
    d = _file_data(tmp_path)
    i = 7
    d.image_path(i).write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    with pytest.raises(NIWTInputError, match=rf"image {i} file '{d.image_path(i)}' cannot be decoded.*Fix: re-download"):
        d.image(i)


def test_file_source_save_load_and_subset(tmp_path):
    d = _file_data(tmp_path)
    back = ZSLData.load(d.save(tmp_path / "d.pt"))
    assert back.images == d.images and back.fingerprint() == d.fingerprint()
    assert torch.equal(back.image(3), d.image(3))
    sub = d.subset_classes([1, 4])
    assert sub.n_img == 12 and sub.images[0] == d.images[6] and torch.equal(sub.image(0), d.image(6))


def test_subset_of_partial_download(tmp_path):
    "A class whose test_seen images are all missing is dropped by present_classes (the `--present-only` flow)."
    d = make_toy_data()
    keep = d.labels[d.splits["test_seen"]] != 2
    d.splits = {**d.splits, "test_seen": d.splits["test_seen"][keep]}
    with pytest.raises(NIWTInputError, match="have no images in 'test_seen'"):
        d.validate()
    sub = d.subset_classes(d.present_classes())
    assert sub.classes == ["class_0", "class_1", "class_3", "class_4", "class_5"]
    assert sub.meta["class_ids_original"] == [0, 1, 3, 4, 5]


def test_load_rejects_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, ("echo pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"format": "niwt_nb.ZSLData/1", "x": Evil()}, p)
    with pytest.raises(NIWTInputError, match="cannot be loaded safely"):
        ZSLData.load(p)


# ---- Shapes generator determinism ---------------------------------------------------------------------------

_TINY = "ShapesConfig(n_classes=10, n_unseen=3, n_val_classes=1, n_per_class=12, size=16, seed={seed})"


def _fingerprint_in_subprocess(seed):
    code = ("from niwt_nb.shapes import ShapesConfig, make_shapes\n"
            f"d = make_shapes({_TINY.format(seed=seed)}, cache=False)\n"
            "print(d.fingerprint(n=64))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip().splitlines()[-1]


def test_shapes_deterministic_across_processes():
    from niwt_nb.shapes import ShapesConfig, make_shapes
    here = make_shapes(eval(_TINY.format(seed=3)), cache=False)
    assert _fingerprint_in_subprocess(3) == here.fingerprint(n=64)
    assert _fingerprint_in_subprocess(4) != here.fingerprint(n=64)


def test_shapes_cache_written_under_niwt_cache(tmp_path):
    from niwt_nb.shapes import ShapesConfig, make_shapes
    cfg = eval(_TINY.format(seed=0))
    d1 = make_shapes(cfg)
    files = sorted(p.name for p in (Path(os.environ["NIWT_CACHE"]) / "shapes").iterdir())
    assert files == [f"{cfg.hash()}.json", f"{cfg.hash()}.pt"]
    assert make_shapes(cfg).fingerprint() == d1.fingerprint()


# ---- part locations -------------------------------------------------------------------------------------------

def _with_parts(d, seed=0):
    "`d` with two part locations per image: a visible one inside the image and one hidden part."
    g = torch.Generator().manual_seed(seed)
    H, W = d.images.shape[2:]
    vis = torch.cat([torch.rand(d.n_img, 1, 2, generator=g) * torch.tensor([W, H]), torch.ones(d.n_img, 1, 1)], 2)
    hidden = torch.cat([torch.full((d.n_img, 1, 2), -5.), torch.zeros(d.n_img, 1, 1)], 2)   # a hidden part may sit anywhere
    d.parts, d.part_names = torch.cat([vis, hidden], 1), ["beak", "left wing"]
    return d.validate()


def test_parts_follow_subsets_saves_and_fingerprints(tmp_path):
    d = _with_parts(make_toy_data())
    assert d.parts.shape == (36, 2, 3) and d.parts.dtype == torch.float32
    sub = d.subset_classes([1, 4, 5])
    old = torch.as_tensor(sub.meta["image_ids_original"])
    assert torch.equal(sub.parts, d.parts[old]) and sub.part_names == d.part_names
    assert torch.equal(sub.subset_classes([0, 2]).parts, d.parts[torch.as_tensor(sub.subset_classes([0, 2]).meta["image_ids_original"])])
    back = ZSLData.load(d.save(tmp_path / "d.pt"))
    assert torch.equal(back.parts, d.parts) and back.part_names == d.part_names and back.fingerprint() == d.fingerprint()
    plain = make_toy_data()
    assert d.fingerprint() != plain.fingerprint()
    e = _with_parts(make_toy_data()); e.parts[3, 0, 1] += 0.25
    assert e.fingerprint() != d.fingerprint()
    f = _with_parts(make_toy_data()); f.part_names = ["beak", "tail"]
    assert f.fingerprint() != d.fingerprint()


def test_parts_int_tensor_is_normalised():
    d = make_toy_data(); d.parts = torch.ones(d.n_img, 1, 3, dtype=torch.long); d.part_names = ["tail"]
    assert d.validate().parts.dtype == torch.float32


def test_fingerprint_without_parts_unchanged():
    "Datasets without part locations hash exactly as before the field existed (cached artifacts stay valid)."
    import hashlib, dataclasses
    from niwt_nb.data import _hash_obj
    d = make_toy_data()
    h = hashlib.sha256()
    for f in dataclasses.fields(d):
        if f.name not in ("meta", "parts", "part_names"): h.update(f.name.encode()); _hash_obj(h, getattr(d, f.name))
    assert d.fingerprint() == h.hexdigest()[:12]


def test_file_backed_parts_are_not_bounds_checked(tmp_path):
    "Part locations of image files are in the files' own pixels (unknown until decoded): only in-memory images are bounds-checked."
    d = _file_data(tmp_path)
    d.parts, d.part_names = torch.tensor([[[300., 200., 1.]]]).repeat(d.n_img, 1, 1), ["beak"]
    assert d.validate().parts.shape == (36, 1, 3)
