"`niwt_run` as a user runs it: a subprocess on a tiny configuration, its outputs, and its bad-argument errors."
import json, subprocess, sys
from pathlib import Path
import pytest

BIN = Path(sys.executable).parent / "niwt_run"
KEYS = {"u", "s", "H", "zsl_top1", "u_cal", "s_cal", "H_cal"}


def run(*args, cwd=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("semantic", ["attributes", "captions"])
def test_quick_run_writes_metrics_and_report(tmp_path, semantic):
    out = tmp_path / "run"
    extra = ["--encoder", "tfidf"] if semantic == "captions" else []
    p = run("--quick", "--quiet", "--out", str(out), "--cache", str(tmp_path / "c"), "--semantic", semantic, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert {"niwt", "eszsl", "sae", "dom2w"} <= set(m["methods"])
    for name, row in m["methods"].items():
        assert KEYS <= set(row), (name, row)
        assert all(0 <= row[k] <= 1 for k in KEYS), (name, row)
    assert m["config"]["semantic"] == semantic and m["config"]["seed"] == 0
    assert {"seen_model", "alphas", f"niwt[{semantic}][niwt]", "total"} <= set(m["timings_s"])
    rep = (out / "report.md").read_text()
    assert "niwt" in rep and "gzsl.png" in rep
    for png in ("gzsl.png", "training.png", "alphas.png", "alpha2w.png", "dom2alpha.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "NIWT: u=" in p.stdout


def test_rerun_resumes_from_cache(tmp_path):
    args = ["--quick", "--quiet", "--cache", str(tmp_path / "c")]
    a = run(*args, "--out", str(tmp_path / "a")); assert a.returncode == 0, a.stderr[-2000:]
    b = run(*args, "--out", str(tmp_path / "b")); assert b.returncode == 0, b.stderr[-2000:]
    ma, mb = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert ma["methods"] == mb["methods"]
    assert all(mb["per_seed"][0]["cached"][k] for k in ("seen_model", "alphas", "niwt[attributes][niwt]"))


@pytest.mark.parametrize("args, needle", [
    (["--backbone", "resnet17"], "resnet18"),
    (["--semantic", "glove"], "`--semantic`"),
    (["--dataset", "cubb"], "`--dataset`"),
    (["--seeds", "0 x"], "`--seeds`"),
    (["--weights", "/nonexistent/w.pt"], "`--weights`"),
    (["--encoder", "nosuch"], "`--encoder`: unknown text encoder"),          # the flag, not the function's `name`
    (["--preset", "nosuch"], "`--preset`: unknown preset"),
    (["--preset", "cub_resnet101", "--dataset", "awa2"], "`--dataset`: preset 'cub_resnet101' is for dataset 'cub'"),
    (["--features", "--dataset", "cub", "--backbone", "vgg16"], "`--features`"),
    (["--layer", "features.9"], "`--layer`"),
    (["--img-size", "4"], "`--img-size`"),
])
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, args, needle):
    p = run("--quick", "--quiet", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_feature_level_run_on_a_generated_res101_mat(tmp_path):
    "`niwt_run --features` on a tiny xlsa17-style res101.mat written here (works on any clone)."
    from niwt_nb.features import make_fake_xlsa17_features
    make_fake_xlsa17_features(tmp_path / "x" / "CUB", n_cls=10, unseen=(1, 4, 7), per_class=10, K=2048, n_attr=8)
    p = run("--dataset", "cub", "--features", "--root", str(tmp_path / "x"), "--epochs", "2", "--quiet",
            "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["config"]["dataset"] == "cub_res101" and m["config"]["model"]["in_features"] == 2048
    assert all(0 <= m["methods"]["niwt"][k] <= 1 for k in KEYS)


def test_present_only_cub_run_on_shared_data(shared_data, tmp_path):
    "`niwt_run --dataset cub --present-only` on the partial CUB in ../shared/data (classes 001-025): photos of mixed sizes, no --img-size."
    p = run("--dataset", "cub", "--root", str(shared_data / "cub"), "--present-only", "--epochs", "1", "--semantic", "sent",
            "--quiet", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["config"]["present_only"] is True and m["config"]["dataset"] == "cub" and m["config"]["semantic"] == "sent"
    assert m["config"]["img_size"] is None and "niwt" in m["methods"]
    assert (tmp_path / "o" / "report.md").is_file()


def test_captions_on_partial_cub_fail_at_once_naming_the_flag(shared_data, tmp_path, monkeypatch):
    "Captions exist for classes 001-010 only: `--semantic captions` on 001-025 is refused before any image is decoded."
    from niwt_nb import xlsa17
    from niwt_nb.cli import niwt_run_cli
    def no_decode(*a, **k): raise AssertionError("images were decoded before the configuration was checked")
    monkeypatch.setattr(xlsa17, "decode_images", no_decode)
    with pytest.raises(SystemExit) as e:
        niwt_run_cli.__wrapped__(out=str(tmp_path / "o"), dataset="cub", root=str(shared_data / "cub"), present_only=True,
                                 semantic="captions", cache=str(tmp_path / "c"), quiet=True)
    assert e.value.code == 2


def test_checks_run_before_images_are_decoded(shared_data, tmp_path, monkeypatch, capsys):
    "A bad layer, backbone, weights file or image size on real CUB fails in the checks, never after decoding photos."
    from niwt_nb import xlsa17
    from niwt_nb.cli import niwt_run_cli
    def no_decode(*a, **k): raise AssertionError("images were decoded before the configuration was checked")
    monkeypatch.setattr(xlsa17, "decode_images", no_decode)
    for kw, flag in ((dict(layer="features.9"), "--layer"), (dict(weights=str(tmp_path / "none.pt")), "--weights"),
                     (dict(img_size=4), "--img-size"), (dict(semantic="attributes_binary"), "--semantic")):
        with pytest.raises(SystemExit):
            niwt_run_cli.__wrapped__(out=str(tmp_path / "o"), dataset="cub", root=str(shared_data / "cub"), present_only=True,
                                     cache=str(tmp_path / "c"), quiet=True, **kw)
        assert f"`{flag}`" in capsys.readouterr().err, kw


def test_quiet_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    from niwt_nb.cli import niwt_run
    monkeypatch.delenv("NIWT_QUIET", raising=False)
    niwt_run(out=str(tmp_path / "o"), quick=True, quiet=True, cache=str(tmp_path / "c"))
    assert "NIWT_QUIET" not in __import__("os").environ


def test_missing_cub_images_is_a_clear_error_without_present_only(shared_data, tmp_path):
    p = run("--dataset", "cub", "--root", str(shared_data / "cub"), "--quiet", "--out", str(tmp_path / "o"),
            "--cache", str(tmp_path / "c"))
    assert p.returncode == 2 and "missing" in p.stderr and "present" in p.stderr, p.stderr[-2000:]
