"""What `nbdev_docs` executes while it prepares the pages (settings.ini: `procs = nbdev_procs:docs_run_only_docs`).

nbdev's `exec_show_docs` processor re-runs, in a fresh shell, every exported cell, every show_doc cell and every
cell that contains an import, whole. The chapters' example cells mix imports with code that uses names from cells it
does not run, and some of them are `#| slow` / `#| cuda`: run that way, the docs build stops with NameErrors (or
starts a GPU job). Importing this module (nbdev does, through the settings.ini `procs` key, before it processes a
notebook) makes `exec_show_docs` run what the API reference needs and nothing else:
- exported cells and show_doc cells, as nbdev does (their outputs are the rendered signatures);
- of the other cells, only their top-level import statements (their saved outputs, from `make outputs`, stay);
- nothing from cells marked with settings.ini `tst_flags` or `#| eval: false`.
`nbdev_docs` needs this folder on the Python path (the deploy workflow sets PYTHONPATH=tools)."""
import ast, configparser
from pathlib import Path
import nbdev.processors as P

_CFG = configparser.ConfigParser(); _CFG.read(Path(__file__).resolve().parents[1] / "settings.ini")
SKIP = set(_CFG["DEFAULT"].get("tst_flags", "").split())
_SHOW = {"export", "exports", "exporti", "exec_doc"}


def docs_source(cell):
    "The code `nbdev_docs` runs for `cell`: `(source, keep_outputs)`; `(None, _)` for nothing."
    if P.cell_lang(cell) != "python" or cell.cell_type != "code" or not cell.source: return None, False
    if "nbdev_export" + "()" in cell.source: return None, False
    d = getattr(cell, "directives_", None) or {}
    if d.get("eval:", [""])[0].lower() == "false" or d.keys() & SKIP: return None, False
    trees = cell.parsed_()
    if not trees: return None, False
    if d.keys() & _SHOW or P._show_docs(trees): return cell.source, True
    imports = [ast.unparse(n) for n in trees if isinstance(n, (ast.Import, ast.ImportFrom))]      # parsed_(): top-level statements
    return ("\n".join(imports) or None), False


def _call(self, cell):
    if not self.nb.has_docs_ or not hasattr(self, "k"): return
    fm = getattr(self.nb, "frontmatter_", {})
    if P.str2bool(fm.get("skip_showdoc", False)): return
    code, keep = docs_source(cell)
    if code is None: return
    if keep: self.k.cell(cell)
    else: self.k.run(code)
    if self.k.exc:
        title = fm.get("title", "")
        raise Exception(f"Error{' in notebook: ' + title if title else ''} in cell {cell.idx_} :\n{code}") from self.k.exc


P.exec_show_docs.__call__ = _call


def docs_run_only_docs(cell):
    "The processor settings.ini names (it does nothing itself: importing this module is what counts)."
