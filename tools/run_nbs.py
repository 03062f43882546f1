"""Execute the notebooks in place and save their outputs (`make outputs`), and compare saved outputs with fresh ones.

    python tools/run_nbs.py                          # every notebook in nbs/ (outside _ and . folders)
    python tools/run_nbs.py nbs/08_evaluate.ipynb    # a subset (make outputs NBS="nbs/08_evaluate.ipynb")
    python tools/run_nbs.py --flags slow nbs/09_explain.ipynb   # also run the `#| slow` cells (make outputs FLAGS=slow)
    python tools/run_nbs.py --check nbs/10_report.ipynb         # execute, compare with the saved outputs, write nothing

Every notebook is executed in its own process, in the environment `nbdev_test` / tests/test_notebooks.py use
(`IN_TEST=1`, `NIWT_QUIET=1`, one thread, a fresh temporary NIWT_CACHE / NIWT_DATA, working directory = the
notebook's folder, the repository first on sys.path), seeded (`SETUP`), with matplotlib's inline backend drawing
small PNGs (`RC`: 72 dpi). Cells skipped by the test suite (settings.ini `tst_flags`, `#| eval: false`, the
`nbdev_export()` cell) are not executed and keep whatever outputs they have: the saved outputs of the executed
cells are exactly what the test suite reproduces, so tests/test_notebooks.py can check them (`compare`).
Saved outputs are tidied (`tidy`): no stderr (warnings, tqdm bars), no `\\r` progress lines, no execution counts,
one stdout stream per cell, large PNGs re-encoded with a 256-colour palette (`shrink_png`). Pages that show widgets (`uses_widgets`) are executed in a real Jupyter kernel
(nbclient) so that the widget state is saved in the notebook metadata, which Quarto needs to draw them. At the
end `nbdev_clean` normalises the files (settings.ini `clear_all = False`: it keeps outputs, images included).
"""
from __future__ import annotations
import argparse, copy, json, math, os, re, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

# -- the fixed environment -------------------------------------------------------------------------------------
ENV = {"IN_TEST": "1", "NIWT_QUIET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "MPLBACKEND": "Agg", "TQDM_DISABLE": "1", "COLUMNS": "80"}
RC = {"figure.dpi": 72, "savefig.dpi": 72, "figure.figsize": (6.0, 4.0), "font.size": 9}
SETUP = f"""\
import random as _r, numpy as _np, torch as _t, matplotlib as _mpl
_r.seed(0); _np.random.seed(0); _t.manual_seed(0); _t.set_num_threads(1)
_mpl.rcParams.update({RC!r})
del _r, _np, _t, _mpl
"""
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def settings() -> dict:
    import configparser
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    return dict(cfg["DEFAULT"])


def skip_flags(run_flags=()) -> set[str]:
    "The flags whose cells are not executed: settings.ini `tst_flags` minus the ones asked for (`--flags slow`)."
    return set(settings().get("tst_flags", "").split()) - set(run_flags)


def notebooks() -> list[Path]:
    return sorted(p for p in NBS.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


def read(path) -> dict:
    return json.loads(Path(path).read_text())


def src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def directives(cell) -> dict:
    from nbdev.process import extract_directives
    from fastcore.basics import AttrDict
    return extract_directives(AttrDict(cell_type="code", source=src(cell)), remove=False)


def is_skipped(cell, flags) -> bool:
    "True for a code cell the test suite does not run (like nbdev.test.test_nb)."
    if cell["cell_type"] != "code": return True
    if "nbdev_export" + "(" in src(cell): return True
    d = directives(cell)
    if d.get("eval:", [""])[0].lower() == "false": return True
    return bool(set(flags) & d.keys())


def uses_widgets(nb) -> bool:
    "A page that shows ipywidgets: it carries saved widget state, or builds widgets."
    if "widgets" in nb.get("metadata", {}): return True
    return any(c["cell_type"] == "code" and re.search(r"\bNIWTExplorer\(|\bipywidgets\b", src(c)) for c in nb["cells"])


# -- executing ---------------------------------------------------------------------------------------------------
class NotebookError(Exception): pass


def _env_setup(nb_path, tmp):
    os.environ.update(ENV)
    os.environ["NIWT_CACHE"] = str(Path(tmp) / "cache"); os.environ["NIWT_DATA"] = str(Path(tmp) / "data")
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def execute(path, flags=None, kernel: bool = False) -> tuple[dict, list[int]]:
    """Execute the notebook at `path` in this process (execnb) or in a Jupyter kernel (`kernel`); return the notebook
    with fresh outputs on the executed cells, and the indices of those cells. Raises `NotebookError` with the
    traceback when a cell fails. The caller sets the environment (`ENV`) and working directory."""
    path = Path(path).resolve()
    flags = skip_flags() if flags is None else set(flags)
    nb = read(path)
    run = [i for i, c in enumerate(nb["cells"]) if not is_skipped(c, flags)]
    if kernel: return _execute_kernel(path, nb, run), run
    from execnb.shell import CaptureShell
    from fastcore.basics import AttrDict
    sh = CaptureShell(path, mpl_format="png")
    sh.run(SETUP)
    if sh.exc: raise NotebookError(f"{path.name}: setup failed: {sh.exc!r}")
    for i in run:
        cell = nb["cells"][i]
        sh._cell_idx = i + 1
        outs = sh.run(src(cell))
        if sh.exc:
            raise NotebookError(sh.prettytb(fname=path))
        cell["outputs"] = json.loads(json.dumps(outs, default=str))
    nb.setdefault("metadata", {}).pop("widgets", None)
    return nb, run


def _execute_kernel(path, nb, run):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    sub = nbformat.from_dict({"cells": [{"cell_type": "code", "source": f"%matplotlib inline\nimport sys; sys.path.insert(0, {str(ROOT)!r})\n" + SETUP, "metadata": {},
                                         "outputs": [], "execution_count": None, "id": "niwt-setup"}]
                              + [dict(copy.deepcopy(nb["cells"][i]), outputs=[], source=src(nb["cells"][i])) for i in run],
                              "metadata": copy.deepcopy(nb.get("metadata", {})), "nbformat": 4, "nbformat_minor": 5})
    sub.metadata.pop("widgets", None)
    client = NotebookClient(sub, timeout=900, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    try: client.execute()
    except CellExecutionError as e: raise NotebookError(f"{path.name}:\n{e}") from None
    for i, c in zip(run, sub.cells[1:]): nb["cells"][i]["outputs"] = json.loads(json.dumps(c.outputs))
    if "widgets" in sub.metadata: nb["metadata"]["widgets"] = json.loads(json.dumps(sub.metadata["widgets"]))
    else: nb["metadata"].pop("widgets", None)
    return nb


# -- tidying what is saved ------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR = re.compile(r"\d+%\|.*\|")                                              # a tqdm bar that was printed to stdout


def tidy_text(text: str) -> str:
    "Stdout as saved: no ANSI colours, no progress lines (lines rewritten with `\\r`, tqdm bars)."
    text = _ANSI.sub("", text)
    return "".join(l for l in text.splitlines(True) if "\r" not in l.rstrip("\n") and not _BAR.search(l))


def shrink_png(b64: str, min_bytes: int = 20_000) -> str:
    "A large PNG re-encoded with a 256-colour palette over white (plots lose nothing visible; 2-3x smaller)."
    import base64, io
    from PIL import Image
    raw = base64.b64decode(b64)
    if len(raw) < min_bytes: return b64
    im = Image.open(io.BytesIO(raw)).convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255)); bg.alpha_composite(im)
    q = bg.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    f = io.BytesIO(); q.save(f, "PNG", optimize=True)
    return base64.b64encode(f.getvalue()).decode() + "\n" if f.tell() < len(raw) else b64


def tidy(outputs: list) -> list:
    "Outputs as saved: stderr dropped, stdout merged into one tidied stream first, no execution counts."
    out, stdout = [], ""
    for o in outputs:
        o = copy.deepcopy(o)
        if o["output_type"] == "stream":
            if o.get("name") == "stdout":
                t = o["text"]; stdout += "".join(t) if isinstance(t, list) else t
            continue
        if o["output_type"] == "execute_result": o["execution_count"] = None
        if "image/png" in o.get("data", {}):
            png = o["data"]["image/png"]; o["data"]["image/png"] = shrink_png("".join(png) if isinstance(png, list) else png)
        o.get("metadata", {}).pop("transient", None); o.pop("transient", None)
        out.append(o)
    stdout = tidy_text(stdout)
    if stdout: out.insert(0, {"name": "stdout", "output_type": "stream", "text": stdout.splitlines(True)})
    return out


# -- comparing saved with fresh outputs ----------------------------------------------------------------------------
RTOL, ATOL = 2e-2, 2e-2
_VOLATILE = [
    (re.compile(r"0x[0-9a-fA-F]{4,}"), "0x…"),                                               # addresses
    (re.compile(r"(?:/private)?(?:/tmp|/var/tmp|/var/folders)/[^\s'\",)\]>]*"), "<tmp>"),  # temporary folders
    (re.compile(r"\d\d:\d\d:\d\d(?:\.\d+)?"), "<clock>"),                                  # clock times
    (re.compile(r"\d{4}-\d\d-\d\d[T ]"), "<date> "),
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?\s*(?:ms|µs|us|ns|s|sec|secs|seconds|min|mins|h|it/s|s/it)\b"), "<time>"),
    (re.compile(r"<[^<>]*\bat\s*>"), "<obj>"),                                             # nbdev_clean drops ` at 0x..`
]
_NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    "Text with what changes from run to run replaced (addresses, temporary paths, clock and durations), spaces collapsed."
    text = tidy_text(text).replace(str(ROOT), "<root>")
    for rx, rep in _VOLATILE: text = rx.sub(rep, text)
    text = re.sub(r" at 0x…", "", text)
    return " ".join(text.split())


def close_text(a: str, b: str, rtol=RTOL, atol=ATOL) -> bool:
    "Normalised texts equal, numbers compared within `rtol` or `atol` (each number on its own)."
    a, b = normalise(a), normalise(b)
    if a == b: return True
    if _NUM.split(a) != _NUM.split(b): return False
    for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
        x, y = float(x), float(y)
        if not (abs(x - y) <= atol or abs(x - y) <= rtol * max(abs(x), abs(y)) or (math.isnan(x) and math.isnan(y))):
            return False
    return True


def _text(data) -> str:
    def j(v): return "".join(v) if isinstance(v, list) else str(v)
    if "text/plain" in data: return j(data["text/plain"])
    for k in ("text/markdown", "text/latex", "text/html"):
        if k in data: return re.sub(r"<[^>]+>", " ", j(data[k]))
    return ""


def summary(outputs) -> dict:
    "What `compare` looks at in a cell's outputs: stdout, rich texts in order, image and widget counts, errors."
    s = {"stdout": "", "texts": [], "images": 0, "widgets": 0, "errors": []}
    for o in outputs or []:
        t = o["output_type"]
        if t == "stream":
            if o.get("name") == "stdout": s["stdout"] += "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
        elif t == "error": s["errors"].append(o.get("ename", "error"))
        else:
            d = o.get("data", {})
            if any(k.startswith("image/") for k in d): s["images"] += 1
            elif WIDGET_VIEW in d: s["widgets"] += 1
            else: s["texts"].append(_text(d))
    s["stdout"] = tidy_text(s["stdout"])
    return s


def _short(t, n=160):
    t = " ".join(t.split()); return t if len(t) <= n else t[:n] + "…"


def compare(saved: dict, fresh: dict, run: list[int], name: str = "notebook") -> list[str]:
    """Where the saved outputs of the executed cells `run` differ from the fresh ones: one line per stale cell,
    naming the cell (index and first source line). Empty when up to date."""
    problems = []
    for i in run:
        sc, fc = saved["cells"][i], fresh["cells"][i]
        a, b = summary(sc.get("outputs")), summary(fc.get("outputs"))
        head = next((l for l in src(sc).splitlines() if l.strip() and not l.startswith("#|")), "")[:60]
        where = f"{name} cell {i} ({head!r})"
        has_a = bool(a["stdout"].strip() or a["texts"] or a["images"] or a["widgets"])
        has_b = bool(b["stdout"].strip() or b["texts"] or b["images"] or b["widgets"])
        if has_b and not has_a: problems.append(f"{where}: no saved output; fresh execution prints/draws something"); continue
        if has_a and not has_b: problems.append(f"{where}: saved output, but the cell now produces none"); continue
        if a["errors"]: problems.append(f"{where}: saved error output {a['errors']}")
        if not close_text(a["stdout"], b["stdout"]):
            problems.append(f"{where}: printed output changed:\n    saved: {_short(a['stdout'])}\n    fresh: {_short(b['stdout'])}")
        if a["images"] != b["images"]:
            problems.append(f"{where}: {a['images']} saved image(s), fresh execution draws {b['images']}")
        if a["widgets"] != b["widgets"]:
            problems.append(f"{where}: {a['widgets']} saved widget view(s), fresh execution shows {b['widgets']}")
        if len(a["texts"]) != len(b["texts"]) or not all(close_text(x, y) for x, y in zip(a["texts"], b["texts"])):
            problems.append(f"{where}: displayed result changed:\n    saved: {_short(' | '.join(a['texts']))}\n"
                            f"    fresh: {_short(' | '.join(b['texts']))}")
    return problems


# -- writing ------------------------------------------------------------------------------------------------------
def merge(saved: dict, fresh: dict, run: list[int]) -> dict:
    "The saved notebook with the tidied fresh outputs on the executed cells (other cells keep theirs)."
    nb = copy.deepcopy(saved)
    for i in run:
        nb["cells"][i]["outputs"] = tidy(fresh["cells"][i].get("outputs", []))
        nb["cells"][i]["execution_count"] = None
    if "widgets" in fresh.get("metadata", {}): nb["metadata"]["widgets"] = fresh["metadata"]["widgets"]
    return nb


def clean(path):
    "nbdev_clean on one notebook, with this repository's settings."
    from nbdev.clean import nbdev_clean
    cwd = os.getcwd(); os.chdir(ROOT)
    try: nbdev_clean(fname=str(path))
    finally: os.chdir(cwd)


def _rel(path) -> str:
    try: return Path(path).relative_to(ROOT).as_posix()
    except ValueError: return str(path)


def run_one(path, flags=(), check=False) -> int:
    "Execute one notebook (in this process) and save or check its outputs; the exit status."
    path = Path(path).resolve()
    saved = read(path)
    kernel = uses_widgets(saved)
    with tempfile.TemporaryDirectory(prefix="niwt_nbrun_") as tmp:
        _env_setup(path, tmp)
        os.chdir(path.parent)
        try: fresh, run = execute(path, skip_flags(flags), kernel=kernel)
        except NotebookError as e:
            print(e, file=sys.stderr); return 1
    if check:
        probs = compare(saved, fresh, run, _rel(path))
        print("\n".join(probs) or f"{path.name}: saved outputs up to date")
        return 1 if probs else 0
    path.write_text(json.dumps(merge(saved, fresh, run), indent=1, ensure_ascii=False) + "\n")
    clean(path)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("nbs", nargs="*", help="notebooks (default: all of nbs/)")
    p.add_argument("--flags", default="", help="test flags whose cells to run anyway, e.g. 'slow'")
    p.add_argument("--check", action="store_true", help="compare with the saved outputs, write nothing")
    p.add_argument("--jobs", "-j", type=int, default=1, help="notebooks executed at once")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    flags = a.flags.split()
    if a.one: return run_one(a.nbs[0], flags, a.check)
    paths = [Path(n).resolve() for n in a.nbs] or notebooks()
    missing = [str(n) for n in paths if not n.is_file()]
    if missing: p.error(f"no such notebook: {missing}")
    from concurrent.futures import ThreadPoolExecutor
    def one(path):
        t0, size0 = time.time(), path.stat().st_size
        cmd = [sys.executable, __file__, "--one", str(path), "--flags", a.flags] + (["--check"] * a.check)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        return path, r, time.time() - t0, size0
    failed, t_all = [], time.time()
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        for path, r, secs, size0 in ex.map(one, paths):
            rel = _rel(path)
            size = path.stat().st_size
            status = "ok" if r.returncode == 0 else "FAILED"
            print(f"{status:6s} {rel:40s} {secs:6.1f} s  {size0/1e3:7.1f} kB -> {size/1e3:7.1f} kB", flush=True)
            if a.check and r.stdout.strip(): print("       " + r.stdout.strip().replace("\n", "\n       "))
            if r.returncode: failed.append(rel); print(r.stderr[-6000:], file=sys.stderr)
    print(f"{len(paths) - len(failed)}/{len(paths)} notebooks in {time.time() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
