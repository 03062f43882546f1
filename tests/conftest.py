import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("NIWT_QUIET", "1")
# The suite runs as 2 xdist workers on 2 cores: one intra-op thread each avoids oversubscription (20x slowdowns).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs ../shared/data (real CUB/AWA2 files)")


@pytest.fixture
def shared_data():
    "Path to ../shared/data, or skip with a reason when a user's clone has no ../shared."
    if not SHARED.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED} (only present on the project's own machines)")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    "Every test writes its cache and data under its own tmp folder, never into the user's ~/.cache."
    monkeypatch.setenv("NIWT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NIWT_DATA", str(tmp_path / "data"))
