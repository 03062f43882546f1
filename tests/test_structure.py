"The house is one-way: no import cycles between niwt_nb's modules, and the data layer never imports the method or the pipeline."
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "niwt_nb"
MODULES = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}
DATA_LAYER = {"core", "data", "shapes", "xlsa17", "cub", "awa2"}
ABOVE_DATA = {"models", "importance", "engine", "dom2alpha", "alpha2w", "evaluate", "explain", "report", "pipeline", "presets",
              "diagnose", "cli", "distributed", "widgets"}


def imports(path: Path, modules: set) -> set:
    "Modules of `modules` that the file imports anywhere (top level or inside functions: a lazy import is still a dependency)."
    out = set()
    for n in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(n, ast.ImportFrom):
            name = n.module or ""
            if n.level == 1: out.add(name.split(".")[0])
            elif name.startswith("niwt_nb."): out.add(name.split(".")[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("niwt_nb.")}
    return out & modules


def cycles(graph: dict) -> list:
    "Every back edge of a depth-first walk of `graph` (module -> imported modules), as the cycle it closes."
    state, found = {}, []
    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open": found.append(path[path.index(d):] + [d])
            elif d not in state: visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state: visit(m, [m])
    return found


def test_no_import_cycles():
    assert cycles({m: imports(PKG / f"{m}.py", MODULES) for m in MODULES}) == []


def test_data_layer_imports_neither_method_nor_pipeline():
    bad = {m: sorted(imports(PKG / f"{m}.py", MODULES) & ABOVE_DATA) for m in DATA_LAYER}
    assert {m: v for m, v in bad.items() if v} == {}, "the data layer must not depend on the layers above it"


def test_the_checks_catch_a_lazy_import_back(tmp_path):
    "What the two tests guard against: a data module importing the pipeline inside a function, and the cycle it makes."
    files = {"pipeline": "from .cub import load_cub\n", "cub": "def cub_from_config(cfg):\n    from niwt_nb.pipeline import RunConfig\n",
             "presets": "import niwt_nb.pipeline\n"}
    for name, body in files.items(): (tmp_path / f"{name}.py").write_text(body)
    g = {m: imports(tmp_path / f"{m}.py", set(files)) for m in files}
    assert g == {"pipeline": {"cub"}, "cub": {"pipeline"}, "presets": {"pipeline"}}
    assert cycles(g) == [["cub", "pipeline", "cub"]]


def private_imports(path: Path, modules: set) -> list:
    "`(module, name)` of every private name (leading underscore) the file imports from another module of `modules`."
    out = []
    for n in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(n, ast.ImportFrom):
            name = n.module or ""
            mod = name.split(".")[0] if n.level == 1 else (name.split(".")[1] if name.startswith("niwt_nb.") else None)
            if mod in modules and mod != Path(path).stem:
                out += [(mod, a.name) for a in n.names if a.name.startswith("_")]
    return out


def test_no_private_names_imported_across_modules():
    "A module's `_names` are its own: what another module needs is public, documented and tested where it lives."
    bad = {m: private_imports(PKG / f"{m}.py", MODULES) for m in sorted(MODULES)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_private_check_catches_lazy_and_relative_imports(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x, _y\ndef f():\n    from niwt_nb.c import _z\n    from niwt_nb.a import _own\n")
    assert private_imports(tmp_path / "a.py", {"a", "b", "c"}) == [("b", "_y"), ("c", "_z")]


def test_models_build_themselves():
    "Each model config builds its own model (`cfg.build(n_seen)`): no dispatch on class names anywhere in the package."
    hits = [(p.name, i + 1) for p in sorted(PKG.glob("*.py")) for i, line in enumerate(p.read_text().splitlines())
            if "__name__ ==" in line and "__main__" not in line]
    assert hits == [], hits
