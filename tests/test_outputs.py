"""The notebooks' saved outputs (made by `make outputs`, tools/run_nbs.py): small, clean, with the figures they draw.
Staleness against the code is checked where the notebooks are executed anyway (tests/test_notebooks.py); the
comparison itself is tested here on a tiny notebook made up for the purpose."""
import copy, importlib.util, json, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
_spec = importlib.util.spec_from_file_location("run_nbs", ROOT / "tools" / "run_nbs.py")
run_nbs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(run_nbs)
MAX_BYTES = 1_500_000
# a cell that draws: at its top level (not inside a `def`, `class` or `lambda`) it calls pyplot / seaborn, `.plot(`,
# `.imshow(`, or one of the package's plot_* functions
PLOT_ATTRS = {"plot", "imshow", "subplots", "subplot", "figure", "bar", "barh", "hist", "scatter", "show", "heatmap", "matshow"}


def _draws(source: str) -> bool:
    import ast
    try: tree = ast.parse("\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))))
    except SyntaxError: return False
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): continue
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            if name.startswith("plot_") or (isinstance(f, ast.Attribute) and (name in ("plot", "imshow") or owner in ("plt", "sns")
                                                                                and name in PLOT_ATTRS)):
                return True
        todo += list(ast.iter_child_nodes(n))
    return False


REL = [str(p.relative_to(NBS)) for p in run_nbs.notebooks()]


def _outputs(nb):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def draws(nb, flags=None) -> list[int]:
    "Indices of the cells `make outputs` executes that call plotting code (outside `test_fail` lambdas and `def`s)."
    flags = run_nbs.skip_flags() if flags is None else flags
    return [i for i, c in enumerate(nb["cells"]) if not run_nbs.is_skipped(c, flags) and _draws(run_nbs.src(c))]


@pytest.mark.parametrize("rel", REL)
def test_saved_outputs_are_small_and_clean(rel):
    path = NBS / rel
    assert path.stat().st_size < MAX_BYTES, f"{rel}: {path.stat().st_size/1e6:.1f} MB > {MAX_BYTES/1e6} MB: smaller figures?"
    nb = run_nbs.read(path)
    outs = _outputs(nb)
    errors = [o.get("ename") for o in outs if o["output_type"] == "error"]
    assert not errors, f"{rel}: saved error outputs {errors} (fix the cell, then `make outputs NBS=nbs/{rel}`)"
    bars = [o for o in outs if o["output_type"] == "stream" and ("\r" in "".join(o["text"]) or run_nbs._BAR.search("".join(o["text"])))]
    assert not bars, f"{rel}: progress bars saved in outputs (`make outputs NBS=nbs/{rel}` drops them)"
    stderr = [o for o in outs if o["output_type"] == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{rel}: stderr (warnings, progress) saved in outputs (`make outputs NBS=nbs/{rel}` drops it)"
    counts = [c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"] + \
             [o.get("execution_count") for o in outs if o["output_type"] == "execute_result"]
    assert set(counts) <= {None}, f"{rel}: execution counts saved (run nbdev_clean)"


@pytest.mark.parametrize("rel", REL)
def test_chapter_that_draws_saves_its_figures(rel):
    nb = run_nbs.read(NBS / rel)
    cells = draws(nb)
    images = [o for o in _outputs(nb) if any(k.startswith("image/") for k in o.get("data", {}))]
    if not cells: return
    assert images, (f"{rel}: cells {cells} draw figures but the notebook has no saved image output "
                    f"(run `make outputs NBS=nbs/{rel}`; a chapter whose cells all `plt.close` its figures shows none)")


# -- the tools themselves, on a made-up notebook ---------------------------------------------------------------------
def _nb(*sources):
    return {"cells": [{"cell_type": "markdown", "id": "m0", "metadata": {}, "source": "# Tiny\n\n> made up"}] +
                     [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s}
                      for i, s in enumerate(sources)],
            "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "run_nbs.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_run_nbs_saves_outputs_and_catches_stale_ones(tmp_path):
    path = tmp_path / "tiny.ipynb"
    path.write_text(json.dumps(_nb(
        "import sys, torch\nprint('acc', torch.rand(1).item())\nprint('tick\\r', end=''); print('x', file=sys.stderr)",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);",
        "#| slow\nprint('slow cell')",
        "{'a': 1}")))
    r = _run(path); assert r.returncode == 0, r.stderr
    nb = run_nbs.read(path)
    c = nb["cells"]
    out0 = c[1]["outputs"]
    test_text = "".join(out0[0]["text"])
    assert [o["output_type"] for o in out0] == ["stream"] and test_text.startswith("acc 0.4962") and "tick" not in test_text
    assert "image/png" in c[2]["outputs"][0]["data"]                                     # kept by nbdev_clean
    from PIL import Image; import base64, io
    w, h = Image.open(io.BytesIO(base64.b64decode(c[2]["outputs"][0]["data"]["image/png"]))).size
    assert w <= 6 * 72 + 20 and h <= 4 * 72 + 20, (w, h)                                # 72 dpi, 6 x 4 in at most
    assert c[3]["outputs"] == [] and c[4]["outputs"][0]["execution_count"] is None
    r = _run("--check", path); assert r.returncode == 0, r.stdout + r.stderr             # reproducible: seeded

    # now the code changes and the outputs are not regenerated
    stale = copy.deepcopy(nb)
    stale["cells"][1]["source"] = "print('acc', 0.75)"
    stale["cells"][2]["source"] = "import matplotlib.pyplot as plt"
    stale["cells"][4]["source"] = "x = 1"
    path.write_text(json.dumps(stale))
    r = _run("--check", path)
    assert r.returncode == 1
    assert "cell 1" in r.stdout and "printed output changed" in r.stdout
    assert "cell 2" in r.stdout and "the cell now produces none" in r.stdout
    assert "cell 4" in r.stdout


def test_compare_tolerates_noise_and_names_the_stale_cell():
    def nb(*outs):
        n = _nb(*["x"] * len(outs))
        for c, o in zip(n["cells"][1:], outs): c["outputs"] = o
        return n
    so = lambda t: [{"name": "stdout", "output_type": "stream", "text": [t]}]
    res = lambda t: [{"data": {"text/plain": [t]}, "execution_count": None, "metadata": {}, "output_type": "execute_result"}]
    img = [{"data": {"image/png": "iVBOR\n", "text/plain": ["<Figure size 432x288 with 1 Axes>"]}, "metadata": {}, "output_type": "display_data"}]
    saved = nb(so("acc 0.500 H=12.0 in 3.2 s at /tmp/abc/cache\n"), res("<Foo at 0x7f00aa>"), img, [])
    fresh = nb(so("acc 0.505  H=12.1 in 14.0 s at /tmp/xyz/cache\n"), res("<Foo at 0x7e11bb>"), img, [])
    assert run_nbs.compare(saved, fresh, [1, 2, 3, 4]) == []
    fresh = nb(so("acc 0.600 H=12.0\n"), res("<Bar>"), [], so("new\n"))
    probs = run_nbs.compare(saved, fresh, [1, 2, 3, 4], "nbs/tiny.ipynb")
    assert len(probs) == 4 and all(p.startswith("nbs/tiny.ipynb cell") for p in probs), probs
    assert "saved: acc 0.500" in probs[0] and "fresh: acc 0.600" in probs[0]
    assert "1 saved image(s), fresh execution draws 0" in probs[2] or "produces none" in probs[2]
    assert "no saved output" in probs[3]
    assert run_nbs.compare(saved, fresh, [], "x") == []                                  # cells not executed: not compared
    assert run_nbs.close_text("loss 1e-3", "loss 1.01e-3") and not run_nbs.close_text("n = 36", "n = 38")
    assert not run_nbs.close_text("acc 0.5", "err 0.5")


def test_tidy_drops_stderr_progress_and_counts():
    outs = [{"name": "stderr", "output_type": "stream", "text": ["warn\n"]},
            {"name": "stdout", "output_type": "stream", "text": ["a\n", " 10%|#  | 1/10\r 100%|####| 10/10\n"]},
            {"name": "stdout", "output_type": "stream", "text": "\x1b[31mb\x1b[0m\n"},
            {"data": {"text/plain": ["1"]}, "execution_count": 7, "metadata": {}, "output_type": "execute_result"}]
    t = run_nbs.tidy(outs)
    assert t[0] == {"name": "stdout", "output_type": "stream", "text": ["a\n", "b\n"]}
    assert t[1]["execution_count"] is None and len(t) == 2


def test_nbdev_clean_keeps_outputs_images_and_widget_state():
    from nbdev.clean import clean_nb
    from fastcore.basics import AttrDict
    d = run_nbs.settings()
    assert d.get("clear_all", "False").lower() in ("false", "0", "no"), "settings.ini: clear_all must stay False"
    n = _nb("x")
    n["cells"][1]["outputs"] = [{"data": {"image/png": "iVBOR\n", "text/plain": ["<Figure>"]}, "metadata": {}, "output_type": "display_data"}]
    n["metadata"]["widgets"] = {run_nbs.WIDGET_STATE: {"state": {}, "version_major": 2, "version_minor": 0}}
    before = copy.deepcopy(n)
    clean_nb(n, False, d.get("allowed_metadata_keys", "").split(), d.get("allowed_cell_metadata_keys", "").split(), True)
    assert n["cells"][1]["outputs"][0]["data"]["image/png"].strip() == "iVBOR" and n["metadata"]["widgets"] == before["metadata"]["widgets"]


def test_the_runner_skips_what_the_test_suite_skips():
    flags = run_nbs.skip_flags()
    assert {"slow", "cuda", "notest"} <= flags and "slow" not in run_nbs.skip_flags(["slow"])
    c = lambda s: {"cell_type": "code", "source": s}
    assert run_nbs.is_skipped(c("#| slow\nx"), flags) and run_nbs.is_skipped(c("#| eval: false\nx"), flags)
    assert run_nbs.is_skipped(c("import nbdev; nbdev.nbdev_export()"), flags) and not run_nbs.is_skipped(c("#| hide\nx"), flags)
    assert draws(_nb("ax = plot_gzsl(r)"), flags) and draws(_nb("for a in axs: a.imshow(x)"), flags)
    assert not draws(_nb("test_fail(lambda: plot_gzsl({}))", "def plot_x(a): plt.plot(a)", "#| slow\nplt.plot(x)"), flags)
