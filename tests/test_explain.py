"Explanations: Grad-CAM vs captum, pointing/energy on hand-made maps, AUROC vs scikit-learn, the inverse map on a known case, a whole run, state left behind and bad input."
import json
import warnings
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from niwt_nb.core import NIWTInputError, ArtifactStore, eval_mode
from niwt_nb.models import ModelConfig, TrainConfig, build_model
from niwt_nb.explain import (gradcam, gradcam_from_acts, overlay, plot_gradcam, boxes_to_masks, pointing_game, energy_in_mask,
                             auroc, fit_alpha2dom, Alpha2Dom, explain_pred, text_precision, caption_words, neuron_attributes,
                             name_neurons, pooled_acts, naming_table, plot_naming, plot_neuron, collect_explanations,
                             explain_run, plot_explanations, RunExplanations, centered_blob, explain_pred_from_acts,
                             class_attribute_frequency, rank_corr, CUB_PART_GROUPS, attribute_parts, peak_locations, part_hits,
                             part_consistency, part_table, plot_part_naming, plot_neuron_parts, PartConsistency)

pytestmark = pytest.mark.xdist_group("explain")   # one worker builds the tiny run once


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A finished tiny pipeline run on Shapes (seconds), cached under its own tmp folder."
    from niwt_nb.pipeline import RunConfig, run_niwt
    tmp = tmp_path_factory.mktemp("explain")
    tiny = RunConfig.tiny()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIWT_CACHE", str(tmp / "cache")); mp.setenv("NIWT_DATA", str(tmp / "data"))
        return run_niwt(tiny, out=None, store=ArtifactStore(tmp / "store"), log=lambda *a: None)["_runs"][0]


@pytest.fixture(scope="module")
def parts(run):
    "Classifier [seen ; unseen], some unseen test images and their true columns."
    d, net = run.d, run.model
    W = torch.cat([net.fc.weight.detach(), run.a2w["W_unseen"]]); b = torch.cat([net.fc.bias.detach(), run.a2w["b_unseen"]])
    col = torch.cat([d.seen, d.unseen]); pos = torch.full((d.n_cls,), -1); pos[col] = torch.arange(len(col))
    iu = d.splits["test_unseen"][::10]
    return W, b, iu, d.images[iu], pos[d.labels[iu]]


# -- Grad-CAM -------------------------------------------------------------------------------------------------------
def _captum(model, x, t, W=None, b=None):
    from captum.attr import LayerGradCam
    class Scorer(torch.nn.Module):
        def __init__(s): super().__init__(); s.m = model
        def forward(s, x): return s.m.features(s.m.acts(x)) @ W.T + b
    m = model if W is None else Scorer()
    with eval_mode(model): return LayerGradCam(m, model.body).attribute(x, target=t, relu_attributions=True)[:, 0]


@pytest.mark.parametrize("backbone,size", [("smallcnn", 32), ("resnet18", 64)])
def test_gradcam_equals_captum(backbone, size):
    model = build_model(ModelConfig(backbone, width=8), n_seen=5)
    x = torch.rand(4, 3, size, size); t = torch.tensor([0, 4, 2, 2])
    with eval_mode(model), torch.no_grad(): A = model.acts(x)
    torch.testing.assert_close(gradcam_from_acts(model, A, t), _captum(model, x, t), rtol=1e-4, atol=1e-5)
    W, b = torch.randn(7, model.D), torch.randn(7)                       # rows that are not the model's head
    torch.testing.assert_close(gradcam_from_acts(model, A, [6, 5, 0, 1], W, b), _captum(model, x, [6, 5, 0, 1], W, b), rtol=1e-4, atol=1e-5)
    cam = gradcam(model, x, t)
    assert cam.shape == (4, size, size) and cam.min() >= 0
    assert torch.allclose(cam.flatten(1).amax(1)[cam.flatten(1).amax(1) > 0], torch.tensor(1.))


def test_gradcam_batch_equals_one_by_one(run, parts):
    W, b, iu, x, t = parts
    whole = gradcam(run.model, x[:6], t[:6], W, b)
    for i in range(6): torch.testing.assert_close(whole[i:i + 1], gradcam(run.model, x[i:i + 1], t[i:i + 1], W, b), rtol=1e-4, atol=1e-5)
    assert gradcam(run.model, x[:2], t[:2], W, b, size=(8, 12)).shape == (2, 8, 12)


def test_no_hooks_grads_or_mode_changes_left(run, parts):
    W, b, iu, x, t = parts
    net = run.model; net.train()
    try:
        rm = net.body.features[0][1].running_mean.clone()
        inv = fit_alpha2dom(run.A["alphas"], run.A["labels"], run.d.dom["attributes"], run.d.seen, k=3)
        gradcam(net, x, t, W, b); explain_pred(net, x, None, inv, run.d.attr_names, W=W, b=b); pooled_acts(net, x)
        import matplotlib.pyplot as plt
        plot_neuron(net, x, [0, 1], n=2); plt.close("all")
        assert all(m.training for m in net.modules()) and all(p.grad is None for p in net.parameters())
        assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in net.modules())
        assert torch.equal(net.body.features[0][1].running_mean, rm)
        with torch.inference_mode(): assert gradcam(net, x[:2], t[:2], W, b).shape == (2, 32, 32)  # works inside inference mode
    finally: net.eval()


# -- scores ---------------------------------------------------------------------------------------------------------
def test_pointing_and_energy_on_hand_made_maps():
    masks = torch.zeros(3, 5, 5, dtype=torch.bool); masks[:, 1:3, 1:3] = True
    cams = torch.zeros(3, 5, 5)
    cams[0, 1, 2] = 2.; cams[0, 4, 4] = 1.                                   # peak inside, 2/3 of the energy inside
    cams[1, 0, 0] = 3.; cams[1, 2, 2] = 1.                                   # peak outside, 1/4 inside
    cams[2, 1, 1] = cams[2, 4, 0] = 1.                                       # a tie, one of two inside
    torch.testing.assert_close(pointing_game(cams, masks), torch.tensor([1., 0., .5]))
    torch.testing.assert_close(energy_in_mask(cams, masks), torch.tensor([2 / 3, 1 / 4, 1 / 2]))
    z = torch.zeros(1, 5, 5)
    torch.testing.assert_close(energy_in_mask(z, masks[:1]), torch.tensor([4 / 25]))   # no energy: chance (area fraction)
    torch.testing.assert_close(pointing_game(z, masks[:1]), torch.tensor([4 / 25]))


def test_boxes_on_rescaled_images():
    # a 100 x 200 (h x w) original, object box x in [50, 150), y in [25, 75); 10 x 10 maps: a cell is 10 high, 20 wide,
    # and belongs to the box when its centre ((j + .5) * 20, (i + .5) * 10) does
    box = torch.tensor([[50., 25., 150., 75.]])
    m = boxes_to_masks(box, (10, 10), orig_size=(100, 200))
    want = torch.zeros(1, 10, 10, dtype=torch.bool); want[0, 2:7, 2:7] = True
    assert torch.equal(m, want)
    per_image = boxes_to_masks(box.repeat(2, 1), (10, 10), orig_size=torch.tensor([[100, 200], [50, 100]]))
    want2 = torch.zeros(10, 10, dtype=torch.bool); want2[5:, 5:] = True   # on a 50 x 100 original the box reaches the corner
    assert torch.equal(per_image[0], want[0]) and torch.equal(per_image[1], want2)
    cam = torch.zeros(1, 10, 10); cam[0, 4, 6] = 1
    assert pointing_game(cam, box, orig_size=(100, 200)).item() == 1 and pointing_game(cam, box).item() == 0


def test_shapes_boxes_cover_masks(run):
    d = run.d
    m = boxes_to_masks(d.boxes[:50], tuple(d.masks.shape[1:]))
    assert (m | d.masks[:50]).equal(m)                                        # every object pixel inside its box
    assert (m & ~d.masks[:50]).any()                                          # (boxes are looser than masks)


# -- AUROC ----------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=60))
def test_auroc_vs_sklearn_with_ties(rows):
    from sklearn.metrics import roc_auc_score
    s = torch.tensor([r[0] for r in rows], dtype=torch.float); y = torch.tensor([r[1] for r in rows])
    got = auroc(s, y)
    if y.all() or not y.any(): assert got.isnan()
    else: assert abs(float(got) - roc_auc_score(y.numpy(), s.numpy())) < 1e-6


def test_auroc_matrix_vs_sklearn():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(1)
    S = torch.randn(300, 5, generator=g).round(decimals=1); Y = torch.rand(300, 3, generator=g) < 0.3
    ref = torch.tensor([[roc_auc_score(Y[:, a], S[:, k]) for a in range(3)] for k in range(5)], dtype=torch.float)
    torch.testing.assert_close(auroc(S, Y), ref)
    torch.testing.assert_close(auroc(S, Y.float()), ref)                     # 0/1 floats work too
    torch.testing.assert_close(auroc(-S, Y), 1 - ref)


# -- textual explanations -----------------------------------------------------------------------------------------------
def _synthetic(seed=0, noise=0.1):
    import itertools
    dom = torch.zeros(15, 6); dom[torch.arange(15)[:, None], torch.tensor(list(itertools.combinations(range(6), 2)))] = 1
    g = torch.Generator().manual_seed(seed)
    W = dom @ torch.randn(6, 32, generator=g)
    lab = torch.arange(15).repeat_interleave(20)
    return dom, W, lab, W[lab] + noise * torch.randn(300, 32, generator=g)


def test_textual_explanation_known_answer():
    dom, W, lab, al = _synthetic()
    inv = fit_alpha2dom(al, lab, dom, classes=range(10), val_classes=[10, 11])
    assert isinstance(inv, Alpha2Dom) and inv.report["val_pearson_best"] > 0.9
    assert inv.report["lam"] in inv.report["lams"]
    lin = build_model(ModelConfig(width=8, layer="features.3", linear_head_ok=True), n_seen=15)   # importances = the classifier row
    e = explain_pred(lin, torch.rand(3, 3, 32, 32), torch.tensor([12, 13, 14]), inv, list("ABCDEF"), k=2, W=W)
    assert [sorted(n) for n in e["names"]] == [["D", "E"], ["D", "F"], ["E", "F"]]
    assert text_precision(e["idx"], dom[12:]).tolist() == [1., 1., 1.]
    # without refitting, the map never saw classes 10-14 at all: still right
    inv2 = fit_alpha2dom(al, lab, dom, classes=range(10), val_classes=[10, 11], refit=False)
    assert torch.equal(inv2(W[12:]).topk(2).indices.sort(1).values, dom[12:].topk(2).indices.sort(1).values)


def test_alpha2dom_is_scale_invariant_and_deterministic():
    dom, W, lab, al = _synthetic()
    a = fit_alpha2dom(al, lab, dom, range(10), [10, 11]); b = fit_alpha2dom(al * 7.5, lab, dom, range(10), [10, 11])
    torch.testing.assert_close(a(W), b(W)); torch.testing.assert_close(a(W), a(3 * W))
    c = fit_alpha2dom(al, lab, dom, range(12), lams=0.5)
    assert c.lam == 0.5 and "val_pearson" not in c.report


def test_text_precision_and_caption_words(run):
    g = torch.tensor([[1., 0, 1, 0], [0, 0, 0, 1]])
    assert text_precision(torch.tensor([[0, 2], [0, 3]]), g).tolist() == [1., .5]
    M, words = caption_words(run.d.captions, run.d.n_cls)
    assert M.shape == (run.d.n_cls, len(words)) and 0 <= M.min() and M.max() <= 1
    assert {"red", "star", "striped"} <= set(words) and not {"the", "a", "and"} & set(words)


# -- neuron names ---------------------------------------------------------------------------------------------------
def test_naming_table_picks_and_scores():
    g = torch.Generator().manual_seed(0)
    attrs = (torch.rand(400, 3, generator=g) < 0.5).float()
    acts = torch.stack([attrs[:, 2] + 0.1 * torch.randn(400, generator=g), -attrs[:, 0], torch.randn(400, generator=g)], 1)  # K=3
    t = naming_table(acts[:200], attrs[:200], torch.tensor([2, 0, 1]), ["a", "b", "c"], acts[200:], attrs[200:])
    ours, oracle = t[t.method == "ours"].set_index("neuron"), t[t.method == "oracle"].set_index("neuron")
    assert ours.loc[0, "auroc"] == 1.0 and ours.loc[1, "auroc"] == 0.0 and ours.loc[0, "name"] == "c"
    assert oracle.loc[0, "attr"] == 2 and oracle.loc[1, "attr"] != 0     # the oracle never picks a negative detector
    assert 0.3 < t.attrs["expected_random"] < 0.7
    assert list(t.columns) == ["neuron", "method", "attr", "name", "auroc"] and len(t) == 9


def test_name_neurons_follow_the_map():
    dom, W, lab, al = _synthetic()
    inv = fit_alpha2dom(al, lab, dom, range(12))
    names = name_neurons(inv, list("ABCDEF"), k=2)
    idx = neuron_attributes(inv, 2)
    assert len(names) == 32 and names[5] == f"{'ABCDEF'[idx[5, 0]]} / {'ABCDEF'[idx[5, 1]]}"
    assert torch.equal(idx[:, 0], inv.B.argmax(1))


# -- a whole run ------------------------------------------------------------------------------------------------------
def test_explain_run(run):
    import matplotlib.pyplot as plt
    ex = collect_explanations(run, n_images=30, n_naming=200, seed=1)
    assert isinstance(ex, RunExplanations)
    m = ex.metrics()
    assert list(m)[:7] == ["pointing_game", "energy_in_mask", "text_precision", "text_precision_random", "naming_auroc",
                           "naming_auroc_random", "naming_auroc_oracle"]
    json.dumps(m)
    for k in list(m)[:7]: assert 0 <= m[k] <= 1, k
    assert m["n_images_unseen"] == m["n_images_seen"] == 30 and m["n_naming_images"] == 200
    assert abs(m["text_precision_random"] - 5 / 22) < 1e-6 and abs(m["energy_in_mask_flat"] - float(run.d.masks[ex.idx[ex.unseen]].float().mean())) < 1e-5
    assert explain_run(run, n_images=30, n_naming=200, seed=1) == m           # deterministic
    assert explain_run(run, n_images=30, n_naming=200, seed=2) != m
    figs = plot_explanations(ex, n=4, n_neurons=2)
    assert set(figs) == {"gradcam", "text", "naming", "neurons"} and len(figs["neurons"].axes) == 12
    plt.close("all")


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input(run, parts):
    W, b, iu, x, t = parts
    net, d = run.model, run.d
    cams = gradcam(net, x, t, W, b)
    inv = fit_alpha2dom(run.A["alphas"], run.A["labels"], d.dom["attributes"], d.seen, k=3)
    cases = [
        (lambda: gradcam(net, x, t[:3], W, b), "`targets`: has 3 entries"),                       # mismatched lengths
        (lambda: gradcam(net, x, len(W), W, b), "columns must be in [0, 48)"),                    # unknown target column
        (lambda: gradcam(net, x, net.n_seen), "columns must be in [0, 36)"),                      # unseen column of the seen head
        (lambda: gradcam(net, x[0], 0), "`x`"),
        (lambda: gradcam(net, x, 0, W=W[:, :3]), "`W`"),
        (lambda: gradcam(net, x, 0, size=0), "`size`"),
        (lambda: pointing_game(cams, d.masks[iu][:, :16]), "`masks`: have shape"),                 # masks of the wrong size
        (lambda: energy_in_mask(cams, d.masks[iu][:-1]), "`masks`"),                              # mismatched lengths
        (lambda: energy_in_mask(cams, d.masks[iu][:, :, :, None]), "`masks`"),
        (lambda: pointing_game(cams, d.masks[iu], orig_size=(3, 3)), "`orig_size`: only applies to boxes"),
        (lambda: pointing_game(cams, d.boxes[iu], orig_size=torch.ones(2, 2)), "`orig_size`"),
        (lambda: pointing_game(cams - 1, d.masks[iu]), "`cams`: has negative values"),
        (lambda: pointing_game(cams, "mask"), "`masks`"),
        (lambda: auroc(torch.rand(5), torch.ones(4)), "`labels`: has 4 rows"),
        (lambda: auroc(torch.rand(5), torch.rand(5)), "not binary"),
        (lambda: auroc(torch.rand(5, 2, 2), torch.ones(5)), "`scores`"),
        (lambda: fit_alpha2dom(run.A["alphas"], run.A["labels"][:-1], d.dom["attributes"], d.seen), "`labels`"),
        (lambda: fit_alpha2dom(run.A["alphas"], run.A["labels"], d.dom["attributes"], d.unseen), "`classes`: classes"),
        (lambda: fit_alpha2dom(run.A["alphas"], run.A["labels"], d.dom["attributes"], d.seen[:1]), "at least 2"),
        (lambda: fit_alpha2dom(run.A["alphas"], run.A["labels"], d.dom["attributes"], d.seen, lams=[1., 2.]), "`val_classes`"),
        (lambda: fit_alpha2dom(run.A["alphas"], run.A["labels"], d.dom["attributes"], d.seen, lams=-1.), "`lams`"),
        (lambda: explain_pred(net, x, None, inv, d.attr_names[:-1]), "`attr_names`"),
        (lambda: explain_pred(net, x, None, inv, d.attr_names, k=23), "`k`"),
        (lambda: explain_pred(net, x, len(W), inv, d.attr_names, W=W), "`targets`"),
        (lambda: explain_pred(net, x, None, "inv", d.attr_names), "`inv`"),
        (lambda: text_precision(torch.tensor([[0, 30]]), d.img_attrs[:1]), "`idx`"),
        (lambda: text_precision(torch.tensor([[0, 1]]), d.img_attrs[:2]), "`img_attrs`"),
        (lambda: caption_words({0: ["a"]}, 2), "`captions`"),
        (lambda: name_neurons(inv, ["a"]), "`attr_names`"),
        (lambda: neuron_attributes(inv, 0), "`k`"),
        (lambda: pooled_acts(net, x[0]), "`images`"),
        (lambda: naming_table(torch.rand(9, 4), torch.ones(9, 3), torch.tensor([0, 1, 2, 3])), "`names_idx`"),
        (lambda: naming_table(torch.rand(9, 4), torch.ones(9, 3), torch.zeros(4, dtype=torch.long), acts_fit=torch.rand(9, 4)), "`attrs_fit`"),
        (lambda: naming_table(torch.rand(9, 4), torch.ones(9, 3), torch.zeros(4, dtype=torch.long), acts_fit=torch.rand(9, 5),
                              attrs_fit=torch.ones(9, 3)), "`acts_fit`"),
        (lambda: plot_gradcam(x[:3], cams[:2]), "`cams`"),
        (lambda: plot_naming({"auroc": [1]}), "`table`"),
        (lambda: plot_neuron(net, x, [net.K]), "`neurons`"),
        (lambda: overlay(x[0], cams[0], alpha=2), "`alpha`"),
        (lambda: collect_explanations(object()), "`run`"),
        (lambda: collect_explanations(run, n_images=0), "`n_images`"),
        (lambda: plot_explanations(run), "`ex`"),
        (lambda: collect_explanations(run, radius=0), "`radius`"),
        (lambda: collect_explanations(run, top=1.5), "`top`"),
        (lambda: collect_explanations(run, threshold="x"), "`threshold`"),
        (lambda: collect_explanations(run, margin=0), "`margin`"),
        (lambda: explain_pred_from_acts(net, x, None, inv, d.attr_names), "`A`"),                 # images, not activations
        (lambda: rank_corr(torch.rand(3, 4), torch.rand(2, 5)), "`b`"),
        (lambda: attribute_parts(d.attr_names, ["beak"], {"shape": ("tail",)}), "`groups`: names parts ['tail']"),
        (lambda: attribute_parts("has_x::y", ["beak"]), "`attr_names`"),
        (lambda: peak_locations(torch.rand(2, 3, 4), 8), "`A`"),
        (lambda: part_hits(torch.rand(2, 3, 2), torch.rand(2, 4, 3), [(0,)], radius=-1), "`radius`"),
        (lambda: part_hits(torch.rand(2, 3, 2), torch.rand(2, 4, 3), [()], radius=1), "`sets`"),
        (lambda: part_consistency(torch.rand(2, 3), torch.ones(2, 3, 1, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool)), "`visible`"),
        (lambda: part_table(torch.rand(3, 2), torch.tensor([0, 5, -1]), torch.tensor([0, 1])), "`name_sets`"),
        (lambda: part_table(torch.rand(3, 2), torch.tensor([0, 1, -1]), torch.tensor([0, 1]), M_fit=torch.rand(3, 3)), "`M_fit`"),
        (lambda: plot_part_naming({"score": [1]}), "`table`"),
        (lambda: plot_neuron_parts(collect_explanations(run, n_images=2, n_naming=8)), "has no part scores"),
        (lambda: class_attribute_frequency(object()), "`d`"),
    ]
    for fn, msg in cases:
        with pytest.raises(NIWTInputError, match=None) as e: fn()
        assert msg in str(e.value), (msg, str(e.value))


# -- centred blob, CUB boxes -------------------------------------------------------------------------------------------
def test_centered_blob_is_centred_and_normalised_per_axis():
    b = centered_blob(3, (20, 40), sigma=0.25)
    assert b.shape == (3, 20, 40) and torch.equal(b[0], b[2])
    peak = torch.nonzero(b[0] == b[0].max())
    assert peak.tolist() == [[9, 19], [9, 20], [10, 19], [10, 20]]              # the 2 x 2 centre pixels
    torch.testing.assert_close(b[0].flip(0), b[0]); torch.testing.assert_close(b[0].flip(1), b[0])
    # sigma scales with each side: one sigma away from the centre along either axis gives exp(-1/2)
    torch.testing.assert_close(b[0, 10, 20 + 10] / b[0, 10, 20], b[0, 10 + 5, 20] / b[0, 10, 20], atol=0.03, rtol=0)


@pytest.mark.shared
def test_centered_blob_on_real_cub_boxes(shared_data):
    "Decoded CUB photos (shorter side + centre crop): the box is in the decoded pixels, and most birds cover the centre."
    from niwt_nb.cub import load_cub
    d = load_cub(shared_data / "cub", present_only=True, verbose=False, img_size=32)
    m = boxes_to_masks(d.boxes, 32)                                             # no orig_size: the boxes moved with the crop
    assert m.shape == (1402, 32, 32) and (m.flatten(1).any(1)).float().mean() > 0.99
    pg = pointing_game(centered_blob(d.n_img, 32), d.boxes)
    assert 0.85 < float(pg.mean()) < 1                                          # the centre is on the bird in most photos
    area = m.float().mean((1, 2))
    assert float(area.mean()) < float(pg.mean())                                # ... more than chance (the box's area)


# -- text vs class attributes ----------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_rank_corr_vs_scipy(d_, seed):
    from scipy.stats import spearmanr
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 3, (4, d_), generator=g).float(); b = torch.randn(3, d_, generator=g).round()
    R = rank_corr(a, b)
    for i in range(4):
        for j in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                                # scipy: NaN (and a warning) for a constant row
                ref = spearmanr(a[i].numpy(), b[j].numpy()).statistic
            assert abs(float(R[i, j]) - (0.0 if np.isnan(ref) else ref)) < 1e-5


def test_class_attribute_frequency_reads_percentages(run):
    import dataclasses
    d = run.d
    assert torch.equal(class_attribute_frequency(d), d.dom["attributes"])       # Shapes: probabilities
    e = dataclasses.replace(d, dom={**d.dom, "attributes_raw": d.dom["attributes"] * 100})
    torch.testing.assert_close(class_attribute_frequency(e), d.dom["attributes"])


def test_explain_pred_from_acts_equals_images(run, parts):
    W, b, iu, x, t = parts
    inv = fit_alpha2dom(run.A["alphas"], run.A["labels"], run.d.dom["attributes"], run.d.seen, k=3)
    e1 = explain_pred(run.model, x, t, inv, run.d.attr_names, k=4, W=W, b=b)
    with eval_mode(run.model), torch.no_grad(): A = run.model.acts(x)
    e2 = explain_pred_from_acts(run.model, A, t, inv, run.d.attr_names, k=4, W=W, b=b)
    assert torch.equal(e1["idx"], e2["idx"]) and e1["names"] == e2["names"] and e1["z"].shape == (len(x), 22)
    torch.testing.assert_close(e1["z"].topk(4, 1).values, e1["scores"])


# -- neuron names vs part locations ----------------------------------------------------------------------------------------
def _cub_names(shared):
    attrs = [l.split()[1] for l in (shared / "cub" / "CUB_200_2011" / "attributes.txt").read_text().splitlines() if l.strip()]
    parts = [l.split(maxsplit=1)[1] for l in (shared / "cub" / "CUB_200_2011" / "parts" / "parts.txt").read_text().splitlines() if l.strip()]
    return attrs, parts


@pytest.mark.shared
def test_cub_part_groups_cover_cub(shared_data):
    attrs, parts = _cub_names(shared_data)
    groups = sorted({a.split("::")[0] for a in attrs})
    assert len(attrs) == 312 and len(parts) == 15 and len(groups) == 28 and sorted(CUB_PART_GROUPS) == groups
    assert {p for v in CUB_PART_GROUPS.values() for p in v} == set(parts)       # every part is named by some group
    attr_sets, sets = attribute_parts(attrs, parts)
    assert len(sets) == 15 and int((attr_sets >= 0).sum()) == 312 - 5 - 14 - 15  # size, shape, primary color: the whole bird
    beak = sets.index((parts.index("beak"),))
    assert all(int(attr_sets[i]) == beak for i, a in enumerate(attrs) if a.startswith(("has_bill_",)))
    wings = sets.index(tuple(sorted((parts.index("left wing"), parts.index("right wing")))))
    assert int(attr_sets[attrs.index("has_wing_color::blue")]) == wings


def test_peak_locations_on_non_square_maps():
    A = torch.zeros(1, 2, 3, 4); A[0, 0, 2, 1] = 5; A[0, 1, 0, 3] = 1; A[0, 1, 1, 0] = 1   # channel 1: a tie, first cell wins
    val, xy = peak_locations(A, (30, 80))                                        # cells 10 high, 20 wide
    assert val.tolist() == [[5., 1.]] and xy[0].tolist() == [[30., 25.], [70., 5.]]


def _synthetic_parts(n=60, K=6, P=3, seed=0):
    "Images 64 x 64 with P parts at random places; channel k fires at part k % P (channels >= P with noise), on 8 x 8 maps."
    g = torch.Generator().manual_seed(seed)
    parts = torch.cat([torch.rand(n, P, 2, generator=g) * 64, (torch.rand(n, P, 1, generator=g) < 0.8).float()], 2)
    A = torch.rand(n, K, 8, 8, generator=g) * 0.1
    for k in range(K):
        q = parts[:, k % P, :2].div(8).long().clamp(0, 7)
        A[torch.arange(n), k, q[:, 1], q[:, 0]] += 1 + torch.rand(n, generator=g)
    return A, parts


def test_part_consistency_known_answer():
    A, parts = _synthetic_parts()
    val, xy = peak_locations(A, 64)
    sets = [(0,), (1,), (2,)]
    hits, vis = part_hits(xy, parts, sets, radius=8 * 2 ** .5 / 2 + 1e-4)    # the peak cell's centre is within half a diagonal
    M = part_consistency(val, hits, vis, top=0.5)
    assert torch.equal(M.diagonal(), torch.ones(3)) and torch.equal(M[3:].diagonal(), torch.ones(3))
    t = part_table(M, torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 1, 2]), M_fit=M, set_names=["a", "b", "c"])
    by = t.groupby("method").score.mean()
    assert by["ours"] == 1 and by["oracle"] == 1 and by["random"] < 0.7 and by["random_channel"] < 0.7
    wrong = part_table(M, torch.tensor([1, 2, 0, 1, 2, 0]), torch.tensor([0, 1, 1, 2]))   # names shifted by one part
    assert wrong[wrong.method == "ours"].score.mean() < by["random"]
    assert list(t.columns) == ["neuron", "method", "set", "parts", "score"] and set(t.method) == {"ours", "random", "random_channel", "oracle"}
    # a set never visible: NaN, skipped by the summaries
    P0 = parts.clone(); P0[:, 2, 2] = 0
    M0 = part_consistency(val, *part_hits(xy, P0, sets, 6.), top=0.5)
    assert M0[:, 2].isnan().all() and not M0[:, :2].isnan().any()


def test_part_consistency_top_picks_the_strongest_images():
    val = torch.tensor([[1.], [5.], [3.], [4.]])
    hits = torch.tensor([[[True]], [[False]], [[True]], [[True]]]); vis = torch.tensor([[True], [True], [True], [False]])
    assert part_consistency(val, hits, vis, top=0.3).tolist() == [[0.]]         # ceil(0.9) = 1 of the 3 visible images: image 1, a miss
    assert part_consistency(val, hits, vis, top=0.34).tolist() == [[.5]]        # ceil(1.02) = 2: images 1 (miss) and 2 (hit); 3 is hidden
    assert abs(float(part_consistency(val, hits, vis, top=1.0)) - 2 / 3) < 1e-6


def _with_parts(run):
    "The tiny Shapes run with two parts per image (object centre, farthest corner) and a float32 activation cache."
    import copy, dataclasses
    from niwt_nb.models import cache_activations
    d = run.d
    m = d.masks.float(); yy, xx = torch.meshgrid(torch.arange(32.) + .5, torch.arange(32.) + .5, indexing="ij")
    ctr = torch.stack([(m * xx).sum((1, 2)), (m * yy).sum((1, 2))], 1) / m.sum((1, 2))[:, None].clamp_min(1)
    corners = torch.tensor([[0., 0], [31, 0], [0, 31], [31, 31]])
    far = corners[torch.cdist(ctr, corners).argmax(1)]
    r = copy.copy(run)
    r.d = dataclasses.replace(d, parts=torch.stack([torch.cat([ctr, torch.ones(d.n_img, 1)], 1), torch.cat([far, torch.ones(d.n_img, 1)], 1)], 1),
                              part_names=["object", "background"]).validate()
    r.acts = cache_activations(run.model, r.d, torch.arange(d.n_img), dtype="float32")
    return r

SHAPES_PARTS = {"shape": ("object",), "colour": ("object",), "pattern": ("object",), "size": ("object",), "background": ("background",)}


def test_explain_run_with_parts_and_cache(run):
    import matplotlib.pyplot as plt
    rp = _with_parts(run)
    plain = collect_explanations(run, n_images=20, n_naming=120, seed=3)
    ex = collect_explanations(rp, n_images=20, n_naming=120, seed=3, part_groups=SHAPES_PARTS)
    assert ex.acts is rp.acts and plain.acts is None
    torch.testing.assert_close(ex.cams, plain.cams, atol=1e-4, rtol=1e-4)      # read from the cache: the same maps
    m, m0 = ex.metrics(), plain.metrics()
    for k in ("pointing_game", "text_precision", "text_class_precision", "text_rank_corr", "naming_auroc"): assert abs(m[k] - m0[k]) < 1e-5, k
    assert m0["part_hit"] is None and m0["n_part_neurons"] is None
    p = ex.parts
    assert isinstance(p, PartConsistency) and p.set_names == ["object", "background"] and p.M.shape == (run.model.K, 2)
    first = neuron_attributes(ex.inv, 1)[:, 0].cpu()                            # every Shapes attribute names a part here
    assert torch.equal(p.name_attrs, first) and torch.equal(p.name_sets, p.attr_sets[first])
    assert m["n_part_neurons"] == run.model.K and m["part_radius_px"] == 4.0 and m["part_top"] == 0.2
    # the table's summaries are the metrics, and 'ours' reads the named set's column of M
    ours = p.table[p.table.method == "ours"]
    torch.testing.assert_close(torch.tensor(ours.score.values, dtype=torch.float), p.M[torch.tensor(ours.neuron.values), torch.tensor(ours.set.values)])
    assert abs(m["part_hit"] - float(ours.score.mean())) < 1e-6
    # the peaks are those of the cached maps, in image pixels (4 x 4 maps of 32 px images: cell centres at 4, 12, 20, 28)
    assert set(p.peak_xy.unique().tolist()) <= {4., 12., 20., 28.}
    figs = plot_explanations(ex, n=3, n_neurons=2)
    assert set(figs) == {"gradcam", "text", "naming", "neurons", "parts", "neuron_parts"} and len(figs["neuron_parts"].axes) == 10
    plt.close("all")
    json.dumps(m)


def test_explain_on_generated_cub_files(tmp_path, monkeypatch):
    "The CUB code path end to end on a generated CUB folder: boxes, part files, class-level percentages, no image attributes."
    import matplotlib.pyplot as plt
    from niwt_nb.cub import make_fake_cub, load_cub
    from niwt_nb.pipeline import RunConfig, run_niwt, DATASETS
    from niwt_nb.importance import ImportanceConfig
    from niwt_nb.dom2alpha import Dom2AlphaConfig
    from niwt_nb.alpha2w import Alpha2WConfig
    root = make_fake_cub(tmp_path / "cub", n_cls=6, per_class=8, n_attr=6)
    monkeypatch.setitem(DATASETS, "fakecub_explain", lambda cfg: load_cub(root, img_size=32, semantic=cfg.semantic, verbose=False))
    cfg = RunConfig(dataset="fakecub_explain", model=ModelConfig(backbone="smallcnn", width=8), train=TrainConfig(epochs=2, bs=64, patience=None),
                    importance=ImportanceConfig(bs=128), dom2alpha=Dom2AlphaConfig(max_epochs=30), alpha2w=Alpha2WConfig(max_steps=40),
                    n_feed=16, baselines=())
    run_ = run_niwt(cfg, out=None, store=ArtifactStore(tmp_path / "store"), log=lambda *a: None)["_runs"][0]
    d = run_.d
    assert d.part_names == ["back", "beak", "left wing"] and d.img_attrs is None and d.masks is None and d.boxes is not None
    groups = {"has_part_0": ("beak",), "has_part_1": ("left wing",), "has_part_2": ("back",)}   # the fake's attribute groups
    ex = collect_explanations(run_, n_images=8, n_naming=40, k=3, part_groups=groups)
    m = ex.metrics()
    assert m["text_precision"] is None and m["naming_auroc"] is None                       # no image-level attributes
    for k in ("pointing_game", "pointing_game_center", "energy_in_mask", "text_class_precision", "text_class_precision_random",
              "text_class_precision_frequent", "text_distinct_precision", "text_distinct_precision_frequent", "text_distinct_precision_random",
              "text_rank_corr", "text_rank_corr_other_classes", "part_hit", "part_hit_random",
              "part_hit_random_channel", "part_hit_oracle"): assert m[k] is not None, k
    freq = class_attribute_frequency(d)
    torch.testing.assert_close(freq, d.dom["attributes_raw"] / 100)
    gc = (freq >= 0.5).float()[d.labels[ex.idx]]
    torch.testing.assert_close(torch.tensor(m["text_class_precision_random"]), gc[ex.unseen].mean(1).mean())
    gd = (freq >= freq[d.seen[~torch.isin(d.seen, d.val_classes)]].mean(0) + 0.2).float()[d.labels[ex.idx]]
    torch.testing.assert_close(torch.tensor(m["text_distinct_precision_random"]), gd[ex.unseen].mean(1).mean())
    torch.testing.assert_close(torch.tensor(m["text_distinct_precision"]), text_precision(ex.expl["idx"], gd)[ex.unseen].mean())
    torch.testing.assert_close(ex.region, boxes_to_masks(d.boxes[ex.idx], 32))
    assert set(ex.parts.set_names) == {"beak", "left wing", "back"}
    figs = plot_explanations(ex, n=4, n_neurons=2)
    assert set(figs) == {"gradcam", "text", "parts", "neurons", "neuron_parts"}
    assert "→" in figs["gradcam"].axes[0].get_title()
    plt.close("all")
