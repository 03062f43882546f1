"Importance engine against the per-class loop of niwt_nb.importance, its frozen-network contract, and alpha2w fast vs reference."
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

from niwt_nb.core import NIWTInputError
from niwt_nb.models import ModelConfig, build_model
from niwt_nb.importance import importances
from niwt_nb.engine import all_class_importances, target_importances, frozen
from niwt_nb.alpha2w import Alpha2WConfig, fit_alpha2w, importance_matrix, alpha2w_objective, _reference_alpha
from functools import partial
A2W = partial(Alpha2WConfig, objective="mean_alpha", lam=1e-3, stop="absolute", patience=100)   # the settings these tests were written for (the defaults before the original's objective became the default)


@pytest.fixture(scope="module")
def net():
    return build_model(ModelConfig(width=4), n_seen=7).eval()      # K = D = 16, A (B,16,4,4) at 32 px


def loop(model, x, C, W=None):
    return torch.stack([importances(model, x, c, W=W) for c in range(C)], 1)   # (B, C, K)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 5), C=st.integers(1, 24), T=st.integers(1, 4), reduce=st.sampled_from(["sum", "mean"]),
       method=st.sampled_from(["auto", "vjp", "jacobian"]), chunk_mb=st.sampled_from([1e-4, 0.05, 256]),
       fold=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_per_class_loop(net, B, C, T, reduce, method, chunk_mb, fold, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 32, 32, generator=g)
    W = torch.randn(C, net.D, generator=g)                                        # any classifier rows
    ref = loop(net, x, C, W)
    if reduce == "mean": ref = ref / 16
    a = all_class_importances(net, x, W=W, reduce=reduce, method=method, chunk_mb=chunk_mb, fold=fold)
    assert a.shape == (B, C, net.K)
    torch.testing.assert_close(a, ref, atol=2e-6, rtol=1e-4)
    tgt = torch.randint(0, C, (B, T), generator=g)                                # classes per image
    per = all_class_importances(net, x, tgt, W=W, reduce=reduce, method=method, chunk_mb=chunk_mb, fold=fold)
    torch.testing.assert_close(per, ref[torch.arange(B)[:, None], tgt], atol=2e-6, rtol=1e-4)


def test_resnet18_all_classes_and_targets():
    r18 = build_model(ModelConfig("resnet18"), n_seen=4)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = loop(r18, x, 4)
    torch.testing.assert_close(all_class_importances(r18, x), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(all_class_importances(r18, x, fold=False), ref, atol=1e-5, rtol=1e-4)
    t = torch.tensor([3, 0, 2])
    torch.testing.assert_close(target_importances(r18, x, t), importances(r18, x, t), atol=1e-5, rtol=1e-4)


def test_frozen_during_call_and_restored(net):
    "Parameters' requires_grad off and the body under no_grad during the call; the mixed original flags come back."
    net.fc.bias.requires_grad_(False)                                             # a mixed starting state
    before = [p.requires_grad for p in net.parameters()]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.append(
        (name, torch.is_grad_enabled(), [p.requires_grad for p in net.parameters()]))) for name, m in (("body", net.body), ("head", net.head))]
    try:
        net.train()
        target_importances(net, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    finally:
        for h in hooks: h.remove()
    assert [s[0] for s in seen] == ["body", "head"]
    assert seen[0][1] is False and seen[1][1] is True                              # no graph through the body
    assert not any(any(s[2]) for s in seen)                                        # every parameter frozen
    assert [p.requires_grad for p in net.parameters()] == before and net.training
    assert all(p.grad is None for p in net.parameters())
    net.fc.bias.requires_grad_(True); net.eval()


def test_classes_dtypes_and_errors(net):
    x = torch.rand(3, 3, 32, 32)
    ref = all_class_importances(net, x, [1, 5])
    torch.testing.assert_close(all_class_importances(net, x, torch.tensor([1, 5], dtype=torch.int32)), ref)
    torch.testing.assert_close(all_class_importances(net, x, (1, 5)), ref)
    torch.testing.assert_close(all_class_importances(net, x, 5)[:, 0], ref[:, 1])
    assert all_class_importances(net, x[:0]).shape == (0, 7, net.K)
    with pytest.raises(NIWTInputError, match="rows must be in"): all_class_importances(net, x, torch.tensor([[0], [7], [1]]))
    with pytest.raises(NIWTInputError, match="`fold`"): all_class_importances(net, x, fold=1)
    with pytest.raises(NIWTInputError, match="`targets`"): target_importances(net, x, torch.zeros(3, 1, dtype=torch.long))


def test_alpha2w_G_equals_engine_jacobian(net):
    "importance_matrix (07_alpha2w) and the engine's Jacobian route give the same G: two implementations, one quantity."
    x = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    G = importance_matrix(net, x, bs=4)                                           # (K, D)
    Gb = all_class_importances(net, x, W=torch.eye(net.D), method="jacobian")     # (B, D, K): row d = e_d
    torch.testing.assert_close(Gb.mean(0).T, G, atol=1e-6, rtol=1e-5)


def test_alpha2w_fast_and_reference_same_objective(net):
    "At the same W, fast (W G^T) and reference (double backward) give the same loss and gradient on a NIWTNet."
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 32, 32, generator=g)
    target = torch.randn(3, net.K, generator=g)
    W = (net.fc.weight.detach().mean(0) + 0.1 * torch.randn(3, net.D, generator=g)).requires_grad_(True)
    G = importance_matrix(net, x, bs=5)
    w_mean = net.fc.weight.detach().mean(0)
    with frozen(net):
        l_ref = alpha2w_objective(_reference_alpha(net, net.acts(x), W, None), target, W, w_mean, 0.01)[0]
        l_fast = alpha2w_objective(W @ G.T, target, W, w_mean, 0.01)[0]
        torch.testing.assert_close(l_fast, l_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(l_fast, W)[0], torch.autograd.grad(l_ref, W)[0], atol=1e-6, rtol=1e-4)
    cfg = A2W(bs=len(x), max_steps=40, lr=1e-2)                          # full batch: the same trajectory
    rf = fit_alpha2w(net, target, x, cfg=cfg)
    rr = fit_alpha2w(net, target, x, cfg=cfg.replace(method="reference"))
    assert rf["steps"] == rr["steps"]
    torch.testing.assert_close(torch.tensor(rf["history"]["loss"]), torch.tensor(rr["history"]["loss"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rf["W"], rr["W"], atol=1e-4, rtol=1e-3)


def test_pipeline_gzsl_fast_vs_reference(tmp_path):
    "A tiny run_niwt with alpha2w 'fast' and 'reference' (full batch): the GZSL results agree within noise."
    from niwt_nb.core import ArtifactStore
    from niwt_nb.shapes import ShapesConfig
    from niwt_nb.models import TrainConfig
    from niwt_nb.dom2alpha import Dom2AlphaConfig
    from niwt_nb.pipeline import RunConfig, run_niwt
    n_feed = 16
    cfg = RunConfig(shapes=ShapesConfig(n_classes=16, n_unseen=4, n_val_classes=2, n_per_class=16),
                    train=TrainConfig(epochs=2, bs=64), dom2alpha=Dom2AlphaConfig(max_epochs=30),
                    alpha2w=A2W(max_steps=60, bs=n_feed), n_feed=n_feed, baselines=())
    store = ArtifactStore(tmp_path / "cache")
    quiet = dict(out=None, store=store, log=lambda *a: None, report=False)
    mf = run_niwt(cfg, **quiet)
    mr = run_niwt(dataclasses.replace(cfg, alpha2w=cfg.alpha2w.replace(method="reference")), **quiet)
    assert mr["per_seed"][0]["cached"]["alphas"] and not mr["per_seed"][0]["cached"]["niwt[attributes][niwt]"]  # only NIWT reran
    wf, wr = mf["_runs"][0].a2w["W_unseen"], mr["_runs"][0].a2w["W_unseen"]
    torch.testing.assert_close(wf, wr, atol=1e-3, rtol=1e-2)
    for k in ("u", "s", "H", "zsl_top1", "H_cal"):
        assert abs(mf["methods"]["niwt"][k] - mr["methods"]["niwt"][k]) <= 0.02, (k, mf["methods"]["niwt"][k], mr["methods"]["niwt"][k])


@pytest.mark.parametrize("layer", ["_blocks.15", "_blocks.14", "_blocks.11"])
def test_lite_heads_match_loop_and_cached_activations(layer):
    "EfficientNet-Lite0 heads (a 1x1 conv to fold, MBConv blocks with residuals, ReLU6, dropout): engine == per-class loop, from images or from A."
    from niwt_nb.models import cache_activations
    from types import SimpleNamespace
    lite = build_model(ModelConfig("efficientnet_lite0", layer=layer), n_seen=5).eval()
    x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = loop(lite, x, 5)
    torch.testing.assert_close(all_class_importances(lite, x), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(all_class_importances(lite, x, fold=False), ref, atol=1e-5, rtol=1e-4)
    d = SimpleNamespace(labels=torch.zeros(3, dtype=torch.long), splits={}, seen=torch.arange(5), images=x)
    c = cache_activations(lite, d, torch.arange(3), dtype="float32")
    A = c.gather(torch.arange(3))
    torch.testing.assert_close(all_class_importances(lite, A=A), ref, atol=1e-5, rtol=1e-4)
    t = torch.tensor([4, 0, 2])
    torch.testing.assert_close(target_importances(lite, targets=t, A=A), importances(lite, x, t), atol=1e-5, rtol=1e-4)
    with pytest.raises(NIWTInputError, match="`A`"): target_importances(lite, targets=t, A=A[0])


# ---- one importance gradient: every call site is engine.score_grads -------------------------------------------------
def plain_grads(model, A, dirs, create_graph=False):
    "The textbook importance gradient: d(sum_b dirs_b . f(A_b)) / dA, summed over space."
    A = A.detach().clone().requires_grad_(True)
    g, = torch.autograd.grad((model.features(A) * dirs).sum(), A, create_graph=create_graph)
    return g.sum((2, 3))


def test_every_call_site_is_score_grads(net):
    from niwt_nb.engine import score_grads, head_jacobian
    from niwt_nb.importance import importances_from_acts
    from niwt_nb.alpha2w import _reference_pair_alpha, _feed_cos
    g = torch.Generator().manual_seed(0)
    x, W = torch.rand(5, 3, 32, 32, generator=g), torch.randn(3, net.D, generator=g)
    t = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad(): A = net.acts(x)
    core = score_grads(net, A, W[t])                                                     # (B, K)
    assert torch.equal(core, plain_grads(net, A, W[t]))                                 # bit for bit the textbook gradient
    # importance: importances_from_acts / importances
    assert torch.equal(importances_from_acts(net, A, t, W=W), core)
    assert torch.equal(importances(net, x, t, W=W), core)
    torch.testing.assert_close(importances_from_acts(net, A, t, W=W, reduce="mean"), score_grads(net, A, W[t], reduce="mean"), rtol=0, atol=0)
    # engine: the batched path (several directions), the jacobian route and target_importances
    many = score_grads(net, A, W[:, None].expand(3, 5, net.D))                          # (B, 3, K)
    for c in range(3): torch.testing.assert_close(many[:, c], score_grads(net, A, W[c].expand(5, net.D)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(all_class_importances(net, A=A, W=W, method="vjp", fold=False), many, atol=0, rtol=0)
    torch.testing.assert_close(all_class_importances(net, A=A, W=W, method="jacobian"), many, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.einsum("bdk,cd->bck", head_jacobian(net, A, fast=False), W), many, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(target_importances(net, x, t, W=W, fold=False), core, atol=0, rtol=0)
    torch.testing.assert_close(target_importances(net, x, t, W=W), core, atol=1e-6, rtol=1e-5)   # folded convolution
    # alpha2w: the reference paths (create_graph) and the final cosines
    Wg = W.clone().requires_grad_(True)
    with frozen(net):
        pair = _reference_pair_alpha(net, A, Wg, t)
        ref = _reference_alpha(net, A, Wg, None)                                         # (3, K): batch means
    assert torch.equal(pair.detach(), core)
    torch.testing.assert_close(ref.detach(), many.mean(0), atol=1e-6, rtol=1e-5)
    l2 = plain_grads(net, A, Wg[t], create_graph=True).square().sum()
    torch.testing.assert_close(torch.autograd.grad(pair.square().sum(), Wg)[0], torch.autograd.grad(l2, Wg)[0], atol=1e-6, rtol=1e-5)
    target = torch.randn(3, net.K, generator=g)
    with frozen(net):
        cos = _feed_cos(net, x, W, target, "pairs", 2, 256)
    want = torch.nn.functional.cosine_similarity(many, target[None], dim=-1).mean(0)
    torch.testing.assert_close(cos, want, atol=1e-6, rtol=1e-5)


def test_score_grads_bad_input(net):
    from niwt_nb.engine import score_grads
    A, W = torch.randn(2, net.K, 4, 4), torch.randn(3, net.D)
    for kw, arg in ((dict(dirs=W), "dirs"), (dict(dirs=W[:2], reduce="max"), "reduce"), (dict(dirs=W[:2], backend="jax"), "backend"),
                    (dict(dirs=W[:, None].expand(3, 2, net.D), create_graph=True), "create_graph"),
                    (dict(dirs=lambda j0, j1: W[j0:j1, None].expand(j1 - j0, 2, net.D)), "n"), (dict(dirs="W"), "dirs")):
        with pytest.raises(NIWTInputError, match=f"`{arg}`"): score_grads(net, A, **kw)
