"The docs site documents every public function in nbdev's own style: a docstring, and a comment on every parameter (docments)."
import importlib, inspect
from pathlib import Path
import pytest
from fastcore.docments import docments
from fastcore.script import Param

PKG = Path(__file__).resolve().parents[1] / "niwt_nb"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))


def undocumented(obj) -> list:
    "Parameters of `obj` (a function, or a class: its `__init__`/dataclass fields) without a docments comment or a `Param` help."
    if getattr(obj, "_is_protocol", False): return []                     # a typing.Protocol: its signature is synthetic
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return []
    d = docments(obj, full=True, args_kwargs=True)
    def ok(p):
        e = d.get(p)
        return e is not None and (bool(e.docment) or (isinstance(e.anno, Param) and bool(e.anno.help)))
    return [p for p in sig.parameters if p not in ("self", "cls") and not ok(p)]


def public_callables(mod):
    "`(name, obj)` of the callables a module exports in `__all__` and defines itself."
    return [(n, o) for n in getattr(mod, "__all__", []) if callable(o := getattr(mod, n))
            and getattr(o, "__module__", mod.__name__) == mod.__name__]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_callable_has_a_docstring_and_documented_parameters(name):
    mod = importlib.import_module(f"niwt_nb.{name}")
    no_doc = [n for n, o in public_callables(mod) if not (o.__doc__ or "").strip()]
    missing = {n: u for n, o in public_callables(mod) if (u := undocumented(o))}
    assert not no_doc and not missing, f"niwt_nb.{name}: no docstring {no_doc}; parameters without a docments comment {missing}"


def test_the_check_sees_a_missing_comment():
    def good(a:int, # the count
             **kw, # passed on
            ): "Documented."
    def bad(a:int, b=2): "Only a docstring."
    assert undocumented(good) == [] and undocumented(bad) == ["a", "b"]
