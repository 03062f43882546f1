"Run every notebook's tests (like `nbdev_test`), one pytest case per notebook."
import os, configparser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
SKIP_FLAGS = cfg["DEFAULT"].get("tst_flags", "").split()


def _notebooks():
    return sorted(p for p in NBS.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


@pytest.mark.parametrize("nb", _notebooks(), ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, monkeypatch):
    from nbdev.test import test_nb
    monkeypatch.chdir(nb.parent)
    monkeypatch.setenv("IN_TEST", "1")
    ok, secs = test_nb(nb, skip_flags=SKIP_FLAGS, basepath=ROOT)
    assert ok, f"{nb.name} failed (see the traceback above)"
