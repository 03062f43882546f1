"""The explorer driven from Python: a finished run folder, its widgets' values changed and what they display asserted;
swapping the semantic input; free text under every input; a tiny run on real CUB photos (skipped without ../shared);
bad input."""
import io, json
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F

from niwt_nb.core import NIWTInputError, ArtifactStore
from niwt_nb.widgets import NIWTExplorer, AttributeTextMap, attribute_phrase

pytestmark = pytest.mark.xdist_group("widgets")   # one worker builds the tiny runs once

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_run(tmp, semantic="attributes,captions"):
    "A finished tiny Shapes run written to `tmp/run` like `niwt_run --out` (seconds); its data cached under `tmp/cache`."
    from niwt_nb.pipeline import RunConfig, run_niwt
    cfg = RunConfig.tiny(explain=False, semantic=semantic, encoder="tfidf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIWT_CACHE", str(tmp / "cache")); mp.setenv("NIWT_DATA", str(tmp / "data"))
        run_niwt(cfg, out=tmp / "run", store=ArtifactStore(tmp / "store"), log=lambda *a: None, report=False)
    return tmp


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory): return _tiny_run(tmp_path_factory.mktemp("widgets"))           # attributes + captions


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory): return _tiny_run(tmp_path_factory.mktemp("widgets_captions"), "captions")   # one input


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"               # where conftest's `shared_data` looks
SEABIRD = "a large seabird with a hooked yellow bill"


def _tiny_cub_run(tmp):
    "A finished tiny run on the partial CUB of ../shared/data (classes 001-025, smallcnn at 32 px, 1 epoch, attributes + sent)."
    from niwt_nb.models import ModelConfig, TrainConfig
    from niwt_nb.importance import ImportanceConfig
    from niwt_nb.dom2alpha import Dom2AlphaConfig
    from niwt_nb.alpha2w import Alpha2WConfig
    from niwt_nb.pipeline import RunConfig, run_niwt
    cfg = RunConfig(dataset="cub", root=str(SHARED / "cub"), present_only=True, semantic="attributes,sent", img_size=32,
                    model=ModelConfig(backbone="smallcnn", width=8), train=TrainConfig(epochs=1, bs=64, patience=None),
                    importance=ImportanceConfig(bs=128), dom2alpha=Dom2AlphaConfig(max_epochs=30), alpha2w=Alpha2WConfig(max_steps=60),
                    n_feed=16, baselines=(), explain=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIWT_CACHE", str(tmp / "cache"))
        run_niwt(cfg, out=tmp / "run", store=ArtifactStore(tmp / "store"), log=lambda *a: None, report=False)
    return tmp


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
    if not (SHARED / "cub").is_dir(): pytest.skip(f"real CUB files not found at {SHARED / 'cub'} (only present on the project's own machines)")
    return _tiny_cub_run(tmp_path_factory.mktemp("widgets_cub"))


def _explorer(tmp, monkeypatch, **kw):
    monkeypatch.setenv("NIWT_CACHE", str(tmp / "cache")); monkeypatch.setenv("NIWT_DATA", str(tmp / "data"))
    return NIWTExplorer(tmp / "run", **{"n_images": 6, "text_encoder": "words", **kw})


def _metrics(tmp): return json.loads((tmp / "run" / "metrics.json").read_text())


def _mapped_pair(ex):
    "An unseen-class image and an unseen column with some positive Grad-CAM evidence under every input (tiny nets often have none)."
    unseen_cols = [j for j, c in enumerate(ex.columns) if c["kind"] == "unseen"]
    return next((i, j) for i in ex.image_ids[:len(ex.image_ids) // 2].tolist() for j in unseen_cols
                if all(ex.explain(i, j, semantic=s)["cam"].max() > 0 for s in ex.semantics))


@pytest.fixture
def ex(run_dir, monkeypatch): return _explorer(run_dir, monkeypatch)


def _col(ex, class_id): return next(j for j, c in enumerate(ex.columns) if c["class_id"] == class_id)


def _short(name): return name.split(".", 1)[-1]


# -- loading and what is shown first ------------------------------------------------------------------------------
def test_loads_a_run_folder_with_the_runs_classifier(ex, run_dir):
    d, b = ex.d, ex.bundle
    assert (ex.semantics, ex.semantic, ex.semantic_select.options) == (["attributes", "captions"], "attributes", ("attributes", "captions"))
    assert (len(ex.columns), len(ex.image_ids)) == (48, 12)
    assert [c["kind"] for c in ex.columns] == ["seen"] * 36 + ["unseen"] * 12
    assert ex.gamma == json.loads((run_dir / "run" / "metrics.json").read_text())["methods"]["niwt"]["gamma"]   # the run's calibration, not a default
    assert isinstance(ex.gamma, float)
    i = int(ex.image_ids[0])
    torch.testing.assert_close(ex.scores(i), b.scores(d.images[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    s, sc = ex.scores(i), ex.scores(i, calibrate=True)
    torch.testing.assert_close(sc[:36], s[:36] - ex.gamma); torch.testing.assert_close(sc[36:], s[36:])
    assert ex.calibrate_box.value is True and not ex.calibrate_box.disabled
    st = ex.state
    assert st["image"] == ex.image_select.value == i and st["target"] == st["predicted"]
    assert st["predicted"] == int(sc.argmax()) and len(st["top"]) == 5
    assert bytes(ex.pred_view.value).startswith(PNG) and bytes(ex.cam_view.value).startswith(PNG)
    assert _short(st["true_name"]) in ex.text_view.value and st["sentence"] in ex.text_view.value.replace("&quot;", '"')
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


# -- driving the widgets ------------------------------------------------------------------------------------------
def test_another_image_changes_prediction_map_and_text(ex):
    labels = ex.d.labels[ex.image_ids]
    a = int(ex.image_ids[0]); b = int(ex.image_ids[(labels != labels[0]).nonzero()[0, 0]])   # an image of another class
    ex.image_select.value = a
    before = (dict(ex.state), bytes(ex.cam_view.value), ex.text_view.value, bytes(ex.pred_view.value))
    ex.image_select.value = b
    assert ex.state["image"] == b and ex.state["true_name"] == ex.d.classes[int(ex.d.labels[b])] != before[0]["true_name"]
    assert bytes(ex.cam_view.value) != before[1] and ex.text_view.value != before[2] and bytes(ex.pred_view.value) != before[3]
    ex.image_select.value = a
    assert ex.state == before[0] and bytes(ex.cam_view.value) == before[1]          # deterministic: back to the same display


def test_choosing_a_class_explains_that_class(ex):
    from niwt_nb.explain import gradcam
    i = ex.image_select.value
    for col in (3, 40):                                                        # a seen and an unseen column
        ex.class_select.value = col
        st = ex.state
        assert (st["target"], st["target_name"], st["target_kind"]) == (col, ex.columns[col]["name"], ex.columns[col]["kind"])
        assert _short(ex.columns[col]["name"]) in ex.neuron_view.value and _short(ex.columns[col]["name"]) in ex.text_view.value
        e = ex.explain(i, col)
        torch.testing.assert_close(e["cam"], gradcam(ex.model, ex.d.images[i:i + 1], col, ex.W, ex.b)[0])
        assert [n["channel"] for n in st["neurons"]] == e["alpha"].topk(5).indices.tolist()
        assert all(w in ex.vocab for w, _ in st["words"]) and len(st["words"]) == 5
    ex.class_select.value = -1
    assert ex.state["target"] == ex.state["predicted"]


def test_calibration_checkbox_shifts_the_seen_scores(ex):
    i = ex.image_select.value
    ex.calibrate_box.value = False
    raw = dict(ex.state)
    ex.calibrate_box.value = True
    cal = ex.state
    assert (raw["calibrated"], cal["calibrated"]) == (False, True)
    assert raw["top"] != cal["top"]
    assert cal["predicted"] == int(ex.scores(i, calibrate=True).argmax()) and raw["predicted"] == int(ex.scores(i).argmax())


# -- swapping the semantic input ----------------------------------------------------------------------------------
def test_semantic_buttons_swap_the_unseen_rows_and_everything_shown(ex, run_dir):
    d, b = ex.d, ex.bundle
    i, col = _mapped_pair(ex)                                                  # an unseen-class image, an unseen column
    ex.image_select.value, ex.class_select.value = i, col
    before = (dict(ex.state), bytes(ex.pred_view.value), bytes(ex.cam_view.value), ex.neuron_view.value)
    ex.semantic_select.value = "captions"                                       # the button
    st = ex.state
    assert (ex.semantic, b.semantic, st["semantic"]) == ("captions",) * 3
    torch.testing.assert_close(ex.W[36:48], b.W_unseen); torch.testing.assert_close(ex.W[:36], b.W_seen)
    torch.testing.assert_close(ex.scores(i), b.scores(d.images[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    assert ex.gamma == _metrics(run_dir)["by_semantic"]["captions"]["methods"]["niwt"]["gamma"] > 0
    assert f"γ = {ex.gamma:.2f}" in ex.calibrate_box.description
    assert bytes(ex.pred_view.value) != before[1] and bytes(ex.cam_view.value) != before[2]
    assert ex.neuron_view.value != before[3] and "under captions" in ex.neuron_view.value
    assert "semantic input</b>: captions" in ex.text_view.value
    e_att, e_cap = ex.explain(i, col, semantic="attributes"), ex.explain(i, col)
    assert not torch.allclose(e_att["cam"], e_cap["cam"]) and not torch.allclose(e_att["alpha"], e_cap["alpha"])
    assert st["neurons"] == e_cap["neurons"] and st["top"] != before[0]["top"]
    ex.semantic_select.value = "attributes"
    assert ex.state == before[0] and bytes(ex.cam_view.value) == before[2]   # back: the same display


def test_compare_puts_every_input_side_by_side(ex):
    i, col = int(ex.image_ids[0]), 40
    c = ex.compare(i, col)
    assert list(c) == ["attributes", "captions"]
    for sem, v in c.items():
        p = ex.predict(i, semantic=sem)
        assert v["predicted"] == p["predicted"] and v["prob"] == pytest.approx(float(p["probs"][col]))
        torch.testing.assert_close(v["cam"], ex.explain(i, col, semantic=sem)["cam"])
    assert c["attributes"]["prob"] != c["captions"]["prob"]
    seen = ex.compare(i, 3)                                                    # a seen row is the network's own: the same map
    torch.testing.assert_close(seen["attributes"]["cam"], seen["captions"]["cam"])
    ex.image_select.value, ex.class_select.value = i, col
    html = ex.compare_view.value
    assert html.count("data:image/png;base64") == 2 and "attributes</b> (in use)" in html and _short(ex.columns[col]["name"]) in html
    assert ex.state["compare"]["captions"]["channels"] == [n["channel"] for n in c["captions"]["neurons"]]


def test_text_note_says_how_free_text_reaches_each_input(ex):
    note = ex.text_note.value
    assert "<b>attributes</b>: read as attributes (words matching" in note and "<b>captions</b>: embedded with the run&#x27;s tfidf" in note
    assert ex.text_support("captions") == {"ok": True, "how": "embedded with the run's tfidf encoder"}


def test_a_new_class_gets_a_row_under_every_input_that_can_take_it(ex):
    r = ex.add_class("purple cross", text="a small purple cross with dots on a light background")
    assert set(r["by_semantic"]) == {"attributes", "captions"} and r["missing"] == {} and r["semantic"] == "attributes"
    assert r["by_semantic"]["captions"]["how"].startswith("embedded with the run's tfidf")
    i = int(ex.image_ids[0])
    for sem in ex.semantics:
        W, _ = ex._classifier(sem)
        torch.testing.assert_close(W[r["column"]], r["by_semantic"][sem]["w"])
        assert torch.isfinite(ex.scores(i, semantic=sem)[r["column"]]) and ex.explain(i, r["column"], semantic=sem)["available"]
    assert not torch.allclose(r["by_semantic"]["attributes"]["w"], r["by_semantic"]["captions"]["w"])
    ex.class_select.value = r["column"]; ex.semantic_select.value = "captions"
    assert ex.state["target_name"] == "purple cross" and ex.state["available"] and "purple cross" in ex.compare_view.value
    # a domain vector is one input's: the class has no row under the other, is never predicted there and says why
    r2 = ex.add_class("captions only", dom=ex.bundle.dom[int(ex.d.unseen[2])])
    assert list(r2["by_semantic"]) == ["captions"] and "given as a captions vector" in r2["missing"]["attributes"]
    ex.semantic_select.value = "attributes"
    assert ex.scores(i)[r2["column"]] == float("-inf") and ex.predict(i)["probs"][r2["column"]] == 0
    ex.class_select.value = r2["column"]
    assert ex.state["available"] is False and ex.state["neurons"] == []
    assert "no classifier under the attributes input" in ex.text_view.value and "no row" in ex.compare_view.value


# -- new classes --------------------------------------------------------------------------------------------------
def test_adding_an_unseen_class_from_its_own_semantic_input_gives_back_the_runs_row(ex):
    # the first unseen class: its random initial row is the run's too (randn(n, D) starts with randn(1, D)), so the
    # same steps (dom2alpha, the same fed images, fit_alpha2w fast, norm matching) must give the same row
    c = int(ex.d.unseen[0])
    ex.source_select.value = c                                                 # fills the description and a name
    assert ex.text_box.value == ex.describe(c) and _short(ex.d.classes[c]) in ex.name_box.value
    n = len(ex.columns)
    ex.add_button.click()
    assert len(ex.columns) == n + 1 and len(ex.class_select.options) == n + 2 and ex.class_select.value == n
    assert ex.state["target"] == n and ex.state["target_kind"] == "new" and "added" in ex.status.value
    info = ex.added[-1]
    assert info["how"].startswith("the run's attributes of")
    assert F.cosine_similarity(ex.W[n], ex.W[_col(ex, c)], dim=0) > 0.9999   # the same steps as the pipeline
    W_cap, _ = ex._classifier("captions")                                      # ... under the other input too, from its own vector
    assert F.cosine_similarity(W_cap[n], W_cap[_col(ex, c)], dim=0) > 0.9999 and info["by_semantic"]["captions"]["how"].startswith("the run's captions of")
    torch.testing.assert_close(ex.W[n].norm(), ex.W[_col(ex, c)].norm(), rtol=1e-3, atol=1e-5)   # the run's norm (rescaled or not, as selected)
    if ex.settings()["norm_match"]: torch.testing.assert_close(ex.W[n].norm(), ex.bundle.W_seen.norm(dim=1).mean())
    assert ex.settings()["selected"] == ex.bundle.selected
    with pytest.raises(Exception, match="`sem`"): ex.settings("nosuch")
    c2 = int(ex.d.unseen[5])                                                   # any class: the run's predicted alpha
    torch.testing.assert_close(ex.add_class("again", source=c2)["alpha"], ex.bundle.alpha_pred[c2].float())


def test_editing_the_description_adds_a_class_from_free_text(ex):
    c = int(ex.d.unseen[0])
    ex.source_select.value = c
    ex.text_box.value = ex.text_box.value + ", large"                          # edited: read as free text
    ex.add_button.click()
    info = ex.added[-1]
    assert info["how"].startswith("attributes read by words matching") and ("large size", "large", 1.0) in info["matched"]
    assert F.cosine_similarity(info["w"], ex.W[_col(ex, c)], dim=0) > 0.8      # a description close to the class's own
    assert ex.state["target_name"] == info["name"]


def test_free_text_class_is_scored_and_explained(ex):
    r = ex.add_class("purple cross", text="a small purple cross with dots on a light background")
    assert [p for p, _, _ in r["matched"]] == ["cross shape", "purple colour", "dots pattern", "small size", "light background"]
    assert r["seconds"] < 60 and 0 < r["cos"] <= 1
    i = int(ex.image_ids[0])
    assert ex.scores(i).shape == (49,)
    e = ex.explain(i, r["column"])
    assert e["kind"] == "new" and "purple cross" in e["sentence"]
    assert ex.add_class("purple cross", text="purple")["name"] == "purple cross (2)"


def test_bad_description_shows_an_error_and_changes_nothing(ex):
    before, n = dict(ex.state), len(ex.columns)
    ex.source_select.value = -1
    ex.text_box.value = "zzz qqq"; ex.name_box.value = "nothing"
    ex.add_button.click()
    assert "no attribute recognised" in ex.status.value
    assert len(ex.columns) == n and ex.state == before


def test_captions_run_embeds_text_with_the_runs_encoder(captions_dir, monkeypatch):
    from niwt_nb.semantic import embed_class_texts
    ex = _explorer(captions_dir, monkeypatch)
    d = ex.d
    assert ex.cfg.semantic == "captions" and ex.bundle.encoder_name.startswith("tfidf")
    assert ex.semantics == ["captions"] and ex.state["compare"] == {} and ex.compare_view.layout.display == "none"   # one input: nothing to compare
    enc = ex._run_encoder()                                                    # rebuilt: the same map as the run's
    torch.testing.assert_close(embed_class_texts(d.captions, d.n_cls, enc), ex.bundle.dom.float(), atol=1e-5, rtol=1e-5)
    m = ex.text_to_dom(d.captions[0][0])
    torch.testing.assert_close(m["dom"].norm(), torch.tensor(1.0)); assert "tfidf" in m["how"]
    c = int(d.unseen[0])
    r = ex.add_class("again", source=c)
    assert F.cosine_similarity(r["w"], ex.W[_col(ex, c)], dim=0) > 0.9999
    ex.source_select.value = c
    assert ex.text_box.value == " ".join(d.captions[c][:2])
    with pytest.raises(NIWTInputError, match="no word of"): ex.text_to_dom("zzzz qqqq")


def test_from_bundle_has_no_calibration(run_dir, monkeypatch):
    from niwt_nb.pipeline import load_bundle
    monkeypatch.setenv("NIWT_CACHE", str(run_dir / "cache"))
    ex = NIWTExplorer.from_bundle(load_bundle(run_dir / "run"), n_images=2, text_encoder="words")
    assert ex.gamma == 0 and ex.calibrate_box.disabled and ex.calibrate_box.value is False
    with pytest.raises(NIWTInputError, match="`bundle`"): NIWTExplorer.from_bundle(run_dir)


def test_leaves_the_model_as_it_found_it(ex):
    ex.add_class("x", text="red circle"); ex.class_select.value = 40; ex.image_select.value = int(ex.image_ids[3])
    m = ex.model
    assert not m.training and all(p.grad is None for p in m.parameters())
    assert not any(mod._forward_hooks or mod._backward_hooks for mod in m.modules())


@pytest.mark.parametrize("call, needle", [
    (lambda ex: ex.add_class("", text="red"), "`name`: is empty"),
    (lambda ex: ex.add_class("x", text="red", source=3), "exactly one of"),
    (lambda ex: ex.add_class("x", text="   "), "`text`: is empty"),
    (lambda ex: ex.add_class("x", text="zzz"), "no attribute recognised"),
    (lambda ex: ex.add_class("x", dom=torch.zeros(5)), "`dom`"),
    (lambda ex: ex.add_class("x", source=99), "`source`"),
    (lambda ex: ex.explain(int(ex.image_ids[0]), 48), "`column`: expected a column in [0, 48)"),
    (lambda ex: ex.predict(10**6), "`image`"),
    (lambda ex: ex.describe(-1), "`class_id`"),
    (lambda ex: ex.use("sent"), "`semantic`: this run has no 'sent'"),
    (lambda ex: ex.scores(int(ex.image_ids[0]), semantic="sent"), "`semantic`"),
    (lambda ex: ex.compare(int(ex.image_ids[0]), 99), "`column`"),
    (lambda ex: ex.add_class("x", dom=torch.zeros(22), source=3), "exactly one of"),
])
def test_bad_input_names_the_argument(ex, call, needle):
    with pytest.raises(NIWTInputError) as e: call(ex)
    assert needle in str(e.value)


def test_bad_constructor_arguments(run_dir, tmp_path, monkeypatch):
    with pytest.raises(NIWTInputError, match="bundle.pt"): NIWTExplorer(tmp_path / "missing")
    with pytest.raises(NIWTInputError, match="`n_images`"): _explorer(run_dir, monkeypatch, n_images=0)
    with pytest.raises(NIWTInputError, match="`text_encoder`"): _explorer(run_dir, monkeypatch, text_encoder="bert")
    with pytest.raises(NIWTInputError, match="`bridge`"): _explorer(run_dir, monkeypatch, bridge="yes")
    with pytest.raises(NIWTInputError, match="`display_size`"): _explorer(run_dir, monkeypatch, display_size=0)


def test_a_feature_level_run_is_refused_clearly(tmp_path, monkeypatch):
    from niwt_nb.features import make_fake_xlsa17_features
    from niwt_nb.cli import make_run_config
    from niwt_nb.pipeline import run_niwt
    make_fake_xlsa17_features(tmp_path / "x" / "CUB", n_cls=10, unseen=(1, 4, 7), per_class=10, K=2048, n_attr=8)
    cfg = make_run_config("cub", root=str(tmp_path / "x"), features=True, epochs=2)
    cfg = cfg.replace(baselines=(), select=False, dom2alpha=cfg.dom2alpha.replace(max_epochs=20), alpha2w=cfg.alpha2w.replace(max_steps=50))
    run_niwt(cfg, out=tmp_path / "run", store=ArtifactStore(tmp_path / "store"), log=lambda *a: None, report=False)
    with pytest.raises(NIWTInputError, match="feature-level"): NIWTExplorer(tmp_path / "run")


# -- a tiny run on real CUB photos (../shared/data: classes 001-025, attributes + sent) ------------------------------
@pytest.fixture
def cub(cub_dir, shared_data, monkeypatch): return _explorer(cub_dir, monkeypatch)


def test_cub_explorer_shows_bird_photos(cub):
    from PIL import Image
    d = cub.d
    assert cub.semantics == ["attributes", "sent"] and (len(d.seen), len(d.unseen), len(cub.columns)) == (22, 3, 25)
    i = int(cub.image_ids[0])
    ph = cub.photo(i)                                                          # the photo file decoded again at 168 px
    assert ph.shape == (3, 168, 168) and ph.dtype == torch.uint8 and ph.float().std() > 10
    torch.testing.assert_close(cub.photo(i, 32), d.images[i])                  # same file and crop as the network's 32 px input
    assert cub.cam_view.format == "jpeg" and Image.open(io.BytesIO(bytes(cub.cam_view.value))).size == (2 * 168 + 2, 168)
    assert cub.compare_view.value.count("data:image/jpeg;base64") == 2
    assert any("Albatross" in label or "Cormorant" in label or "Ani" in label or "Blackbird" in label for label, _ in cub.image_select.options)


def test_cub_swap_to_sent_changes_unseen_predictions_maps_and_channels(cub, cub_dir):
    d, b = cub.d, cub.bundle
    i, col = _mapped_pair(cub)                                                 # an unseen-class photo; an unseen column
    cub.image_select.value, cub.class_select.value = i, col
    before = (dict(cub.state), bytes(cub.pred_view.value), bytes(cub.cam_view.value), cub.neuron_view.value)
    cub.semantic_select.value = "sent"
    torch.testing.assert_close(cub.W[22:], b.W_unseen); assert b.semantic == "sent" and cub.state["semantic"] == "sent"
    assert cub.gamma == _metrics(cub_dir)["by_semantic"]["sent"]["methods"]["niwt"]["gamma"]
    assert bytes(cub.pred_view.value) != before[1] and bytes(cub.cam_view.value) != before[2] and cub.neuron_view.value != before[3]
    assert not torch.allclose(cub.explain(i, col, semantic="attributes")["alpha"], cub.explain(i, col)["alpha"])
    # the run's own rows come back from each input's own vector, with the NIWT settings the run chose for that input
    for sem in cub.semantics:
        s = cub._sem[sem]
        assert s["a2w"].lam == s["selected"].get("alpha2w.lam", cub.cfg.alpha2w.lam)
    r = cub.add_class("again", source=int(d.unseen[0]))
    for sem in cub.semantics:
        W, _ = cub._classifier(sem)
        assert F.cosine_similarity(W[r["column"]], W[22], dim=0) > 0.9999, sem   # column 22: the first unseen class


def test_cub_free_text_becomes_a_class_under_both_inputs(cub):
    r = cub.add_class("seabird", text=SEABIRD)
    assert [p for p, _, _ in r["matched"]] == ["hooked bill shape", "large (16 - 32 in) size", "yellow bill color"]
    assert r["segments"] == [(None, "large seabird"), ("bill", "hooked yellow bill")]       # 'yellow' is the bill's colour only
    br = cub.bridge_to("sent"); rep = br.report
    assert (rep["fit_classes"], rep["held_out_classes"]) == (22, 3) and -1 <= rep["held_out_cos"] <= 1 and 0 <= rep["nearest_right"] <= 3
    sent = r["by_semantic"]["sent"]
    assert "bridged to sent by a ridge map attributes → sent fitted on the 22 seen classes" in sent["how"]
    assert f"{rep['held_out_cos']:.2f}" in sent["how"] and f"{rep['mean_cos']:.2f}" in sent["how"]   # how good the bridge is, said with it
    torch.testing.assert_close(sent["dom"], br(cub.text_to_dom(SEABIRD, "attributes")["dom"]))    # the bridge of the same reading
    i = int(cub.image_ids[0])
    for sem in cub.semantics:                                                  # predicted, mapped and named under both inputs
        assert float(cub.predict(i, semantic=sem)["probs"][r["column"]]) > 0
        e = cub.explain(i, r["column"], semantic=sem)
        assert e["available"] and e["cam"].shape == (32, 32) and len(e["neurons"]) == 5 and all(n["name"] for n in e["neurons"])
    cub.text_box.value, cub.name_box.value = SEABIRD, "typed seabird"          # the same from the widgets
    cub.add_button.click()
    assert "added <b>typed seabird</b>" in cub.status.value and "<b>sent</b>: attributes read by words matching" in cub.status.value
    assert cub.state["target_name"] == "typed seabird" and "typed seabird" in cub.text_view.value
    neurons = cub.neuron_view.value
    cub.semantic_select.value = "sent"
    assert cub.state["target_name"] == "typed seabird" and cub.state["available"] and cub.neuron_view.value != neurons


def test_cub_without_a_bridge_sent_refuses_free_text_and_says_why(cub_dir, shared_data, monkeypatch):
    ex = _explorer(cub_dir, monkeypatch, bridge=False)
    t = ex.text_support("sent")
    assert not t["ok"] and "no encoder for new text" in t["how"] and "bridge=False" in t["how"]
    assert "cannot take free text" in ex.text_note.value
    with pytest.raises(NIWTInputError, match="no encoder for new text"): ex.text_to_dom(SEABIRD, "sent")
    ex.text_box.value, ex.name_box.value = SEABIRD, "seabird"                  # attributes take it; sent gets no row and says why
    ex.add_button.click()
    r = ex.added[-1]
    assert list(r["by_semantic"]) == ["attributes"] and "no encoder for new text" in r["missing"]["sent"]
    assert "<b>sent</b>: <span style='color:#b00'>no row" in ex.status.value
    ex.use("sent")
    i = int(ex.image_ids[0])
    assert ex.scores(i)[r["column"]] == float("-inf") and not ex.explain(i, r["column"])["available"]
    ex.class_select.value = r["column"]
    assert "has no classifier under the sent input" in ex.text_view.value
    assert set(ex.add_class("own", source=int(ex.d.unseen[0]))["by_semantic"]) == {"attributes", "sent"}   # its own vector works


# -- free text to attributes --------------------------------------------------------------------------------------
NAMES = ["shape::circle", "shape::triangle", "colour::red", "colour::blue", "pattern::stripes", "pattern::solid"]


def test_attribute_text_map_groups_are_exclusive_and_words_are_stemmed():
    tm = AttributeTextMap(NAMES)
    assert tm("Blue striped triangles!")["selected"] == [1, 3, 4]
    m = tm("a red and blue circle")                                             # two colours: ambiguous, not guessed
    assert m["selected"] == [0] and m["groups"] == ["shape"]
    ref = torch.tensor([[1., 0., .9, .1, 0., 1.], [0., 1., .2, .8, 1., 0.], [0., 0., .5, .5, .5, .5]])
    v = tm.to_dom(tm("a circle"), ref)                                          # circle: its max; triangle: its min; the rest: mean
    torch.testing.assert_close(v, torch.cat([torch.tensor([1., 0.]), ref[:, 2:].mean(0)]))


def test_attribute_text_map_ungrouped_attributes_are_independent():
    tm = AttributeTextMap(["black", "white", "furry", "big_teeth"])
    assert tm("a black and white animal with big teeth")["selected"] == [0, 1, 3]
    assert [attribute_phrase(n) for n in ["big_teeth", "has_wing_color::blue"]] == ["big teeth", "blue wing color"]


def test_attribute_text_map_with_an_encoder_thresholds_cosines():
    class Toy:                                                                 # a one-hot "embedding" per known word
        name, vocab = "toy", ["circle", "triangle", "red", "blue", "stripes", "solid", "shape", "colour", "pattern"]
        def encode(self, texts):
            E = torch.tensor([[float(w in t.split()) for w in self.vocab] for t in texts]) + 1e-3
            return E / E.norm(dim=1, keepdim=True)
    tm = AttributeTextMap(NAMES, Toy())
    assert tm.method == "toy" and tm.threshold == 0.6
    m = tm("red circle")
    assert m["selected"] == [0, 2] and all(0.6 <= s < 1 for _, _, s in m["matched"])
    assert AttributeTextMap(NAMES, Toy(), threshold=0.99)("red circle")["selected"] == []
    with pytest.raises(NIWTInputError, match="`encoder`"): AttributeTextMap(NAMES, "minilm")
