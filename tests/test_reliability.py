"""Reliability: a table of bad inputs at the public entry points, interruption (SIGKILL) and resume, determinism,
and safe loading. Each bad input must raise `NIWTInputError` naming the argument, never a silent wrong answer."""
import dataclasses, json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from niwt_nb.core import NIWTInputError, ArtifactStore, get_layer, seed_everything
from niwt_nb.data import make_toy_data, load_image
from niwt_nb.models import ModelConfig, TrainConfig, build_model, train_seen
from niwt_nb.importance import importances
from niwt_nb.dom2alpha import fit_dom2alpha
from niwt_nb.alpha2w import fit_alpha2w
from niwt_nb.evaluate import gzsl_metrics
from niwt_nb.pipeline import RunConfig, load_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "niwt_run"


def _toy(**kw):
    d = make_toy_data(n_cls=6, n_unseen=2, n_per_class=6, size=16)
    for k, v in kw.items(): setattr(d, k, v)
    return d


def _net(n_seen=4):
    return build_model(ModelConfig(width=8), n_seen=n_seen).eval()


def _bad_image(tmp):
    p = Path(tmp) / "corrupt.jpg"; p.write_bytes(b"\xff\xd8 not really a jpeg"); return p


def _ckpt_other_arch(tmp):
    p = Path(tmp) / "r18.pt"
    from niwt_nb.core import import_torchvision
    torch.save(import_torchvision().models.resnet18().state_dict(), p); return p


def _stale_artifact(tmp):
    st = ArtifactStore(tmp); st.save("alphas", "k1", {"a": torch.ones(2)})
    st.sidecar("alphas", "k1").write_text(json.dumps({"stage": "alphas", "key": "OTHER"})); return st


# (id, callable taking tmp_path, regex the message must match)
CASES = [
    ("dataset-unknown", lambda t: load_dataset(RunConfig(dataset="cubb")), r"`dataset`.*unknown dataset"),
    ("backbone-unknown", lambda t: ModelConfig(backbone="resnet17"), r"`backbone`.*resnet18"),
    ("semantic-unknown", lambda t: RunConfig(semantic="glove"), r"`semantic`.*unknown semantic"),
    ("layer-unknown", lambda t: build_model(ModelConfig(backbone="resnet18", layer="layer4.O"), 3), r"layer4\.0"),
    ("layer-no-spatial", lambda t: build_model(ModelConfig(backbone="resnet18", layer="fc"), 3), r"`layer`"),
    ("dom-wrong-rows", lambda t: _toy(dom={"attributes": torch.rand(5, 4)}).validate(), r"dom"),
    ("dom-nan", lambda t: _toy(dom={"attributes": torch.full((6, 4), float("nan"))}).validate(), r"NaN"),
    ("empty-class", lambda t: _toy(labels=torch.where(make_toy_data(6, 2, 6, 16).labels == 1, 0, make_toy_data(6, 2, 6, 16).labels)).validate(),
     r"no images"),
    ("head-vs-data-classes", lambda t: train_seen(_net(n_seen=7), _toy(), TrainConfig(epochs=1)), r"7 outputs.*4 seen"),
    ("targets-length", lambda t: importances(_net(), torch.rand(3, 3, 16, 16), torch.tensor([0, 1])), r"`targets`"),
    ("missing-image", lambda t: load_image(Path(t) / "nope.jpg", 3), r"does not exist"),
    ("corrupt-image", lambda t: load_image(_bad_image(t), 4), r"cannot be decoded"),
    ("checkpoint-other-arch", lambda t: build_model(ModelConfig(weights=str(_ckpt_other_arch(t))), 3), r"`weights`"),
    ("artifact-other-key", lambda t: _stale_artifact(t).load("alphas", "k1"), r"belongs to"),
    ("dom2alpha-nan", lambda t: fit_dom2alpha(torch.full((6, 4), float("nan")), torch.rand(8, 5), torch.zeros(8, dtype=torch.long),
                                             torch.tensor([0, 1]), torch.tensor([2])), r"NaN"),
    ("alpha2w-K-mismatch", lambda t: fit_alpha2w(_net(), torch.rand(2, 5), torch.rand(4, 3, 16, 16)), r"alpha_target|K"),
    ("gzsl-length", lambda t: gzsl_metrics(torch.rand(4, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]),
                                           torch.tensor([2]), torch.tensor([0]), torch.tensor([2])), r"`y`"),
    ("seed-not-int", lambda t: seed_everything("1"), r"`seed`"),
    ("run-config-type", lambda t: RunConfig(n_feed=0), r"`n_feed`"),
    ("cub-root-missing", lambda t: load_dataset(RunConfig(dataset="cub", root=str(Path(t) / "nope"))), r"`root`"),
    ("cub-root-wrong", lambda t: load_dataset(RunConfig(dataset="cub", root=str(t))), r"`root`.*CUB_200_2011"),
    ("awa2-root-missing", lambda t: load_dataset(RunConfig(dataset="awa2", root=str(Path(t) / "nope"))), r"`root`"),
    ("features-root-wrong", lambda t: load_dataset(RunConfig(dataset="cub_res101", root=str(t))), r"res101\.mat"),
]


@pytest.mark.parametrize("case, fn, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, fn, pattern, tmp_path):
    with pytest.raises(NIWTInputError) as e:
        fn(tmp_path)
    msg = str(e.value)
    assert re.search(pattern, msg, re.S), msg
    assert "Fix:" in msg, f"the message must say how to fix it: {msg}"


def test_table_is_large_enough():
    assert len(CASES) >= 15


# --- interruption and determinism ----------------------------------------------

def _args(cache, out):
    return [str(BIN), "--quick", "--quiet", "--cache", str(cache), "--out", str(out)]


def _wait_for(path_glob: Path, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(path_glob.parent.glob(path_glob.name)): return True
        if proc.poll() is not None: return False
        time.sleep(0.05)
    return False


def test_sigkill_then_resume_gives_identical_results(tmp_path):
    "Kill niwt_run (SIGKILL) right after a stage finished and once mid-way; the rerun resumes and matches a clean run."
    ref = subprocess.run(_args(tmp_path / "ref_cache", tmp_path / "ref"), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cache = tmp_path / "cache"
    # 1) kill just after the alphas stage has been written
    p = subprocess.Popen(_args(cache, tmp_path / "out"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached = _wait_for(cache / "alphas" / "*.json", p)
    p.send_signal(signal.SIGKILL); p.wait()
    assert reached, "the run ended before the alphas stage was written"
    assert not (tmp_path / "out" / "metrics.json").exists()
    # no half-written artifact is ever visible: every finished artifact (one with a sidecar) loads completely
    st = ArtifactStore(cache)
    finished = [(j.parent.name, j.stem) for j in cache.glob("*/*.json")]
    assert ("alphas" in {s for s, _ in finished}) and all(st.load(s, k) is not None for s, k in finished)
    # 2) resume, but kill again almost at once (during start-up/stage loading)
    p = subprocess.Popen(_args(cache, tmp_path / "out"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0); p.send_signal(signal.SIGKILL); p.wait()
    # 3) resume to the end
    res = subprocess.run(_args(cache, tmp_path / "out"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert a["methods"] == b["methods"]
    assert b["per_seed"][0]["cached"]["seen_model"] and b["per_seed"][0]["cached"]["alphas"]
    # determinism across processes: the stored alphas and unseen weights are bit-identical
    for stage, name, key in (("alphas", "alphas", "alphas"), ("niwt", "niwt[attributes][niwt]", "W_unseen")):
        sa, sb = ArtifactStore(tmp_path / "ref_cache"), ArtifactStore(cache)
        k = a["per_seed"][0]["keys"][name]
        assert torch.equal(sa.load(stage, k)[key], sb.load(stage, k)[key]), stage
    assert b["config"]["seed"] == 0 and "torch" in b["versions"]


# --- safety ------------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    "No module unpickles arbitrary objects: every torch.load passes weights_only=True."
    bad = []
    for p in (ROOT / "niwt_nb").glob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line: bad.append(f"{p.name}:{i}: {line.strip()}")
    assert not bad, bad


def test_no_pickle_imports():
    bad = [p.name for p in (ROOT / "niwt_nb").glob("*.py") if re.search(r"^\s*import pickle|^\s*from pickle", p.read_text(), re.M)]
    assert not bad, bad
