"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which these machines lack).

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md is out of date
Markdown cells are copied; code cells become ```python blocks; cells marked `#| hide` are skipped.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    nb = json.loads(Path(nb_path).read_text())
    out = ["<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->"]
    for c in nb["cells"]:
        src = "".join(c["source"]).strip()
        if not src: continue
        if c["cell_type"] == "markdown": out.append(src)
        elif c["cell_type"] == "code":
            lines = src.splitlines()
            if any(l.strip() in ("#| hide", "#|hide") for l in lines): continue
            body = "\n".join(l for l in lines if not l.startswith("#|"))
            lang = "sh" if all(l.startswith("!") for l in body.splitlines()) else "python"
            if lang == "sh": body = "\n".join(l[1:] for l in body.splitlines())
            out.append(f"```{lang}\n{body}\n```")
    return "\n\n".join(out) + "\n"

if __name__ == "__main__":
    text = render()
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of date: run `make readme` (tools/make_readme.py)")
    else:
        readme.write_text(text)
