"Set-up sanity: CPU torch only, torchvision usable, library in sync with the notebooks."
import subprocess, sys, shutil, importlib.metadata as md
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_cuda_packages_installed():
    dists = {d.metadata["Name"].lower() for d in md.distributions()}
    cuda = sorted(d for d in dists if d.startswith("nvidia-") or d.startswith("triton"))
    assert not cuda, f"CUDA packages were pulled into the environment: {cuda}"
    import torch
    assert torch.__version__.startswith("2.13.0"), torch.__version__


def test_torchvision_imports_and_builds_models():
    import torch
    from niwt_nb.core import import_torchvision
    tv = import_torchvision()
    assert tv.__version__.startswith("0.28")
    m = tv.models.resnet18(num_classes=4).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_torchvision_fix_is_noop_when_healthy():
    "In a fresh interpreter where torchvision imports fine, the fix must not define anything."
    code = ("import sys, types, torch\n"
            "fake = types.ModuleType('torchvision'); sys.modules['torchvision'] = fake\n"
            "from niwt_nb.core import import_torchvision, torchvision_was_repaired\n"
            "assert import_torchvision() is fake\n"
            "assert not torchvision_was_repaired()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_library_in_sync_with_notebooks(tmp_path):
    "nbdev_export of the notebooks must reproduce niwt_nb/ exactly (nobody hand-edits the library)."
    dst = tmp_path / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "_docs", "_proc", "__pycache__"))
    before = {p.relative_to(dst): p.read_text() for p in (dst / "niwt_nb").rglob("*.py")}
    exe = Path(sys.executable).parent / "nbdev_export"
    subprocess.run([str(exe)], cwd=dst, check=True, capture_output=True)
    after = {p.relative_to(dst): p.read_text() for p in (dst / "niwt_nb").rglob("*.py")}
    assert before.keys() == after.keys(), f"modules differ: {before.keys() ^ after.keys()}"
    changed = [str(k) for k in before if before[k] != after[k]]
    assert not changed, f"niwt_nb/ is out of sync with nbs/ for {changed}: run `make export` and commit"


def test_notebooks_are_clean(tmp_path):
    "nbdev_clean must change nothing: no stray outputs metadata or execution counts in the source."
    dst = tmp_path / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "_docs", "_proc", "__pycache__"))
    before = {p: p.read_text() for p in (dst / "nbs").rglob("*.ipynb")}
    exe = Path(sys.executable).parent / "nbdev_clean"
    subprocess.run([str(exe)], cwd=dst, check=True, capture_output=True)
    changed = [str(p.relative_to(dst)) for p in before if p.read_text() != before[p]]
    assert not changed, f"notebooks not clean: {changed}: run `make export` (nbdev_clean) and commit"


def test_readme_is_generated_from_index():
    "README.md is rendered from nbs/index.ipynb (tools/make_readme.py); it must not drift."
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ci_runs_the_readme_test_command():
    "`.ci/run` must call exactly the README's test command (`make test`), nothing weaker."
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and ci[-1].strip() == "make test"
    mk = (ROOT / "Makefile").read_text()
    assert "-m pytest tests" in mk.split("\ntest:")[1].split("\n\n")[0]


def test_installed_metadata_comes_from_settings_ini():
    "setup.py passes settings.ini's version and description to setuptools (it once installed as version 0.0.0)."
    from configparser import ConfigParser
    import niwt_nb
    cfg = ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini", encoding="utf-8")
    meta = md.metadata("niwt_nb")
    assert md.version("niwt_nb") == cfg["DEFAULT"]["version"] == niwt_nb.__version__
    assert meta["Summary"] == cfg["DEFAULT"]["description"]
