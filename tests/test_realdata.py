"""Real benchmarks: CUB/AWA2/xlsa17 loaders on ../shared/data (skipped without it), the same code paths on tiny
generated folders and .mat files (always run), the feature-level path, and hypothesis fuzzing of every parser."""
import atexit, json, math, os, re, shutil, tempfile, zipfile
from pathlib import Path
import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from niwt_nb.core import NIWTInputError
from niwt_nb import xlsa17 as X
from niwt_nb.xlsa17 import (read_splits_mat, read_res101_mat, read_class_list, read_img_list, read_lab_list, verify_file, fetch,
                            SPLIT_KEYS, build_xlsa17_data)
from niwt_nb.cub import (load_cub, make_fake_cub, image_file, image_captions, read_id_names, read_id_ints, read_boxes,
                         read_captions_file, read_captions, read_parts, read_part_locs, FAKE_PARTS)
from niwt_nb.awa2 import load_awa2, make_fake_awa2, read_binary_matrix
from niwt_nb.presets import PRESETS, preset_config
from niwt_nb.features import (FeatureData, FeatureNet, FeatureModelConfig, build_feature_model, load_xlsa17_features,
                              make_fake_xlsa17_features)
from niwt_nb import pipeline
from niwt_nb.pipeline import RunConfig, run_niwt, DATASETS
from niwt_nb.models import ModelConfig, TrainConfig, train_seen
from niwt_nb.importance import ImportanceConfig, extract_alphas
from niwt_nb.dom2alpha import Dom2AlphaConfig
from niwt_nb.alpha2w import Alpha2WConfig, fit_alpha2w

TINY_RUN = dict(model=ModelConfig(backbone="smallcnn", width=8), train=TrainConfig(epochs=2, bs=64, lr=3e-3, patience=None),
                importance=ImportanceConfig(bs=128), dom2alpha=Dom2AlphaConfig(max_epochs=30), alpha2w=Alpha2WConfig(max_steps=60),
                n_feed=16, baselines=())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_DIR = Path(tempfile.mkdtemp(prefix="niwt_fuzz_"))          # files rewritten by every fuzz example
atexit.register(shutil.rmtree, FUZZ_DIR, True)


def _lines(p):
    return [l for l in Path(p).read_text().splitlines() if l.strip()]


# ---------------------------------------------------------------- real files (../shared/data)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"   # same place as conftest's `shared_data` fixture

@pytest.fixture(scope="module")
def cub_full():
    "All of CUB's metadata (file-backed, images not checked): built once per module."
    if not SHARED.is_dir(): pytest.skip(f"real benchmark files not found at {SHARED}")
    return load_cub(SHARED / "cub", check_images=False, verbose=False)


@pytest.mark.shared
def test_cub_splits_classes_attributes(shared_data, cub_full):
    d, cub = cub_full, shared_data / "cub" / "CUB_200_2011"
    assert [len(d.splits[k]) for k in SPLIT_KEYS] == [7057, 1764, 2967]
    assert (len(d.seen), len(d.unseen), d.n_img) == (150, 50, 11788)
    assert d.classes == [l.split()[1] for l in _lines(cub / "classes.txt")]                  # CUB order 001..200
    assert d.attr_names == [l.split()[1] for l in _lines(cub / "attributes.txt")]
    cont = torch.from_numpy(np.loadtxt(cub / "attributes" / "class_attribute_labels_continuous.txt")).float()
    torch.testing.assert_close(d.dom["attributes_raw"], cont, atol=1e-4, rtol=0)            # class permutation is right
    torch.testing.assert_close(d.dom["attributes"], cont / cont.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)  # documented normalisation
    assert d.dom["sent"].shape == (200, 1024) and d.meta["attr_w2v"].shape == (312, 300)
    xl = shared_data / "cub" / "xlsa17"
    assert {d.classes[c] for c in d.seen.tolist()} == set(_lines(xl / "trainvalclasses.txt"))
    assert {d.classes[c] for c in d.unseen.tolist()} == set(_lines(xl / "testclasses.txt"))
    assert {d.classes[c] for c in d.val_classes.tolist()} == set(_lines(xl / "valclasses1.txt"))


@pytest.mark.shared
def test_cub_label_mapping_and_image_order(shared_data, cub_full):
    d = cub_full
    img_list = [l.strip() for l in _lines(shared_data / "cub" / "xlsa17_res101_meta" / "img_list.txt")]
    images_txt = [l.split()[1] for l in _lines(shared_data / "cub" / "CUB_200_2011" / "images.txt")]
    assert d.images == img_list and sorted(images_txt) == img_list and images_txt != img_list   # xlsa17 order = sorted paths != images.txt order
    assert all(f.split("/")[0] == d.classes[l] for f, l in zip(d.images, d.labels.tolist()))
    lab = read_lab_list(shared_data / "cub" / "xlsa17_res101_meta" / "lab_list.txt")
    names = read_splits_mat(shared_data / "cub" / "xlsa17" / "att_splits.mat")["classes"]
    assert [names[l] for l in lab.tolist()] == [d.classes[l] for l in d.labels.tolist()]    # labels index allclasses_names
    # boxes follow the file name, not the row: compare with bounding_boxes.txt through images.txt ids
    bb = {i + 1: list(map(float, l.split()[1:])) for i, l in enumerate(_lines(shared_data / "cub" / "CUB_200_2011" / "bounding_boxes.txt"))}
    for i in (0, 1, 500, 11787):
        cid = images_txt.index(d.images[i]) + 1
        x, y, w, h = bb[cid]
        assert d.boxes[i].tolist() == [x, y, x + w, y + h]


CUB25_UNSEEN = ["004.Groove_billed_Ani", "012.Yellow_headed_Blackbird", "023.Brandt_Cormorant"]
CUB25_VAL = ["005.Crested_Auklet", "007.Parakeet_Auklet", "009.Brewer_Blackbird", "018.Spotted_Catbird"]


@pytest.mark.shared
def test_cub_missing_images_error(shared_data):
    with pytest.raises(NIWTInputError, match=r"10386 of 11788 images are missing .*175 of 200 classes.*present_only=True"):
        load_cub(shared_data / "cub")


@pytest.mark.shared
def test_cub25_present_only_images_boxes_captions(shared_data):
    "Classes 001-025 have their photos in ../shared: a real 22-seen / 3-unseen problem; captions exist for 001-010 only."
    d = load_cub(shared_data / "cub", present_only=True, semantic=("attributes", "sent"), verbose=False)
    classes = [l.split()[1] for l in _lines(shared_data / "cub" / "CUB_200_2011" / "classes.txt")]
    assert d.classes == classes[:25]
    on_disk = sum(1 for c in classes[:25] for _ in (shared_data / "cub" / "CUB_200_2011" / "images" / c).glob("*.jpg"))
    assert (len(d.seen), len(d.unseen), d.n_img) == (22, 3, 1402) == (22, 3, on_disk)
    assert [d.classes[c] for c in d.unseen] == CUB25_UNSEEN and [d.classes[c] for c in d.val_classes] == CUB25_VAL
    assert d.meta["present_only"]["n_dropped"] == 175 and set(d.dom) >= {"attributes", "attributes_raw", "sent"}
    assert (torch.as_tensor(d.meta["image_ids_original"]) < 11788).all()
    assert d.captions is None and "captions dropped: 15 classes" in d.meta["captions_note"]   # 011-025 have none
    grey, n_caps, over = 0, 0, 0
    for i in range(d.n_img):                                                            # decode EVERY present image
        x = d.image(i)
        assert x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3
        H, W = x.shape[1:]
        b = d.boxes[i]
        assert 0 <= b[0] < b[2] and 0 <= b[1] < b[3] and b[0] < W and b[1] < H, (i, b, (W, H))
        over += bool(b[2] > W + 2 or b[3] > H + 2)                                     # a few CUB boxes overshoot the photo
        if torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]): grey += 1
        f = image_file(d, i)
        assert f.split("/")[0] == d.classes[d.labels[i]]
        caps = image_captions(d, i)
        if int(f[:3]) <= 10:
            assert len(caps) == 10 and caps == [l.strip() for l in _lines(shared_data / "cub" / "text_c10" / f.replace(".jpg", ".txt"))]
            n_caps += 1
        else: assert caps == []
    assert grey >= 1                                                                     # Brewer_Blackbird_0028_2682.jpg is greyscale
    assert over <= 14                                                                    # 1 %
    assert n_caps == int(torch.isin(d.labels, torch.arange(10)).sum())
    with pytest.raises(NIWTInputError, match=r"`captions_dir`: 15 classes have no captions"):
        load_cub(shared_data / "cub", present_only=True, semantic="captions", verbose=False)


@pytest.mark.shared
def test_cub25_run_niwt_end_to_end(shared_data, tmp_path):
    "The registered 'cub' loader, photos of mixed sizes decoded by the pipeline (shorter side + centre crop), sentence embeddings."
    m = run_niwt(RunConfig(dataset="cub", root=str(shared_data / "cub"), present_only=True, semantic="sent", img_size=32, **TINY_RUN),
                 out=tmp_path / "run", log=lambda *a: None, report=False)
    n = m["methods"]["niwt"]
    assert all(0 <= n[k] <= 1 for k in ("u", "s", "H", "zsl_top1"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["per_seed"][0]["keys"]["data"]
    d = m["_runs"][0].d
    assert d.images.shape == (1402, 3, 32, 32) and d.meta["decode"] == "crop"
    area = (d.boxes[:, 2:] - d.boxes[:, :2]).clamp_min(0).prod(1)
    assert (d.boxes >= 0).all() and (d.boxes <= 32).all() and (area > 0).float().mean() > 0.99   # birds stay in the central crop
    with pytest.raises(NIWTInputError, match=r"`semantic`: 'captions' needs .* \(captions dropped: 15 classes have none of 25\)"):
        run_niwt(RunConfig(dataset="cub", root=str(shared_data / "cub"), present_only=True, semantic="captions", **TINY_RUN),
                 out=None, log=lambda *a: None)


@pytest.mark.shared
def test_cub_classes_with_captions_get_them_back_and_parts_survive_the_image_cache(shared_data, tmp_path):
    "`classes='1-10'` (the classes that have captions) makes `semantic='captions'` valid; a load from the image cache moves parts as decoding did."
    from niwt_nb.core import ArtifactStore
    cfg = RunConfig(dataset="cub", root=str(shared_data / "cub"), present_only=True, classes="1-10", semantic="captions", img_size=32, **TINY_RUN)
    store = ArtifactStore(tmp_path / "store")
    d1, _ = pipeline.load_run_data(cfg, store)                                     # decodes, fills the image cache
    assert (d1.n_cls, len(d1.seen), len(d1.unseen), sorted(d1.captions)) == (10, 9, 1, list(range(10)))
    assert d1.captions[0][0] == image_captions(d1, int((d1.labels == 0).nonzero()[0]))[0]   # class captions = its images' captions
    d2, _ = pipeline.load_run_data(cfg, store)                                     # from the image cache
    assert d1.parts is not None and torch.equal(d2.images, d1.images)
    torch.testing.assert_close(d2.parts, d1.parts); torch.testing.assert_close(d2.boxes, d1.boxes)
    vis = d1.parts[..., 2] > 0
    xy = d1.parts[..., :2][vis]                                                    # visible parts: in pixels of the 32-px crop
    assert (xy >= 0).all() and (xy < 32).all() and float(vis.float().mean()) > 0.3


@pytest.mark.shared
def test_awa2_splits_classes_attributes(shared_data):
    a, meta = load_awa2(shared_data / "awa2", check_images=False, verbose=False), shared_data / "awa2" / "awa_meta"
    assert [len(a.splits[k]) for k in SPLIT_KEYS] == [23527, 5882, 7913]
    assert (len(a.seen), len(a.unseen), a.n_img) == (40, 10, 37322)
    assert a.classes == [l.split()[1] for l in _lines(meta / "classes.txt")]
    assert a.attr_names == [l.split()[1] for l in _lines(meta / "predicates.txt")]
    torch.testing.assert_close(a.dom["attributes_binary"], torch.from_numpy(np.loadtxt(meta / "predicate-matrix-binary.txt")).float())
    assert all(f.split("/")[0] == a.classes[l] for f, l in zip(a.images, a.labels.tolist()))
    assert {a.classes[c] for c in a.unseen.tolist()} == set(_lines(shared_data / "awa2" / "xlsa17" / "testclasses.txt"))
    assert a.meta["missing_attributes"] == [[0, 0], [0, 1], [0, 2], [0, 3]]               # AwA's -1 entries, kept as xlsa17 does
    with pytest.raises(NIWTInputError, match="37322 of 37322 images are missing"):
        load_awa2(shared_data / "awa2")


@pytest.mark.shared
def test_shared_checksums(shared_data):
    rows = {l.split("\t")[0]: l for l in (shared_data / "PROVENANCE.tsv").read_text().splitlines()}
    for f in ("cub/xlsa17/att_splits.mat", "awa2/xlsa17/att_splits.mat", "cub/CUB_200_2011/classes.txt"):
        sha = re.search(r"sha256=([0-9a-f]{64})", rows[f]).group(1)
        assert verify_file(shared_data / f, sha256=sha) == sha
    with pytest.raises(NIWTInputError, match="has sha256"):
        verify_file(shared_data / "cub/xlsa17/sent_splits.mat", sha256="0" * 64)


# ---------------------------------------------------------------- tiny CUB-layout folder (always)
def test_fake_cub_matches_its_files(tmp_path):
    root = make_fake_cub(tmp_path / "cub", img_list=True)
    d = load_cub(root, semantic=("attributes", "sent", "captions"), verbose=False)
    assert d.meta["image_order"] == "img_list.txt" and d.images == sorted(d.images)
    images_txt = [l.split()[1] for l in _lines(root / "CUB_200_2011" / "images.txt")]
    bb = [list(map(float, l.split()[1:])) for l in _lines(root / "CUB_200_2011" / "bounding_boxes.txt")]
    for i, f in enumerate(d.images):
        assert f.split("/")[0] == d.classes[d.labels[i]]
        x, y, w, h = bb[images_txt.index(f)]
        assert d.boxes[i].tolist() == [x, y, x + w, y + h]
    m = scipy.io.loadmat(root / "xlsa17" / "att_splits.mat")
    for k in SPLIT_KEYS: assert d.splits[k].tolist() == (m[f"{k}_loc"].ravel().astype(int) - 1).tolist()
    assert "attr_w2v" in d.meta and d.dom["sent"].shape == (6, 8)
    assert d.image(1)[0].equal(d.image(1)[2])                                            # greyscale JPEG -> RGB
    # xlsa17's res101.mat (absolute paths, labels into allclasses_names) takes precedence over img_list.txt
    names = read_splits_mat(root / "xlsa17" / "att_splits.mat")["classes"]
    scipy.io.savemat(root / "xlsa17" / "res101.mat", dict(
        features=np.zeros((2, d.n_img)), labels=np.array([[names.index(d.classes[l]) + 1] for l in d.labels.tolist()]),
        image_files=np.array([[np.array([f"/BS/xian/CUB_200_2011/images/{f}"])] for f in d.images], dtype=object)))
    r = load_cub(root, verbose=False)
    assert r.meta["image_order"] == "res101.mat" and r.images == d.images and torch.equal(r.labels, d.labels)
    # a dataset with everything (captions, w2v, boxes, meta) saves and loads safely
    back = type(d).load(d.save(tmp_path / "cub.pt"))
    assert back.fingerprint() == d.fingerprint() and image_captions(back, 3) == image_captions(d, 3)


def test_fake_cub_inconsistent_files_raise(tmp_path):
    root = make_fake_cub(tmp_path / "cub", img_list=True)
    lab = root / "xlsa17_res101_meta" / "lab_list.txt"
    vals = _lines(lab); vals[0], vals[-1] = vals[-1], vals[0]; lab.write_text("\n".join(vals))
    with pytest.raises(NIWTInputError, match="is labelled"): load_cub(root, verbose=False)
    root = make_fake_cub(tmp_path / "cub2", img_list=True)
    il = root / "xlsa17_res101_meta" / "img_list.txt"
    rows = _lines(il); il.write_text("\n".join(rows[:-1] + ["/x/images/001.Bird_A/extra.jpg"]))
    with pytest.raises(NIWTInputError, match="list different images"): load_cub(root, verbose=False)
    root = make_fake_cub(tmp_path / "cub3")
    m = scipy.io.loadmat(root / "xlsa17" / "sent_splits.mat"); m["test_seen_loc"] = m["test_seen_loc"][:-1]
    scipy.io.savemat(root / "xlsa17" / "sent_splits.mat", {k: v for k, v in m.items() if not k.startswith("__")})
    with pytest.raises(NIWTInputError, match="disagree on `test_seen_loc`"): load_cub(root, verbose=False)
    root = make_fake_cub(tmp_path / "cub4")
    (root / "xlsa17" / "testclasses.txt").write_text("001.Bird_A\n")
    with pytest.raises(NIWTInputError, match="not listed in testclasses.txt"): load_cub(root, verbose=False)
    root = make_fake_cub(tmp_path / "cub5", captions=False)
    with pytest.raises(NIWTInputError, match="needs Reed's text_c10"): load_cub(root, semantic="captions", verbose=False)
    shutil.rmtree(root / "CUB_200_2011" / "images" / "002.Bird_B")
    with pytest.raises(NIWTInputError, match=r"6 of 36 images are missing .*1 of 6 classes"): load_cub(root, verbose=False)
    shutil.rmtree(root / "CUB_200_2011" / "images" / "005.Bird_E")                          # both unseen classes gone
    with pytest.raises(NIWTInputError, match=r"\(4 seen, 0 unseen\) do not make a zero-shot problem"):
        load_cub(root, present_only=True, verbose=False)


def test_fake_cub_present_only_and_val_fallback(tmp_path, capsys):
    root = make_fake_cub(tmp_path / "cub", n_cls=8, unseen=(2, 6), per_class=5)
    shutil.rmtree(root / "CUB_200_2011" / "images" / "001.Bird_A")                          # the listed val class
    (root / "text_c10" / "004.Bird_D" / "Bird_D_0001_100.txt").unlink()                     # class D lacks one caption file
    with pytest.raises(NIWTInputError, match="1 classes have no captions"):
        load_cub(root, present_only=True, semantic="captions")
    d = load_cub(root, present_only=True, semantic="attributes")
    assert "kept 7 of 8 classes" in capsys.readouterr().out
    assert d.captions is None and "captions dropped" in d.meta["captions_note"]
    assert d.meta["val_classes_source"].startswith("fallback") and len(d.val_classes) == 1   # min(5, 5 seen // 3)
    assert d.classes[0] == "002.Bird_B" and d.meta["class_ids_original"] == [1, 2, 3, 4, 5, 6, 7]
    n = load_cub(root, present_only=True, val_classes=None, verbose=False)
    assert n.meta["val_classes_source"].startswith("fallback")
    named = load_cub(root, present_only=True, val_classes=["004.Bird_D", "008.Bird_H"], verbose=False)
    assert [named.classes[c] for c in named.val_classes] == ["004.Bird_D", "008.Bird_H"]
    with pytest.raises(NIWTInputError, match="unknown class names"): load_cub(root, present_only=True, val_classes=["nope"])


def test_fake_cub_run_niwt(tmp_path, monkeypatch):
    root = make_fake_cub(tmp_path / "cub", n_cls=6, per_class=8)
    monkeypatch.setitem(DATASETS, "fakecub_test", lambda cfg: load_cub(root, img_size=16, semantic=cfg.semantic, verbose=False))
    m = run_niwt(RunConfig(dataset="fakecub_test", **TINY_RUN), out=tmp_path / "run", log=lambda *a: None, report=False)
    assert set(m["methods"]) >= {"niwt"} and math.isfinite(m["methods"]["niwt"]["H"])
    # the registered 'cub' loader reads RunConfig.root and present_only, and keeps the image files for the pipeline to decode
    from niwt_nb.cub import cub_from_config
    d = cub_from_config(RunConfig(dataset="cub", root=str(root), present_only=True, img_size=8))
    assert d.n_img == 48 and isinstance(d.images, list)
    d8, _ = pipeline.load_run_data(RunConfig(dataset="cub", root=str(root), img_size=8), check=False)
    assert d8.images.shape == (48, 3, 8, 8)


def test_fake_awa2(tmp_path):
    root = make_fake_awa2(tmp_path / "awa2", img_list=True)
    a = load_awa2(root, verbose=False)
    assert a.meta["image_order"] == "img_list.txt"
    assert all(f.split("/")[0] == a.classes[l] for f, l in zip(a.images, a.labels.tolist()))
    assert a.dom["attributes_binary"].tolist() == [[float(v) for v in l.split()] for l in _lines(root / "Animals_with_Attributes2" / "predicate-matrix-binary.txt")]
    shutil.rmtree(root / "Animals_with_Attributes2" / "JPEGImages" / "killer+whale")         # the only unseen class
    with pytest.raises(NIWTInputError, match="do not make a zero-shot problem"): load_awa2(root, present_only=True, verbose=False)


def test_presets_are_runconfigs():
    for name in PRESETS:
        cfg = preset_config(name, root="/nowhere")
        assert isinstance(cfg, RunConfig) and cfg.model.weights == "imagenet" and cfg.train.img_size == 224
    assert preset_config("cub_resnet101").model.layer == "layer4.0" and preset_config("awa2_vgg16").model.layer == "conv5_3"
    assert preset_config("cub_resnet101").alpha2w.lr == 1e-4 and preset_config("awa2_resnet101").alpha2w.lr == 1e-3


# ---------------------------------------------------------------- feature level (tiny res101.mat)
def test_features_stages_and_pipeline(tmp_path):
    xdir = make_fake_xlsa17_features(tmp_path / "xlsa17" / "data" / "CUB", per_class=10, K=2048)   # real width, few images
    fd = load_xlsa17_features(xdir)
    assert isinstance(fd, FeatureData) and fd.images.shape == (60, 2048, 1, 1)
    raw = scipy.io.loadmat(xdir / "res101.mat")
    torch.testing.assert_close(fd.images[:, :, 0, 0], torch.from_numpy(raw["features"].T).float())
    names = read_splits_mat(xdir / "att_splits.mat")["classes"]
    assert [fd.classes[l] for l in fd.labels] == [names[l - 1] for l in raw["labels"].ravel()]
    # the registered 'cub_res101' dataset runs through the pipeline: FeatureNet, its features fed to alpha2w as they are
    cfg = RunConfig(dataset="cub_res101", root=str(tmp_path), **{**TINY_RUN, "model": FeatureModelConfig(hidden=64, out_features=32)})
    m = run_niwt(cfg.replace(train=TrainConfig(epochs=20, lr=3e-3, bs=32, patience=None)), log=lambda *a: None, report=False)
    assert math.isfinite(m["methods"]["niwt"]["H"]) and m["_runs"][0].model.K == 2048


# ---------------------------------------------------------------- downloads
def test_fetch_offline_local_and_unsafe(tmp_path):
    with pytest.raises(NIWTInputError, match=r"could not download .*offline.*put it at"):
        fetch("cub", tmp_path / "off", url="http://127.0.0.1:9/CUB_200_2011.tgz", timeout=5)
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "ok.zip", "w") as z: z.writestr("data/a.txt", "x")
    with pytest.warns(UserWarning, match="no published checksum"):
        out = fetch("xlsa17", tmp_path / "dl", url=(tmp_path / "z" / "ok.zip").as_uri())
    assert (out / "data" / "a.txt").read_text() == "x" and (out / "xlsa17.zip.sha256").is_file()
    assert fetch("xlsa17", tmp_path / "dl", url="http://127.0.0.1:9/never-downloaded.zip") == out   # present + pinned: no download
    (out / "xlsa17.zip").write_bytes(b"changed")
    with pytest.raises(NIWTInputError, match="has sha256"): fetch("xlsa17", tmp_path / "dl")
    with zipfile.ZipFile(tmp_path / "z" / "evil.zip", "w") as z: z.writestr("../evil.txt", "x")
    with pytest.raises(NIWTInputError, match="outside the target folder"):
        fetch("xlsa17", tmp_path / "dl3", url=(tmp_path / "z" / "evil.zip").as_uri(), sha256=X._hexdigest(tmp_path / "z" / "evil.zip", "sha256"))
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------- fuzzing: malformed input -> NIWTInputError, never another error
def _write(name, data: bytes) -> Path:
    p = FUZZ_DIR / name; p.write_bytes(data); return p

def _only_niwt_errors(fn, *a):
    "Call `fn`; return its result, or None when it raised NIWTInputError (any other exception fails the test)."
    try: return fn(*a)
    except NIWTInputError: return None

text_lines_st = st.lists(st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.builds(lambda i, s: f"{i} {s}", st.integers(-2, 5), st.text(alphabet="ab.\t _/", max_size=6)),
    st.builds(lambda i, *f: f"{i} " + " ".join(f), st.integers(0, 4), *[st.sampled_from(["0", "1.5", "-3", "nan", "1e999", "x", "2"])] * 4)),
    max_size=6).map("\n".join)
file_bytes_st = st.one_of(st.binary(max_size=200), text_lines_st.map(lambda s: s.encode("utf-8")))

@FUZZ
@given(file_bytes_st)
def test_fuzz_cub_text_parsers(data):
    p = _write("f.txt", data)
    nonblank = len([l for l in data.decode("utf-8-sig", "replace").split("\n") if l.strip()])
    names = _only_niwt_errors(read_id_names, p)
    if names is not None:
        assert len(names) == nonblank and len(set(names)) == len(names) and all(n and not n.isspace() for n in names)
        ids = sorted(int(l.split()[0]) for l in data.decode("utf-8-sig").split("\n") if l.strip())
        assert ids == list(range(1, nonblank + 1))
    b = _only_niwt_errors(read_boxes, p)
    if b is not None: assert b.shape == (nonblank, 4) and torch.isfinite(b).all() and (b[:, 2:] >= b[:, :2]).all()
    v = _only_niwt_errors(read_id_ints, p)
    if v is not None: assert v.shape == (nonblank,) and (v >= 0).all()
    c = _only_niwt_errors(read_class_list, p)
    if c is not None: assert len(c) == nonblank and all(len(n.split()) == 1 for n in c)
    il = _only_niwt_errors(read_img_list, p)
    if il is not None: assert len(il) == nonblank and all(k.count("/") == 1 for k in il)
    lab = _only_niwt_errors(read_lab_list, p)
    if lab is not None: assert lab.shape == (nonblank,) and (lab >= 0).all()
    m = _only_niwt_errors(read_binary_matrix, p)
    if m is not None: assert m.shape[0] == nonblank and set(m.unique().tolist()) <= {0.0, 1.0}
    caps = _only_niwt_errors(read_captions_file, p)
    if caps is not None: assert len(caps) == nonblank and all(s == s.strip() and s for s in caps)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"MATLAB 5.0 MAT-file, Platform: x" + bytes(92) + b"\x00\x01IM" + b)))
def test_fuzz_mat_bytes(data):
    p = _write("f.mat", data)
    _only_niwt_errors(read_splits_mat, p)                          # random bytes: NIWTInputError, never another exception
    _only_niwt_errors(read_res101_mat, p)


def _base_splits():
    names = np.array([[np.array([n])] for n in ("b", "a", "c")], dtype=object)
    return dict(allclasses_names=names, att=np.arange(12.).reshape(4, 3) + 1, original_att=(np.arange(12.).reshape(4, 3) + 1) * 10,
                trainval_loc=np.array([[1], [2]]), test_seen_loc=np.array([[3]]), test_unseen_loc=np.array([[4], [5]]))

def _cast(dtype, a):
    if np.issubdtype(dtype, np.floating):
        with np.errstate(over="ignore"): return a.astype(dtype)
    return np.nan_to_num(a, nan=0, posinf=7, neginf=-2).clip(-3, 9).astype(dtype)

mat_value_st = st.one_of(
    st.builds(_cast, st.sampled_from([np.float64, np.float32, np.int32, np.uint16, np.uint8, np.int64, np.bool_]),
              hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
                         elements=st.one_of(st.integers(-3, 9).map(float), st.sampled_from([0.5, 2.5, 1e39, -1e39]),
                                            st.floats(allow_nan=True, allow_infinity=True)))),
    st.lists(st.text(alphabet="abc d", max_size=4), max_size=4).map(lambda l: np.array([[np.array([s])] for s in l], dtype=object) if l else np.zeros((0, 0))),
    st.text(max_size=5))

@FUZZ
@given(st.dictionaries(st.sampled_from(["allclasses_names", "att", "original_att", "trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc"]),
                       st.one_of(st.none(), mat_value_st), max_size=3),
       st.sampled_from([None, 5, 3]))
def test_fuzz_splits_mat_structure(changes, n_img):
    d = _base_splits()
    for k, v in changes.items():
        if v is None: d.pop(k, None)
        else: d[k] = v
    p = FUZZ_DIR / "s.mat"
    try: scipy.io.savemat(p, d)
    except Exception: return                                                             # scipy cannot write it: nothing to parse
    r = _only_niwt_errors(read_splits_mat, p, n_img)
    if r is None: return
    m = scipy.io.loadmat(p)                                                               # a success must be exactly right
    assert torch.equal(r["att"], torch.from_numpy(m["att"].astype(np.float64).T).float())
    assert torch.isfinite(r["att"]).all() and r["att"].shape[0] == len(r["classes"])
    for k, v in r["splits"].items():
        assert v.tolist() == (m[f"{k}_loc"].ravel().astype(np.int64) - 1).tolist()
        assert (v >= 0).all() and (n_img is None or (v < n_img).all()) and len(v.unique()) == len(v)
    tv, ts, tu = (set(r["splits"][k].tolist()) for k in SPLIT_KEYS)
    assert not (tv & ts) and not (tv & tu) and not (ts & tu)


@FUZZ
@given(st.dictionaries(st.sampled_from(["features", "labels", "image_files"]), st.one_of(st.none(), mat_value_st), max_size=2))
def test_fuzz_res101_structure(changes):
    files = np.array([[np.array([f"/x/images/{c}/{c}_{i}.jpg"])] for c, i in (("a", 1), ("a", 2), ("b", 1))], dtype=object)
    d = dict(features=np.arange(6.).reshape(2, 3), labels=np.array([[2], [2], [1]]), image_files=files)
    for k, v in changes.items():
        if v is None: d.pop(k, None)
        else: d[k] = v
    p = FUZZ_DIR / "r.mat"
    try: scipy.io.savemat(p, d)
    except Exception: return
    r = _only_niwt_errors(read_res101_mat, p)
    if r is None: return
    n = len(r["files"])
    assert r["features"].shape[0] == n == len(r["labels"]) and (r["labels"] >= 0).all() and torch.isfinite(r["features"]).all()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["001.A", "002.B", "x"]), st.sampled_from(["i_1", "i_2"]), file_bytes_st), max_size=4))
def test_fuzz_caption_folders(entries):
    root = FUZZ_DIR / "caps"
    shutil.rmtree(root, ignore_errors=True); root.mkdir()
    for folder, stem, data in entries:
        (root / folder).mkdir(exist_ok=True); (root / folder / f"{stem}.txt").write_bytes(data)
    files = ["001.A/i_1.jpg", "001.A/i_2.jpg", "002.B/i_1.jpg", "003.C/i_1.jpg"]
    caps = _only_niwt_errors(read_captions, root, files)
    if caps is not None:
        assert set(caps) <= set(files) and all(v and all(s.strip() == s and s for s in v) for v in caps.values())


_FAKE_CUB = None
_META_FILES = ["CUB_200_2011/classes.txt", "CUB_200_2011/images.txt", "CUB_200_2011/bounding_boxes.txt",
               "CUB_200_2011/image_class_labels.txt", "attributes.txt", "xlsa17/valclasses1.txt", "xlsa17/trainvalclasses.txt",
               "xlsa17_res101_meta/img_list.txt", "xlsa17_res101_meta/lab_list.txt"]

@FUZZ
@given(st.sampled_from(_META_FILES), st.data())
def test_fuzz_cub_folder(fname, data):
    "Damage one metadata file of a fake CUB: loading raises NIWTInputError or returns a dataset whose labels still match the folders."
    global _FAKE_CUB
    if _FAKE_CUB is None: _FAKE_CUB = make_fake_cub(FUZZ_DIR / "cub", n_cls=4, unseen=(1,), per_class=4, img_list=True)
    p = _FAKE_CUB / fname
    orig = p.read_bytes()
    lines = orig.decode().splitlines()
    how = data.draw(st.sampled_from(["drop", "dup", "swap_tokens", "replace_token", "fuzz"]))
    i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
    if how == "drop": new = lines[:i] + lines[i + 1:]
    elif how == "dup": new = lines[:i] + [lines[i]] + lines[i:]
    elif how == "swap_tokens":
        a, b = lines[i].split(), lines[j].split()
        a[-1], b[-1] = b[-1], a[-1]
        new = list(lines); new[i], new[j] = " ".join(a), " ".join(b)
    elif how == "replace_token":
        a = lines[i].split(); a[data.draw(st.integers(0, len(a) - 1))] = data.draw(st.text(alphabet="0123456789.-_ab/\t", max_size=6))
        new = list(lines); new[i] = " ".join(a)
    else: new = data.draw(text_lines_st).split("\n")
    try:
        p.write_text("\n".join(new) + "\n")
        d = _only_niwt_errors(load_cub, _FAKE_CUB, None, "attributes", False, None, 1, 0.2, 0, None, True, False)
        if d is not None:
            d.validate()
            assert all(image_file(d, k).split("/")[0] == d.classes[d.labels[k]] for k in range(d.n_img))
            assert all((_FAKE_CUB / "CUB_200_2011" / "images" / f).is_file() for f in d.images)
    finally: p.write_bytes(orig)


# ---------------------------------------------------------------- part locations (parts/parts.txt, parts/part_locs.txt)
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape", "right eye",
             "right leg", "right wing", "tail", "throat"]


@pytest.mark.shared
def test_cub_parts_real_files(shared_data, cub_full):
    "All 176,820 part locations of CUB, in xlsa17 order by file name; image 1's known parts."
    d, cub = cub_full, shared_data / "cub" / "CUB_200_2011"
    assert d.part_names == CUB_PARTS and d.parts.shape == (11788, 15, 3)
    rows = _lines(cub / "parts" / "part_locs.txt")
    assert len(rows) == 176820 and int(d.parts[..., 2].sum()) == sum(r.split()[4] == "1" for r in rows) == 141407
    i = d.images.index("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg")   # CUB image id 1
    P = {n: d.parts[i, k].tolist() for k, n in enumerate(CUB_PARTS)}
    assert P["beak"] == [312., 182., 1.] and P["crown"] == [186., 45., 1.] and P["throat"] == [215., 194., 1.]
    assert P["back"][2] == 0 and P["left wing"][2] == 0 and int(d.parts[i, :, 2].sum()) == 6
    images_txt = [l.split()[1] for l in _lines(cub / "images.txt")]                       # any image: row (id-1)*15 + part-1 of the file
    for f in (d.images[0], d.images[5000], d.images[-1]):
        cid = images_txt.index(f) + 1
        want = [[float(v) for v in r.split()[2:]] for r in rows[(cid - 1) * 15: cid * 15]]
        assert d.parts[d.images.index(f)].tolist() == want


@pytest.mark.shared
def test_cub25_parts_move_with_the_decode_crop(shared_data):
    "Decoded at 64 px (shorter side to 73, centre crop): parts move like the boxes; nearly all visible parts survive the crop."
    from niwt_nb.xlsa17 import transform_points, crop_geometry
    f = load_cub(shared_data / "cub", present_only=True, verbose=False)
    d = load_cub(shared_data / "cub", present_only=True, verbose=False, img_size=64)
    assert d.part_names == CUB_PARTS and d.parts.shape == (1402, 15, 3)
    assert torch.equal(d.parts, transform_points(f.parts, d.meta["image_wh"], 64))
    on = d.parts[..., 2] > 0
    assert (int(on.sum()), int((f.parts[..., 2] > 0).sum())) == (15382, 16276)               # the centre crop hides 5.5 % of them
    xy = d.parts[..., :2][on]
    assert (xy >= 0).all() and (xy < 64).all()
    # the visible parts of a bird lie in (or right at the edge of) its box, in decoded pixels too
    b = d.boxes[:, None].expand(-1, 15, 4)[on]
    inside = (xy[:, 0] >= b[:, 0] - 2) & (xy[:, 0] <= b[:, 2] + 2) & (xy[:, 1] >= b[:, 1] - 2) & (xy[:, 1] <= b[:, 3] + 2)
    assert inside.float().mean() > 0.99


def test_fake_cub_parts(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_cls=5, unseen=(3,), per_class=4)
    d = load_cub(root, verbose=False)
    assert d.part_names == list(FAKE_PARTS) and d.parts.shape == (20, 3, 3)
    images_txt = [l.split()[1] for l in _lines(root / "CUB_200_2011" / "images.txt")]
    locs = {(int(a), int(b)): [float(x), float(y), float(v)] for a, b, x, y, v in map(str.split, _lines(root / "CUB_200_2011" / "parts" / "part_locs.txt"))}
    for i, f in enumerate(d.images):
        assert d.parts[i].tolist() == [locs[images_txt.index(f) + 1, p] for p in (1, 2, 3)]
        H, W = d.image(i).shape[1:]
        assert d.parts[i, 0].tolist() == [W / 2, H / 2, 1.0]                               # the back: at the centre of its photo
    back = type(d).load(d.save(tmp_path / "cub.pt"))
    assert torch.equal(back.parts, d.parts) and back.fingerprint() == d.fingerprint()
    m = load_cub(root, verbose=False, img_size=16)
    assert torch.allclose(m.parts[:, 0, :2], torch.full((20, 2), 8.), atol=1) and (m.parts[:, 0, 2] == 1).all()
    assert load_cub(make_fake_cub(tmp_path / "np", parts=False), verbose=False).parts is None


def test_fake_cub_broken_part_files(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    pl, pt = root / "CUB_200_2011" / "parts" / "part_locs.txt", root / "CUB_200_2011" / "parts" / "parts.txt"
    good = pl.read_text()
    lines = good.splitlines()
    for text, msg in (("\n".join(lines[:-1]), r"part_locs.txt: 1 \(image, part\) pairs are missing, e.g. image 36 part 3"),
                      ("\n".join(lines + lines[:1]), rf"part_locs.txt line {len(lines) + 1}: image 1 part 1 appears twice"),
                      ("\n".join(lines[:4] + ["5 2 1.0 x 1"] + lines[5:]), r"part_locs.txt line 5: 'x' is not a finite number"),
                      ("\n".join(lines[:2] + ["1 3 1.0 2.0 7"] + lines[3:]), r"part_locs.txt line 3: the visible flag is not 0 or 1"),
                      ("\n".join(lines[:2] + ["1 4 1.0 2.0 1"] + lines[3:]), r"line 3: part id outside 1..3 \(parts.txt names 3\)"),
                      ("\n".join(lines[:2] + ["99 3 1.0 2.0 1"] + lines[3:]), r"line 3: image id outside 1..36")):
        pl.write_text(text + "\n")
        with pytest.raises(NIWTInputError, match=msg): load_cub(root, verbose=False)
    pl.write_text(good)
    pt.write_text("1 back\n2 beak\n")                                                   # parts.txt names fewer parts than part_locs uses
    with pytest.raises(NIWTInputError, match=r"part id outside 1..2"): load_cub(root, verbose=False)
    pt.write_text("1 back\n3 beak\n")
    with pytest.raises(NIWTInputError, match=r"`parts.txt`: parts.txt: part ids must be 1..2"): load_cub(root, verbose=False)
    pt.unlink()
    with pytest.raises(NIWTInputError, match=r"parts has part_locs.txt but no parts.txt"): load_cub(root, verbose=False)


part_locs_st = st.lists(st.builds(lambda *f: " ".join(f), st.sampled_from(["1", "2", "3", "0", "1.0", "x"]), st.sampled_from(["1", "2", "3", "-1"]),
                                  st.sampled_from(["0", "4.5", "-3", "nan", "1e999", "2"]), st.sampled_from(["0", "7", "1_0", "inf"]),
                                  st.sampled_from(["0", "1", "2", "0.5"])), max_size=6).map("\n".join)

@FUZZ
@given(st.one_of(file_bytes_st, part_locs_st.map(lambda s: s.encode("utf-8"))))
def test_fuzz_part_files(data):
    "Random part files: NIWTInputError, or exactly (n_img, n_parts, 3) finite locations with 0/1 flags and every pair once."
    p = _write("parts.txt", data)
    names = _only_niwt_errors(read_parts, p)
    if names is not None: assert names and all(n and n == " ".join(n.split()) for n in names) and len(set(names)) == len(names)
    locs = _only_niwt_errors(read_part_locs, p, 2, 2)
    if locs is not None:
        assert locs.shape == (2, 2, 3) and torch.isfinite(locs).all() and (locs[..., :2] >= 0).all()
        assert set(locs[..., 2].unique().tolist()) <= {0.0, 1.0}
        assert len([l for l in data.decode("utf-8-sig").split("\n") if l.strip()]) == 4
