"""The docs site without Quarto (the deploy workflow builds the real one): the sidebar lists every notebook, every
notebook renders to HTML with nbconvert and shows no traceback, the pages with widgets are executed in a real kernel
(like `jupyter nbconvert --execute`) and their widget state is saved, survives `nbdev_clean` and is embedded in the
HTML. The other notebooks are executed by tests/test_notebooks.py. Each page is also put through nbdev's own docs
processors (what `nbdev_docs` does before Quarto: it re-runs export and show_doc cells and the imports of the others,
tools/nbdev_procs.py, and keeps the other saved outputs) and rendered, with its saved figures embedded; links between
pages resolve."""
import configparser, copy, importlib.util, json, os, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
CFG = configparser.ConfigParser(); CFG.read(ROOT / "settings.ini")
_spec = importlib.util.spec_from_file_location("run_nbs", ROOT / "tools" / "run_nbs.py")
run_nbs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(run_nbs)   # the notebook list and the skip rule
STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"
EXECUTED = ["index.ipynb", "explanation.ipynb", "14_widgets.ipynb"]   # cheap pages, and the ones with widgets

pytestmark = pytest.mark.xdist_group("docs")


def _notebooks():
    return [str(p.relative_to(NBS)) for p in run_nbs.notebooks()]


def _sidebar_entries(contents):
    "Every page of a Quarto sidebar `contents` list (strings, or sections with `contents` and an optional `href`)."
    out = []
    for e in contents:
        if isinstance(e, str): out.append(e)
        elif isinstance(e, dict):
            if "href" in e: out.append(e["href"])
            out += _sidebar_entries(e.get("contents", []))
    return out


def _read(rel):
    import nbformat
    return nbformat.read(NBS / rel, as_version=4)


def _html(nb) -> str:
    from nbconvert import HTMLExporter
    return HTMLExporter().from_notebook_node(nb)[0]


def _clean(nb):
    "nbdev_clean's transformation, with this repository's settings."
    from nbdev.clean import clean_nb
    d = CFG["DEFAULT"]
    clean_nb(nb, d.getboolean("clear_all", False), d.get("allowed_metadata_keys", "").split(),
             d.get("allowed_cell_metadata_keys", "").split(), d.getboolean("clean_ids", True))
    return nb


def _title(nb) -> str:
    first = next(c for c in nb.cells if c.cell_type == "markdown")
    return next(l for l in first.source.splitlines() if l.startswith("# "))[2:].strip()


# -- site structure -----------------------------------------------------------------------------------------------
def test_sidebar_lists_every_notebook_once_and_nothing_else():
    import yaml
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())
    listed = _sidebar_entries(side["website"]["sidebar"]["contents"])
    assert sorted(e for e in set(listed) if listed.count(e) > 1) == [], "listed twice"
    assert sorted(set(_notebooks()) - set(listed)) == [], "notebooks missing from nbs/sidebar.yml"
    assert sorted(e for e in listed if not (NBS / e).exists()) == [], "sidebar entries without a notebook"
    assert listed[:2] == ["index.ipynb", "explanation.ipynb"]


def test_quarto_config_reads_the_sidebar_and_settings_keep_it():
    import yaml
    q = yaml.safe_load((NBS / "_quarto.yml").read_text())
    assert q["project"]["type"] == "website" and "sidebar.yml" in q["metadata-files"]
    # with custom_sidebar = False, nbdev_docs regenerates nbs/sidebar.yml from the file names (losing its sections)
    assert CFG["DEFAULT"].getboolean("custom_sidebar"), "settings.ini: set `custom_sidebar = True` to keep nbs/sidebar.yml"


# -- every page renders -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", _notebooks())
def test_notebook_renders_to_html_without_tracebacks(rel):
    nb = _read(rel)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{rel} has saved error outputs: {[o.get('ename') for o in errors]}"
    html = _html(nb)
    import html as h
    assert h.escape(_title(nb), quote=False) in html, f"{rel}: title missing from the HTML"


@pytest.mark.parametrize("rel", _notebooks())
def test_page_renders_through_nbdev_docs_processing_with_its_figures(rel, monkeypatch):
    "What Quarto gets from `nbdev_docs` (nbdev's processors, run as its `serve_drv` does) renders with every saved figure."
    from execnb.nbio import read_nb, nb2str
    from nbdev.processors import FilterDefaults
    from nbdev.process import extract_directives
    saved = _read(rel)
    def visible(c): return "hide" not in extract_directives(copy.deepcopy(c), remove=False)
    pngs = [o["data"]["image/png"].strip() for c in saved.cells if c.cell_type == "code" and visible(c)
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    monkeypatch.chdir(ROOT); monkeypatch.setenv("IN_TEST", "1")
    monkeypatch.syspath_prepend(str(ROOT / "tools"))                           # settings.ini `procs = nbdev_procs:...`
    nb = read_nb(NBS / rel)
    try: FilterDefaults()(nb)
    except Exception as e: pytest.fail(f"{rel}: nbdev_docs would fail processing it: {e!r}\n{e.__cause__!r}", pytrace=False)
    import nbformat
    proc = nbformat.reads(nb2str(nb), as_version=4)
    proc.cells = [c for c in proc.cells if c.get("source") is not None]          # hide_ removes the source
    errors = [o for c in proc.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{rel}: error outputs after nbdev's processing: {[o.get('ename') for o in errors]}"
    html = _html(proc)
    shown = [o["data"]["image/png"].strip() for c in proc.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) >= len(pngs), f"{rel}: {len(pngs)} saved figures, {len(shown)} after nbdev's processing"
    missing = [i for i, b in enumerate(shown) if f"data:image/png;base64,{b[:200]}" not in html]
    assert not missing, f"{rel}: figures {missing} are not embedded in the HTML"


# -- links between pages ---------------------------------------------------------------------------------------------
def _page_html(rel) -> str:
    "The site path of a notebook, as nbdev links it (`08_evaluate.ipynb` -> `evaluate.html`)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(rel)).as_posix()


def _slug(heading: str) -> str:
    "Pandoc's automatic identifier of a heading."
    t = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    t = re.sub(r"\{[^}]*\}\s*$", "", t).replace("`", "").replace("*", "")
    t = re.sub(r"[^\w\s.-]", "", t.strip().lower())
    t = re.sub(r"\s+", "-", t)
    return re.sub(r"^[^a-z]+", "", t) or "section"


def _anchors(nb) -> set:
    out = set()
    for c in nb.cells:
        for l in c.source.splitlines():
            if c.cell_type == "markdown" and (m := re.match(r"#+\s+(.*)", l)):
                out.add(_slug(m.group(1)))
                out |= set(re.findall(r"\{#([\w.-]+)", m.group(1)))
            out |= set(re.findall(r"""(?:id|name)=["']([^"']+)["']""", l))
    return out


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<a\s[^>]*href=[\"']([^\"']+)[\"']")


def broken_links(pages: dict) -> list:
    """Relative links in markdown cells (`[text](target)`, `<a href>`) whose page, file or anchor does not exist.
    `pages` maps a notebook's path under nbs/ to the notebook; external (`scheme:`) links are not followed."""
    html = {_page_html(r): r for r in pages}
    bad = []
    for rel, nb in pages.items():
        here = Path(rel).parent
        for c in nb.cells:
            if c.cell_type != "markdown": continue
            text = re.sub(r"```.*?```|`[^`]*`", "", c.source, flags=re.S)        # code is not a link
            for m in _LINK.finditer(text):
                target = m.group(1) or m.group(2)
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I): continue
                path, _, anchor = target.partition("#")
                if not path: dest = rel
                else:
                    p = os.path.normpath((here / path).as_posix())
                    if p.endswith(".html"): dest = html.get(p) or (p[:-5] + ".ipynb" if p[:-5] + ".ipynb" in pages else None)
                    elif p.endswith(".ipynb"): dest = p if p in pages else None
                    else:
                        if not (NBS / p).exists(): bad.append(f"{rel}: {target} (no such file)")
                        continue
                    if dest is None: bad.append(f"{rel}: {target} (no such page)"); continue
                if anchor and anchor not in _anchors(pages[dest]) | _symbols(dest):
                    bad.append(f"{rel}: {target} (no such anchor in {dest})")
    return bad


def _symbols(rel) -> set:
    "show_doc anchors of a page: the `#name` parts of nbdev's doc links (niwt_nb/_modidx.py)."
    import importlib
    d = importlib.import_module("niwt_nb._modidx").d
    page = _page_html(rel)
    return {link.partition("#")[2] for mod in d["syms"].values() for link, _ in mod.values() if link.partition("#")[0] == page}


def test_links_between_pages_resolve():
    pages = {rel: _read(rel) for rel in _notebooks()}
    assert broken_links(pages) == []


def test_doc_links_point_at_pages_that_exist():
    "nbdev turns `name` in backticks into a link to the page that exports it: that page must be on the site."
    import importlib
    d = importlib.import_module("niwt_nb._modidx").d
    site = {_page_html(r) for r in _notebooks()}
    pages = {link.partition("#")[0] for mod in d["syms"].values() for link, _ in mod.values()}
    assert sorted(pages - site) == []


def test_docs_build_runs_only_what_the_reference_needs():
    "settings.ini makes nbdev_docs import tools/nbdev_procs.py, which keeps the docs build off test and slow code."
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    try: import nbdev_procs
    finally: sys.path.remove(str(ROOT / "tools"))
    assert CFG["DEFAULT"]["procs"].split(":")[0] == "nbdev_procs" and "exec_show_docs" not in CFG["DEFAULT"].get("skip_procs", "")
    from execnb.nbio import dict2nb
    nb = dict2nb({"cells": [{"cell_type": "code", "source": s, "metadata": {}, "outputs": []} for s in (
        "#| export\ndef f(): pass", "show_doc(f)", "import os\nx = undefined_name", "#| slow\nimport torch", "y = 1")],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    from nbdev.process import NBProcessor
    cells = NBProcessor(nb=nb).nb.cells
    assert [nbdev_procs.docs_source(c) for c in cells] == [("def f(): pass", True), ("show_doc(f)", True),
                                                            ("import os", False), (None, False), (None, False)]
    import nbdev.processors as P
    assert P.exec_show_docs.__call__ is nbdev_procs._call


def test_link_check_catches_broken_links():
    import nbformat
    mk = lambda *md: nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(m) for m in md])
    pages = {"08_evaluate.ipynb": mk("# Evaluate", "## Calibrated stacking"),
             "tutorials/t.ipynb": mk("# T", "[ok](../evaluate.html#calibrated-stacking) [ok2](../08_evaluate.ipynb) "
                                     "[ext](https://x.org/y.html) `[code](nope.html)` [self](#t)",
                                     "[bad](../nope.html) [bad2](../evaluate.html#nope) <a href='gone.ipynb'>x</a>")}
    bad = broken_links(pages)
    assert len(bad) == 3 and all(b.startswith("tutorials/t.ipynb") for b in bad), bad
    assert _slug("The `alpha2w` step: **fit**") == "the-alpha2w-step-fit" and _page_html("02a_xlsa17.ipynb") == "xlsa17.html"


def test_published_explanation_page_carries_its_widget_state():
    "The committed page has saved state for every widget view it shows: that is what Quarto renders."
    nb = _read("explanation.ipynb")
    _check_widgets(nb, min_images=2)
    before = json.dumps(nb.metadata["widgets"], sort_keys=True)
    assert json.dumps(_clean(copy.deepcopy(nb)).metadata["widgets"], sort_keys=True) == before   # nbdev_clean keeps it


def _check_widgets(nb, min_images: int):
    state = nb.metadata.get("widgets", {}).get(STATE, {}).get("state")
    assert state, "no widget state in the notebook metadata"
    views = [o["data"][VIEW]["model_id"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if VIEW in o.get("data", {})]
    assert views, "no widget is displayed"
    assert all(v in state for v in views), "a displayed widget has no saved state"
    pngs = [b for m in state.values() if m["model_name"] == "ImageModel" for b in m.get("buffers", [])]
    assert len(pngs) >= min_images and all(len(b["data"]) > 1000 for b in pngs)
    html = _html(nb)
    assert STATE in html and all(v in html for v in views)
    return state


# -- executing the pages with widgets, as the docs are regenerated --------------------------------------------------
def _runnable(nb):
    "Drop the code cells the test suite skips (`run_nbs.is_skipped`: tst_flags, `eval: false`, `nbdev_export()` calls)."
    flags = run_nbs.skip_flags()
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or not run_nbs.is_skipped(c, flags)]
    return nb


@pytest.mark.parametrize("rel", EXECUTED)
def test_page_executes_in_a_kernel_and_keeps_widget_state_through_nbdev_clean(rel, monkeypatch):
    from nbclient import NotebookClient
    monkeypatch.delenv("NIWT_EXPLORER_RUN", raising=False)                     # the explanation page makes its small run
    nb = _runnable(_read(rel))
    nb.metadata.pop("widgets", None)
    for c in nb.cells:
        if c.cell_type == "code": c.outputs = []
    NotebookClient(nb, timeout=300, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str((NBS / rel).parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    if rel == "index.ipynb":
        assert _title(nb) in _html(nb); return
    state = _check_widgets(_clean(nb), min_images=2)                          # what `make export` leaves in the file
    assert any(m["model_name"] == "DropdownModel" and "niwt-class-select" in m["state"].get("_dom_classes", []) for m in state.values())
