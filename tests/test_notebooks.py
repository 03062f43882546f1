"""Run every notebook's tests (like `nbdev_test`), one pytest case per notebook, and check its saved outputs.

Each notebook is executed once, with execnb, the cells of settings.ini `tst_flags` skipped (tools/run_nbs.py, which
`make outputs` uses to save the outputs, executes the same cells in the same environment). The fresh outputs are
then compared with the saved ones cell by cell (`run_nbs.compare`: printed and displayed text equal up to volatile
parts and numbers within 2%, images where images are drawn, nothing saved where nothing is produced). Without the
project's real data (../shared/data, absent on CI and in users' clones) the cells that read it are not compared."""
import importlib.util, os, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
SHARED = ROOT.parent / "shared" / "data"
_spec = importlib.util.spec_from_file_location("run_nbs", ROOT / "tools" / "run_nbs.py")
run_nbs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(run_nbs)


@pytest.mark.parametrize("nb", run_nbs.notebooks(), ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, monkeypatch, tmp_path):
    monkeypatch.chdir(nb.parent)
    monkeypatch.syspath_prepend(str(ROOT))
    for k, v in run_nbs.ENV.items(): monkeypatch.setenv(k, v)
    monkeypatch.setenv("NIWT_CACHE", str(tmp_path / "cache")); monkeypatch.setenv("NIWT_DATA", str(tmp_path / "data"))
    try: fresh, run = run_nbs.execute(nb)
    except run_nbs.NotebookError as e: pytest.fail(f"{nb.name} failed:\n{e}", pytrace=False)
    rel = nb.relative_to(ROOT).as_posix()
    if not SHARED.is_dir():
        run = [i for i in run if not re.search(r"shared/data|\bSHARED\b", run_nbs.src(fresh["cells"][i]))]
    stale = run_nbs.compare(run_nbs.read(nb), fresh, run, rel)
    assert not stale, (f"{rel}: saved outputs are stale or missing (run `make outputs NBS={rel}` and commit):\n"
                       + "\n".join(stale))
