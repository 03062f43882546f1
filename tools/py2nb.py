"""Authoring aid: turn a `# %%`-delimited script into a notebook (nbs/*.ipynb stays the source of truth).

    python tools/py2nb.py draft.py nbs/05_importance.ipynb

`# %% [markdown]` starts a markdown cell whose lines drop a leading "# "; `# %%` starts a code cell.
Use it to write a new notebook quickly; afterwards edit the .ipynb (Jupyter, or nb2py/py2nb round trip).
`python tools/py2nb.py --back nbs/X.ipynb draft.py` writes the notebook back out as such a script.
"""
import json, sys, re, hashlib
from pathlib import Path

def py2nb(src: str) -> dict:
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        lines = buf[:]
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if kind == "markdown": lines = [re.sub(r"^# ?", "", l) for l in lines]
        text = "\n".join(lines)
        cid = hashlib.sha1(f"{len(cells)}:{text}".encode()).hexdigest()[:8]
        cell = {"cell_type": kind, "id": cid, "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code": cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    for line in src.splitlines():
        if line.startswith("# %%"):
            flush(); buf = []
            kind = "markdown" if "[markdown]" in line else "code"
        else: buf.append(line)
    flush()
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}

def nb2py(nb: dict) -> str:
    out = []
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            out.append("# %% [markdown]\n" + "\n".join("# " + l if l else "#" for l in src.splitlines()))
        else: out.append("# %%\n" + src)
    return "\n\n".join(out) + "\n"

if __name__ == "__main__":
    if sys.argv[1] == "--back":
        Path(sys.argv[3]).write_text(nb2py(json.loads(Path(sys.argv[2]).read_text())))
    else:
        Path(sys.argv[2]).write_text(json.dumps(py2nb(Path(sys.argv[1]).read_text()), indent=1) + "\n")
