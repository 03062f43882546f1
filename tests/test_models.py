"Bad input, cleanup, determinism, cached activations and resume of niwt_nb.models and niwt_nb.importance (beyond the notebooks' own tests)."
import os, signal, subprocess, sys, textwrap, time, urllib.error, warnings
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from torch import nn

from niwt_nb.core import NIWTInputError, import_torchvision, eval_mode
import niwt_nb.models as M
from niwt_nb.models import (ModelConfig, build_model, TrainConfig, train_seen, ImageNorm, predict, iter_batches, cache_activations,
                            load_activations, ActivationCache, natural_input_size, input_norm, LAYER_CANDIDATES, BACKBONES)
from niwt_nb.importance import importances, importances_from_acts, extract_alphas, ImportanceConfig

tv = import_torchvision()


def tiny_data(n_per=12, size=32, seed=0, tensor_images=True):
    "Stand-in with the ZSLData contract's fields: 6 coloured-square classes, 4 seen (0,1,2,4), 2 unseen (3,5)."
    g = torch.Generator().manual_seed(seed)
    n_cls = 6; labels = torch.arange(n_cls).repeat_interleave(n_per)
    imgs = torch.rand(len(labels), 3, size, size, generator=g) * 0.4
    colors = torch.rand(n_cls, 3, generator=g)
    for i, c in enumerate(labels.tolist()):
        r, q = (c % 3) * (size // 3), (c // 3) * (size // 2)
        imgs[i, :, r:r + size // 3, q:q + size // 2] = colors[c, :, None, None]
    images = (imgs * 255).to(torch.uint8)
    seen, unseen = torch.tensor([0, 1, 2, 4]), torch.tensor([3, 5])
    per = lambda cs, a, b: torch.cat([torch.nonzero(labels == c)[:, 0][int(a * n_per):int(b * n_per)] for c in cs])
    splits = {"train": per(seen, 0, .6), "val": per(seen, .6, .8), "test_seen": per(seen, .8, 1),
              "test_unseen": per(unseen, 0, 1)}
    splits["trainval"] = torch.cat([splits["train"], splits["val"]]).sort().values
    d = SimpleNamespace(name="tiny", classes=[f"c{i}" for i in range(n_cls)], labels=labels, splits=splits, seen=seen,
                        unseen=unseen, val_classes=seen[-1:], images=images, n_cls=n_cls, n_img=len(labels))
    def dataset(split, transform=None):
        x = images[splits[split]].float() / 255
        return torch.utils.data.TensorDataset(transform(x) if transform else x, labels[splits[split]], splits[split])
    d.dataset = dataset
    if not tensor_images: d.images = [f"img{i}.jpg" for i in range(len(labels))]
    return d


def small(**kw): return build_model(ModelConfig(width=8, **kw), 4)


def clean(model):
    "No hooks anywhere and no gradient on any parameter."
    hooks = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                for m in model.modules())
    return not hooks and all(p.grad is None for p in model.parameters())


# ---- configs and layers -------------------------------------------------------------------------------------------
def test_unknown_backbone_lists_close_matches():
    with pytest.raises(NIWTInputError, match=r"close matches: \['resnet101'"): ModelConfig(backbone="resnet-101")
    with pytest.raises(NIWTInputError, match="use one of"): ModelConfig(backbone="alexnet")


@pytest.mark.parametrize("layer,msg", [("layer5.0", "no layer named 'layer5.0'"), ("layer2.1.bn1", "inside 'layer2.1'"),
                                       ("avgpool", "no spatial dimensions"), ("fc", "is the classifier")])
def test_wrong_layers(layer, msg):
    with pytest.raises(NIWTInputError, match=msg): build_model(ModelConfig("resnet18", layer=layer), 3)


def test_smallcnn_global_pool_and_inner_layers():
    with pytest.raises(NIWTInputError, match="no spatial dimensions"): small(layer="avgpool")
    net = small(layer="features.1.2")  # the ReLU inside block 1: 16 channels at 16x16 before its max-pool
    assert (net.K, net.D) == (16, 32)
    assert net.acts(torch.rand(2, 3, 32, 32)).shape == (2, 16, 16, 16)


def test_vgg16_conv5_3_and_layers_without_spatial_dims():
    net = build_model(ModelConfig("vgg16", layer="conv5_3"), 3)
    assert (net.layer, net.K, net.D) == ("features.29", 512, 4096)
    assert isinstance(net.body.features[-1], nn.ReLU) and isinstance(net.head.features[0], nn.MaxPool2d)
    with torch.device("meta"): ref = tv.models.vgg16(num_classes=3)  # gets `net`'s weights: must compute the same
    ref.to_empty(device="cpu")
    ref.load_state_dict({k.removeprefix("body.").removeprefix("head.").replace("fc.", "classifier.6."): v
                         for k, v in net.state_dict().items()})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), eval_mode(net), eval_mode(ref):
        torch.testing.assert_close(net(x), ref(ImageNorm()(x)), atol=1e-4, rtol=1e-4)
    with pytest.raises(NIWTInputError, match="without spatial dimensions"):
        build_model(ModelConfig("vgg16", layer="classifier.0"), 3)
    with pytest.raises(NIWTInputError, match="is the classifier"): build_model(ModelConfig("vgg16", layer="classifier.6"), 3)


def test_resnet101_paper_layer():
    net = build_model(ModelConfig("resnet101"), 5)
    assert (net.layer, net.K, net.D) == ("layer4.0", 2048, 2048)
    assert list(net.head.layer4._modules) == ["1", "2"]


def test_every_resnet_cut_computes_the_uncut_network(tmp_path):
    ref = tv.models.resnet18(num_classes=3).eval()
    for m in ref.modules():  # non-trivial BN statistics, so a wrongly placed module would show
        if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(-.1, .1); m.running_var.uniform_(.5, 2)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): want = ref(ImageNorm()(x))
    for layer in ["maxpool", "layer1", "layer1.0", "layer2.1", "layer3.0", "layer4", "layer4.0"]:
        net = build_model(ModelConfig("resnet18", layer=layer, weights=str(tmp_path / "r18.pt"), linear_head_ok=layer == "layer4"), 3).eval()
        assert "fc loaded from the file" in net.weights_desc
        with torch.no_grad(): torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone,layer", [("resnet18", "layer4.1"), ("resnet18", "layer4"), ("smallcnn", "features.3"),
                                            ("efficientnet_lite0", "_head_act")])
def test_linear_head_refused_unless_opted_in(backbone, layer):
    "Only pooling / linear layers / dropout above A: a clear error on `layer` by default, buildable with linear_head_ok=True."
    with pytest.raises(NIWTInputError, match=r"^`layer`: the head above .* is linear in A .*linear_head_ok=True"):
        build_model(ModelConfig(backbone, layer=layer), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                           # no warning either
        assert build_model(ModelConfig(backbone, layer=layer, linear_head_ok=True), 3).layer == layer


# ---- weights --------------------------------------------------------------------------------------------------------
def test_bad_weights_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NIWTInputError, match="cannot be loaded with torch.load"): small(weights=str(tmp_path / "junk.pt"))
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_model.pt")  # a whole pickled module: refused by weights_only
    with pytest.raises(NIWTInputError, match="cannot be loaded"): small(weights=str(tmp_path / "pickled_model.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(NIWTInputError, match="does not hold a state dict"): small(weights=str(tmp_path / "list.pt"))
    with pytest.raises(NIWTInputError, match="neither 'random', 'imagenet' nor an existing file"):
        small(weights=str(tmp_path / "missing.pt"))


def test_weights_from_another_architecture(tmp_path):
    "One line, counts instead of a key dump, and the architecture the file looks like."
    torch.save(tv.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(NIWTInputError, match=r"does not fit resnet50: it looks like a resnet18 state dict; missing keys \d+, unexpected keys \d+") as e:
        build_model(ModelConfig("resnet50", weights=str(tmp_path / "r18.pt")), 3)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600 and "ModelConfig(backbone='resnet18'" in str(e.value)
    torch.save(small().state_dict(), tmp_path / "w8.pt")
    with pytest.raises(NIWTInputError, match=r"smallcnn \(width 16\): it looks like a smallcnn \(width 8\) state dict; .*shape mismatches \d+ "
                                             r"\(first: features.0.0.weight: file \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)\).*width=8"):
        build_model(ModelConfig(width=16, weights=str(tmp_path / "w8.pt"), layer="features.2"), 4)
    from niwt_nb.efficientnet import pretrained_path
    with pytest.raises(NIWTInputError, match="it looks like a efficientnet_lite0 state dict") as e:
        build_model(ModelConfig("efficientnet_lite1", weights=str(pretrained_path("efficientnet_lite0"))), 3)
    assert "\n" not in str(e.value)
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "unknown.pt")
    with pytest.raises(NIWTInputError, match=r"does not fit resnet18: missing keys \d+, unexpected keys 1"):
        build_model(ModelConfig("resnet18", weights=str(tmp_path / "unknown.pt")), 3)


def test_checkpoint_formats_and_prefixes(tmp_path):
    ref = small()
    sd = ref.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    net = small(weights=str(tmp_path / "wrapped.pt"), layer="features.1")  # another cut of the same weights
    assert "fc loaded from the file" in net.weights_desc
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(net.eval()(x), ref.eval()(x))
    other = build_model(ModelConfig(width=8, weights=str(tmp_path / "wrapped.pt")), 7)  # 7 classes: fc not loaded
    assert "classifier (4 outputs) ignored" in other.weights_desc


def test_imagenet_offline_and_cached(monkeypatch):
    def offline(w): raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(M, "_download_state_dict", offline)
    with pytest.raises(NIWTInputError, match="resnet18-f37072fd.pth elsewhere and pass its local path") as e:
        build_model(ModelConfig("resnet18", weights="imagenet"), 3)
    assert "--backbone efficientnet_lite0 --weights imagenet" in str(e.value) and "\n" not in str(e.value)
    src = tv.models.resnet18()
    monkeypatch.setattr(M, "_download_state_dict", lambda w: src.state_dict())
    net = build_model(ModelConfig("resnet18", weights="imagenet"), 3)
    assert "ResNet18_Weights.IMAGENET1K_V1" in net.weights_desc and "1000 outputs) ignored" in net.weights_desc
    assert torch.equal(net.body.layer4[0].conv1.weight, src.layer4[0].conv1.weight)


# ---- importances: bad input and what a call leaves behind ----------------------------------------------------------
def test_targets_mismatch_and_types():
    net, x = small(), torch.rand(3, 3, 32, 32)
    with pytest.raises(NIWTInputError, match="has 2 entries but the batch has 3"): importances(net, x, torch.tensor([0, 1]))
    with pytest.raises(NIWTInputError, match="has 4 entries"): importances(net, x, [0, 1, 2, 3])
    with pytest.raises(NIWTInputError, match="1-D"): importances(net, x, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(NIWTInputError, match=r"\[0, 6\)"): importances(net, x, 6, W=torch.randn(6, 32))
    with pytest.raises(NIWTInputError, match="given without W"): importances(net, x, 0, b=torch.zeros(4))
    with pytest.raises(NIWTInputError, match="`x`"): importances(net, x[0], 0)
    assert importances(net, x, [0, 1, 2]).shape == (3, 32)


@pytest.mark.parametrize("where", ["targets", "head"])
def test_nothing_left_after_a_call_that_raised(where):
    net = small().train()
    net.body.features[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in net.modules()]
    bn = net.head.features[0][1]; stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    x = torch.rand(2, 3, 32, 32)
    if where == "head":
        class Boom(nn.Module):
            def forward(self, f): raise RuntimeError("boom")
        net.head.add_module("boom", Boom())
    with pytest.raises((NIWTInputError, RuntimeError)):
        importances(net, x, torch.tensor([0, 1, 2]) if where == "targets" else torch.tensor([0, 1]))
    if where == "head": del net.head.boom
    assert [m.training for m in net.modules()] == modes and clean(net)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    importances(net, x, 1)
    assert [m.training for m in net.modules()] == modes and clean(net)


def test_importances_under_no_grad_and_inference_mode():
    net, x = small(), torch.rand(2, 3, 32, 32)
    want = importances(net, x, 1)
    with torch.no_grad(): torch.testing.assert_close(importances(net, x, 1), want)
    with torch.inference_mode():
        A = net.eval().acts(x)
        got = importances_from_acts(net, A, 1)
    torch.testing.assert_close(got, want)
    assert not want.requires_grad


def test_importances_match_finite_differences():
    net = small().double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(): A = net.acts(x)
    a = importances_from_acts(net, A, 2)[0]
    eps = 1e-6
    for k in [0, 5, 17]:  # moving all of channel k by eps moves y_c by eps * sum_ij dy/dA_kij
        d = torch.zeros_like(A); d[:, k] = eps
        with torch.no_grad(): fd = (net.fc(net.features(A + d)) - net.fc(net.features(A - d)))[0, 2] / (2 * eps)
        assert abs(fd.item() - a[k].item()) < 1e-5 * max(1, abs(a[k].item()))


# ---- training, prediction, alphas -----------------------------------------------------------------------------------
def test_train_seen_deterministic_and_same_on_both_data_paths(tmp_path):
    cfg = TrainConfig(epochs=2, bs=8, head_epochs=1, seed=3)
    runs = [train_seen(small(), tiny_data(tensor_images=t), cfg) for t in (True, True, False)]
    for net, hist in runs[1:]:
        assert hist["train_loss"] == runs[0][1]["train_loss"] and hist["val_acc"] == runs[0][1]["val_acc"]
        for (k, v), w in zip(net.state_dict().items(), runs[0][0].state_dict().values()): assert torch.equal(v, w), k
    assert runs[0][1]["phase"] == ["head", "all"]
    assert all(clean(n) and all(p.requires_grad for p in n.parameters()) for n, _ in runs)


def test_train_seen_early_stopping_keeps_best(tmp_path):
    data = tiny_data()
    data.splits["val"] = data.splits["val"][:1]  # one val image: accuracy saturates, then stalls
    net, hist = train_seen(small(), data, TrainConfig(epochs=8, bs=8, patience=2), ckpt_path=tmp_path / "c.pt")
    best = hist["best_epoch"]
    assert hist["val_acc"][best] == max(hist["val_acc"])
    if hist["stopped_early"]: assert len(hist["epoch"]) == best + 3
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ck["epoch"] == best
    for k, v in net.state_dict().items(): assert torch.equal(ck["model"][k], v), k


def test_train_seen_bad_input():
    data = tiny_data()
    with pytest.raises(NIWTInputError, match="`model`"): train_seen(nn.Linear(2, 2), data)
    with pytest.raises(NIWTInputError, match="`cfg`"): train_seen(small(), data, cfg={"epochs": 1})
    d2 = tiny_data(); del d2.splits["train"]
    with pytest.raises(NIWTInputError, match="'train' is not a split"): train_seen(small(), d2)
    with pytest.raises(NIWTInputError, match="`data`"): train_seen(small(), SimpleNamespace(labels=None))


def test_build_model_leaves_global_rng_alone():
    s = torch.get_rng_state()
    small(); build_model(ModelConfig("resnet18"), 2)
    assert torch.equal(s, torch.get_rng_state())


def test_predict_and_empty_split():
    data = tiny_data(); net = small()
    data.splits["empty"] = torch.zeros(0, dtype=torch.long)
    out = predict(net, data, "empty")
    assert out["logits"].shape == (0, 4) and out["features"].shape == (0, 32)
    p = predict(net, tiny_data(tensor_images=False), "test_unseen", bs=5)
    assert torch.equal(p["labels"], data.labels[data.splits["test_unseen"]])


def fail_on_call(module, n: int):
    "Make `module.forward` raise RuntimeError('interrupted') on its `n`-th call (undo with `del module.forward`)."
    calls, orig = [], module.forward
    def flaky(*args):
        calls.append(1)
        if len(calls) == n: raise RuntimeError("interrupted")
        return orig(*args)
    module.forward = flaky


def test_extract_alphas_streaming_cleans_up_on_failure(tmp_path):
    data, net = tiny_data(), small()
    fail_on_call(net.head, 2)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_alphas(net, data, cfg=ImportanceConfig(bs=10), out_dir=tmp_path, max_memory_mb=1e-4)
    assert list(tmp_path.iterdir()) == []  # neither a temp file nor a half-written result
    del net.head.forward
    res = extract_alphas(net, data, cfg=ImportanceConfig(bs=10), out_dir=tmp_path, max_memory_mb=1e-4)
    ref = extract_alphas(net, data, cfg=ImportanceConfig(bs=64))
    torch.testing.assert_close(res["alphas"], ref["alphas"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]
    assert np.load(res["path"], mmap_mode="r").shape == (len(data.splits["trainval"]), 32)


def test_extract_alphas_empty_class_is_nan():
    data, net = tiny_data(), small()
    data.splits["trainval"] = data.splits["trainval"][data.labels[data.splits["trainval"]] != 4]
    with pytest.warns(UserWarning, match=r"seen classes \[4\] have no image"):
        res = extract_alphas(net, data)
    assert torch.isnan(res["class_mean"][3]).all() and not torch.isnan(res["class_mean"][:3]).any()


# ---- with the real ZSLData (niwt_nb.data, when present) ----------------------------------------------------------
def test_with_zsldata_in_memory_and_files(tmp_path):
    data_mod = pytest.importorskip("niwt_nb.data")
    import dataclasses
    from PIL import Image
    d = data_mod.make_toy_data(n_cls=5, n_unseen=1, n_per_class=8, size=32)
    net = build_model(ModelConfig(width=8), len(d.seen))
    cfg = TrainConfig(epochs=1, bs=8, img_size=24)
    net, hist = train_seen(net, d, cfg)
    paths = []
    for i in range(d.n_img):  # the same pixels as files, every other one 8 px larger: img_size makes them one size
        s = 32 + 8 * (i % 2)
        Image.fromarray(d.images[i].permute(1, 2, 0).numpy()).resize((s, s)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    f = dataclasses.replace(d, images=paths, meta={**d.meta, "image_root": str(tmp_path)})
    with pytest.raises(NIWTInputError, match="different sizes"): predict(net, f, "test_seen", bs=4)
    p_mem = predict(net, d, "test_seen", bs=4, img_size=24)
    p_file = predict(net, f, "test_seen", bs=4, img_size=24)
    assert p_mem["logits"].shape == (len(d.splits["test_seen"]), len(d.seen))
    assert torch.equal(p_file["idx"], p_mem["idx"])
    same = p_mem["idx"] % 2 == 0  # files of the original size hold exactly the in-memory pixels
    assert same.any()
    torch.testing.assert_close(p_file["logits"][same], p_mem["logits"][same])
    res = extract_alphas(net, f, cfg=ImportanceConfig(bs=4, img_size=24))
    assert res["alphas"].shape == (len(d.splits["trainval"]), 32) and torch.isfinite(res["alphas"]).all()


# ---- EfficientNet-Lite backbones -------------------------------------------------------------------------------------
def test_natural_input_size_and_normalisation():
    assert [natural_input_size(b) for b in BACKBONES] == [None, 224, 224, 224, 224, 224, 240, 260]
    with pytest.raises(NIWTInputError, match="`backbone`"): natural_input_size("efficientnet_b0")
    for b in BACKBONES:
        mean, std = input_norm(b)
        net = build_model(ModelConfig(b, width=8), 2) if b in ("smallcnn", "resnet18", "efficientnet_lite0") else None
        if net is not None: torch.testing.assert_close(net.body.normalize.std.flatten(), torch.tensor(std))
    assert input_norm("efficientnet_lite1") == ((127 / 255,) * 3, (128 / 255,) * 3) and input_norm("vgg16")[0][0] == 0.485


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_candidate_layers_build_and_cut_exactly(backbone):
    "Every candidate layer of Lite1/Lite2 builds (with a nonlinear head) and computes the uncut network."
    from niwt_nb.efficientnet import EfficientNetLite
    ref = EfficientNetLite(backbone, 3).eval()
    for m in ref.modules():  # non-trivial BN statistics, so a misplaced module would show
        if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(-.1, .1); m.running_var.uniform_(.5, 2)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad(): want = ref(ImageNorm(*input_norm(backbone))(x))
    sd = ref.state_dict()
    orig = lambda k: "_" + k if k.startswith("fc.") else k.removeprefix("body.").removeprefix("head.")
    for layer, K in zip(LAYER_CANDIDATES[backbone], (352 if backbone.endswith("2") else 320, 208 if backbone.endswith("2") else 192, None)):
        net = build_model(ModelConfig(backbone, layer=layer), 3).eval()
        net.load_state_dict({k: sd[orig(k)] for k in net.state_dict()})
        with torch.no_grad(): torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
        if K is not None: assert net.K == K, (layer, net.K)


def test_lite_imagenet_weights_offline():
    from niwt_nb.efficientnet import pretrained_state_dict
    net = build_model(ModelConfig("efficientnet_lite2", weights="imagenet", layer="_blocks.19"), 5)
    sd = pretrained_state_dict("efficientnet_lite2")
    assert torch.equal(net.body._blocks[19]._project_conv.weight, sd["_blocks.19._project_conv.weight"])
    assert torch.equal(net.head._conv_head.weight, sd["_conv_head.weight"]) and net.fc.out_features == 5
    assert "efficientnet-lite2-9656183e.pth, sha256 verified" in net.weights_desc


def test_torchvision_download_fails_fast_offline(monkeypatch, tmp_path):
    "No cached file and an unreachable host: an OSError from the connection check, before any download starts."
    from types import SimpleNamespace as NS
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    called = []
    fake = NS(url="https://download.example.invalid/models/resnet18-f37072fd.pth", get_state_dict=lambda **kw: called.append(1))
    with pytest.raises(OSError, match="cannot be reached"): M._download_state_dict(fake, timeout=1)
    assert not called
    (tmp_path / "checkpoints").mkdir(); (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"cached")
    M._download_state_dict(fake, timeout=1)                                    # cached: no connection check needed
    assert called


# ---- cached activations -----------------------------------------------------------------------------------------------
def test_cached_training_equals_frozen_body_with_dropout_head():
    "EfficientNet-Lite's head has dropout (global RNG) and BatchNorm in train mode: the cached run draws the same numbers."
    data = tiny_data(n_per=8)
    mcfg = ModelConfig("efficientnet_lite0", layer="_blocks.14")                 # head: an MBConv (drop connect) + conv_head + dropout
    cfg = TrainConfig(epochs=2, bs=8, lr=1e-3, patience=None, finetune_all=False, augment=True)
    n_img, h_img = train_seen(build_model(mcfg, 4), data, cfg)
    n_c, h_c = train_seen(build_model(mcfg, 4), data, cfg.replace(mode="cached", cache_dtype="float32"))
    assert h_c["val_acc"] == h_img["val_acc"] and h_c["phase"] == ["head", "head"]
    torch.testing.assert_close(torch.tensor(h_c["train_loss"]), torch.tensor(h_img["train_loss"]), atol=1e-5, rtol=1e-5)
    for k, v in n_img.state_dict().items():
        torch.testing.assert_close(n_c.state_dict()[k].float(), v.float(), atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert not n_c.training and clean(n_c)


def test_cache_over_budget_streams_to_memmap(tmp_path):
    data, net = tiny_data(), small().eval()
    mem = cache_activations(net, data, "trainval", flip=True, bs=9)
    disk = cache_activations(net, data, "trainval", flip=True, bs=9, budget_mb=0.01, path=tmp_path / "a")
    assert mem.in_memory and not disk.in_memory and isinstance(disk.store, np.memmap)
    assert torch.equal(disk.gather(torch.arange(len(disk)), flipped=torch.arange(len(disk)) % 2 == 0),
                       mem.gather(torch.arange(len(mem)), flipped=torch.arange(len(mem)) % 2 == 0))
    again = load_activations(tmp_path / "a", budget_mb=0.01)                       # still over budget: a memmap
    assert not again.in_memory and again.meta == disk.meta and "memmap" in repr(again)
    assert load_activations(tmp_path / "a").in_memory
    # fine-tuning over budget uses a temporary memmap folder: same result as in RAM, nothing left behind
    cfg = TrainConfig(epochs=2, bs=8, patience=None, mode="cached", cache_dtype="float32")
    a, ha = train_seen(small(), data, cfg)
    b, hb = train_seen(small(), data, cfg.replace(cache_budget_mb=0.01))
    assert ha["train_loss"] == hb["train_loss"] and torch.equal(a.fc.weight, b.fc.weight)


def test_cache_build_failure_leaves_nothing(tmp_path):
    data, net = tiny_data(), small().eval()
    fail_on_call(net.body, 3)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache_activations(net, data, "trainval", bs=9, budget_mb=0.001, path=tmp_path / "acts")
    assert list(tmp_path.iterdir()) == []
    del net.body.forward
    with pytest.raises(NIWTInputError, match="no finished activation cache"): load_activations(tmp_path / "acts")
    c = cache_activations(net, data, "trainval", bs=9, path=tmp_path / "acts")   # in RAM, and saved there
    assert c.in_memory and sorted(p.name for p in tmp_path.iterdir()) == ["acts"]
    assert torch.equal(load_activations(tmp_path / "acts").store, c.store)


def test_cache_bad_input():
    data, net = tiny_data(), small()
    with pytest.raises(NIWTInputError, match="`idx`: has repeated"): cache_activations(net, data, torch.tensor([1, 1]))
    with pytest.raises(NIWTInputError, match="`idx`: has no images"): cache_activations(net, data, torch.zeros(0, dtype=torch.long))
    with pytest.raises(NIWTInputError, match="`budget_mb`"): cache_activations(net, data, "val", budget_mb=-1)
    with pytest.raises(NIWTInputError, match="`model`"): cache_activations(nn.Linear(2, 2), data, "val")
    c = cache_activations(net, data, "val", img_size=24)
    with pytest.raises(NIWTInputError, match="img_size=24 but img_size=32"): predict(net, data, "val", img_size=32, acts=c)
    with pytest.raises(NIWTInputError, match="`acts`: expected an ActivationCache"): predict(net, data, "val", acts="cache")
    with pytest.raises(NIWTInputError, match="flipped images but the cache holds none"): c.gather([0], flipped=[True])


def test_alphas_and_predictions_from_cache_match_images():
    data, net = tiny_data(), small().eval()
    c = cache_activations(net, data, torch.cat([data.splits["trainval"], data.splits["test_seen"]]), dtype="float32", bs=13)
    ref = extract_alphas(net, data, cfg=ImportanceConfig(bs=10))
    got = extract_alphas(net, data, cfg=ImportanceConfig(bs=7), acts=c)
    torch.testing.assert_close(got["alphas"], ref["alphas"], atol=1e-5, rtol=1e-4)
    p_img, p_c = predict(net, data, "test_seen", bs=4), predict(net, data, "test_seen", bs=64, acts=c)
    torch.testing.assert_close(p_c["logits"], p_img["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(p_c["labels"], p_img["labels"])


# ---- resume -----------------------------------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import niwt_nb.models as M
    from niwt_nb.data import make_toy_data
    ck, k, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls, orig = [], M._val_acc
    def slow(*a, **kw):                            # called once per epoch; hang in epoch k+1, after epoch k was saved
        calls.append(1)
        if len(calls) == k + 2: time.sleep(600)
        return orig(*a, **kw)
    M._val_acc = slow
    d = make_toy_data(n_cls=6, n_unseen=2, n_per_class=12, size=16)
    cfg = M.TrainConfig(epochs=4, head_epochs=1, bs=8, lr=3e-3, patience=None, mode=mode)
    M.train_seen(M.build_model(M.ModelConfig(width=8), len(d.seen)), d, cfg, ckpt_path=ck)
""")


@pytest.mark.parametrize("mode", ["full", "cached"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, mode):
    "SIGKILL a fine-tuning process after epoch 1 was checkpointed; rerunning resumes at epoch 2 and ends exactly as an uninterrupted run."
    from niwt_nb.data import make_toy_data
    script, ck, k = tmp_path / "job.py", tmp_path / "ck.pt", 1
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(M.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(ck), str(k), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:                                                               # poll for the checkpoint of epoch k
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of epoch 1 within 180 s"
            if ck.exists() and torch.load(ck, weights_only=True)["resume"]["last_epoch"] == k: break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    saved = torch.load(ck, weights_only=True)
    assert saved["resume"]["last_epoch"] == k and not saved["resume"]["done"] and len(saved["history"]["epoch"]) == k + 1
    d = make_toy_data(n_cls=6, n_unseen=2, n_per_class=12, size=16)
    cfg = TrainConfig(epochs=4, head_epochs=1, bs=8, lr=3e-3, patience=None, mode=mode)
    resumed, h_res = train_seen(build_model(ModelConfig(width=8), len(d.seen)), d, cfg, ckpt_path=ck)
    straight, h_str = train_seen(build_model(ModelConfig(width=8), len(d.seen)), d, cfg)
    assert h_res["epoch"] == [0, 1, 2, 3]
    assert {k: v for k, v in h_res.items() if k != "seconds"} == {k: v for k, v in h_str.items() if k != "seconds"}
    for name, v in straight.state_dict().items(): assert torch.equal(resumed.state_dict()[name], v), name
    assert torch.load(ck, weights_only=True)["resume"]["done"]


def test_resume_refuses_other_runs_with_a_warning(tmp_path):
    data, ck = tiny_data(), tmp_path / "ck.pt"
    cfg = TrainConfig(epochs=2, bs=16, patience=None)
    train_seen(small(), data, cfg, ckpt_path=ck)
    for other, why in [(dict(cfg=cfg.replace(lr=1e-2)), "config"), (dict(cfg=cfg, net=small(seed=5)), "initial weights")]:
        with pytest.warns(UserWarning, match="from another run"):
            net, h = train_seen(other.get("net", small()), data, other["cfg"], ckpt_path=ck)
        assert h["epoch"] == [0, 1], why                                          # trained from epoch 0
    ck.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cannot be loaded"): train_seen(small(), data, cfg, ckpt_path=ck)
    torch.save({"model": small().state_dict()}, ck)                               # an old best-state-only file
    with pytest.warns(UserWarning, match="no resume record"): train_seen(small(), data, cfg, ckpt_path=ck)
    ckd = torch.load(ck, weights_only=True)
    assert set(ckd) >= {"model", "epoch", "val_acc", "history", "train_config", "resume"}
    assert set(ckd["resume"]) >= {"model", "optimizer", "generator", "torch_rng", "fingerprint", "last_epoch", "best", "bad"}


# ---- one training loop, configs that build their own model ----------------------------------------------------------
@pytest.mark.parametrize("mode, patience, fc_sum, fc_abs, conv_abs, val", [
    ("full", 1, -1.1423326875665225, 20.60287879203679, 20.618697020225227, [1 / 7, 4 / 7, 5 / 7]),
    ("cached", 3, -0.9343757049646229, 20.20379754737951, 20.45939524145797, [1 / 7, 1 / 7, 2 / 7])])
def test_train_seen_weights_as_before_the_shared_loop(tmp_path, mode, patience, fc_sum, fc_abs, conv_abs, val):
    "Numbers of train_seen computed before it ran on models.fit_epochs (same seeds, same weights); with a checkpoint every epoch."
    from niwt_nb.shapes import ShapesConfig, make_shapes
    data = make_shapes(ShapesConfig(n_classes=10, n_unseen=3, n_val_classes=1, n_per_class=16, size=16, seed=0), cache=False)
    cfg = TrainConfig(epochs=3, bs=25, lr=3e-3, seed=0, patience=patience, mode=mode, cache_dtype="float32")
    m, h = train_seen(build_model(ModelConfig(width=8, seed=0), len(data.seen)), data, cfg, ckpt_path=tmp_path / "ck.pt",
                      device="cpu")                                          # the recorded numbers are CPU numbers
    sd = m.state_dict()
    got = [sd["fc.weight"].double().sum().item(), sd["fc.weight"].double().abs().sum().item(), sd["body.features.0.0.weight"].double().abs().sum().item()]
    np.testing.assert_allclose(got, [fc_sum, fc_abs, conv_abs], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h["val_acc"], val, rtol=1e-6)
    assert h["best_epoch"] == 2 and not h["stopped_early"] and h["phase"] == (["all"] * 3 if mode == "full" else ["head"] * 3)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["resume"]["done"] and all(torch.equal(v, sd[k].cpu()) for k, v in ck["model"].items())


def test_fit_epochs_hooks_and_early_stop():
    "fit_epochs alone: frozen flags per epoch, the hook sees every epoch, early stopping keeps the best state."
    from niwt_nb.models import fit_epochs
    net = small()
    calls, accs = [], iter([0.5, 0.7, 0.6, 0.6, 0.9])
    def run_epoch(ep, frozen, opt):
        assert all(p.requires_grad != frozen for p in net.body.parameters()) and net.body.training != frozen
        with torch.no_grad(): net.fc.bias.fill_(ep)                                       # a mark of the epoch's state
        return 2.0, 1, 4
    st = fit_epochs(net, TrainConfig(epochs=5, head_epochs=1, patience=2), run_epoch, lambda: next(accs),
                    lambda ep, st, improved, opt: calls.append((ep, improved, st["done"])), show=False)
    assert calls == [(0, True, False), (1, True, False), (2, False, False), (3, False, True)]
    assert st["hist"]["phase"] == ["head", "all", "all", "all"] and st["hist"]["stopped_early"] and st["hist"]["best_epoch"] == 1
    assert st["hist"]["train_loss"] == [0.5] * 4 and torch.equal(net.fc.bias, torch.ones(4))   # the best state is loaded
    assert all(p.requires_grad for p in net.parameters()) and all(p.grad is None for p in net.parameters())


def test_configs_build_their_own_model():
    from niwt_nb.features import FeatureModelConfig, FeatureNet, build_feature_model
    for cfg, build in ((ModelConfig(width=8, seed=1), build_model), (FeatureModelConfig(in_features=12, hidden=8, out_features=6, seed=1), build_feature_model)):
        a, b = cfg.build(3), build(cfg, 3)
        assert type(a) is type(b) and a.n_seen == 3 and (a.K, a.D) == (b.K, b.D)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert isinstance(FeatureModelConfig(in_features=12, hidden=8, out_features=6).build(2), FeatureNet)
    with pytest.raises(NIWTInputError, match="`n_seen`"): ModelConfig().build(0)
    with pytest.raises(NIWTInputError, match="`n_seen`"): FeatureModelConfig().build(True)


def test_public_checks():
    "The checks other modules use are public (no private name is imported across modules)."
    from niwt_nb.models import check_data, check_model, check_seen_split, check_acts, train_inputs, seen_columns
    data, net = tiny_data(), small()
    check_data(data, ["train"]); check_model(net, data); check_seen_split(data, "train", seen_columns(data))
    with pytest.raises(NIWTInputError, match="`split`"): check_data(data, ["nope"])
    with pytest.raises(NIWTInputError, match="`model`"): check_model(nn.Linear(2, 2))
    with pytest.raises(NIWTInputError, match="`data`"): check_seen_split(data, "test_unseen", seen_columns(data))
    with pytest.raises(NIWTInputError, match="`acts`"): check_acts(object(), net)
    cfg, col = train_inputs(net, data)
    assert cfg == TrainConfig() and torch.equal(col, seen_columns(data))
