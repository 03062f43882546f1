"""The experiments behind the README's results, one command each (they write JSON and a markdown table to
experiments/results/ and print the table):

    python experiments/run.py shapes            # Shapes, default configuration, seeds 0 1 2
    python experiments/run.py cub               # CUB 001-025, EfficientNet-Lite0 (ImageNet), attributes + sent, seeds 0 1 2
    python experiments/run.py cub_captions      # CUB 001-010 (where captions exist), MiniLM captions vs attributes vs sent
    python experiments/run.py feeds             # what alpha2w is fed (seen / noise / another source), validation classes only
    python experiments/run.py ladder            # the diagnosis ladder (niwt_nb.diagnose) on Shapes and CUB, seed 0
    python experiments/run.py layers            # EfficientNet-Lite0 importance-layer candidates, validation classes only

CUB needs ../shared/data/cub (or --cub-root). Every setting is chosen on validation classes; test numbers are only
reported. Stages are cached under --cache (default experiments/cache), so a second run of a table is fast.
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(_k, "2")
os.environ.setdefault("NIWT_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _cfg(**kw):
    from niwt_nb.pipeline import RunConfig
    return RunConfig(**kw)


def _lite(**kw):
    from niwt_nb.models import ModelConfig
    return dict(model=ModelConfig(backbone="efficientnet_lite0", weights="imagenet", **kw))


def _table(metrics: dict, keys=("u", "s", "H", "zsl_top1", "u_cal", "s_cal", "H_cal")) -> str:
    from niwt_nb.report import metrics_table
    return metrics_table(metrics, keys)


def _save(name: str, obj: dict, md: str):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(obj, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(md)


def _run(cfg, seeds, store, out=None):
    from niwt_nb.pipeline import run_niwt
    t0 = time.time()
    m = run_niwt(cfg, out=out, seeds=seeds, store=store, log=lambda *a: None, report=out is not None)
    m.pop("_runs", None)
    m["wall_s"] = round(time.time() - t0, 1)
    return m


def shapes(a, store):
    m = _run(_cfg(), [0, 1, 2], store, out=a.out / "shapes" if a.out else None)
    md = "## Shapes (default configuration, seeds 0 1 2)\n\n" + _table(m) + f"\n\nselected: {json.dumps(m['selected'])}"
    _save("shapes", m, md)


def cub(a, store):
    cfg = _cfg(dataset="cub", root=str(a.cub_root), present_only=True, semantic="attributes,sent", **_lite())
    m = _run(cfg, [0, 1, 2], store, out=a.out / "cub" if a.out else None)
    from niwt_nb.report import semantics_table
    md = ("## CUB 001-025 (22 seen / 3 unseen), EfficientNet-Lite0 ImageNet, seeds 0 1 2\n\n### attributes\n\n" + _table(m)
          + "\n\n### attributes vs sent\n\n" + semantics_table(m, ("u", "s", "H", "zsl_top1", "H_cal")))
    _save("cub", m, md)


def cub_captions(a, store):
    cfg = _cfg(dataset="cub", root=str(a.cub_root), present_only=True, classes="1-10", semantic="captions,attributes,sent",
               encoder="minilm", **_lite())
    m = _run(cfg, [0, 1, 2], store)
    from niwt_nb.report import semantics_table
    md = ("## CUB 001-010 (9 seen / 1 unseen: captions exist there), EfficientNet-Lite0, seeds 0 1 2\n\n"
          + semantics_table(m, ("u", "s", "H", "H_cal")))
    _save("cub_captions", m, md)


def _feed_folder(kind: str, size: int, n: int = 256) -> Path:
    "A folder of images from another source: Shapes renderings (for CUB) or CUB photos (for Shapes)."
    from PIL import Image
    d = ROOT / "experiments" / "cache" / f"feed_{kind}_{size}"
    if d.is_dir() and len(list(d.glob("*.png"))) >= n: return d
    d.mkdir(parents=True, exist_ok=True)
    if kind == "shapes":
        from niwt_nb.shapes import ShapesConfig, make_shapes
        s = make_shapes(ShapesConfig(size=size, n_per_class=6, seed=7), cache=False)
        for i in range(n): Image.fromarray(s.images[i].permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return d


def feeds(a, store):
    from niwt_nb.alpha2w import Alpha2WConfig
    rows = []
    shapes_other = a.cub_root / "CUB_200_2011" / "images"                          # another source for Shapes: bird photos
    for name, base in (("shapes", _cfg()),
                       ("cub", _cfg(dataset="cub", root=str(a.cub_root), present_only=True, **_lite()))):
        other = shapes_other if name == "shapes" else _feed_folder("shapes", 224)
        for feed, extra in (("seen", {}), ("noise", {}), ("other", {"feed_dir": str(other)})):
            cfg = base.replace(alpha2w=base.alpha2w.replace(feed=feed), **extra)
            m = _run(cfg, [0], store)
            sel = m["selected"]["0"][cfg.semantics[0]]["niwt"]
            rows.append({"data": name, "feed": feed, "val_zsl": sel["val_zsl"], **{k: m["methods"]["niwt"][k] for k in ("zsl_top1", "H", "H_cal")}})
    md = ("## What alpha2w is fed (seed 0; chosen on validation ZSL, test shown for reference)\n\n| data | feed | val ZSL | test ZSL | H | H cal |\n|---|---|---|---|---|---|\n"
          + "\n".join(f"| {r['data']} | {r['feed']} | {r['val_zsl']:.3f} | {r['zsl_top1']:.3f} | {r['H']:.3f} | {r['H_cal']:.3f} |" for r in rows))
    _save("feeds", {"rows": rows}, md)


def ladder(a, store):
    from niwt_nb.pipeline import run_niwt
    from niwt_nb.diagnose import diagnose
    out = {}
    for name, cfg in (("shapes", _cfg()), ("cub", _cfg(dataset="cub", root=str(a.cub_root), present_only=True, **_lite()))):
        run = run_niwt(cfg, store=store, log=lambda *a: None, report=False)["_runs"][0]
        out[name] = diagnose(run)
    rungs = ["niwt", "oracle_probe", "oracle", "pooling", "dom2w", "dom2w_via_alpha2w"]
    md = "## Diagnosis ladder (seed 0, attributes): ZSL top-1 / H\n\n| rung | " + " | ".join(out) + " |\n|---|" + "---|" * len(out) + "\n"
    md += "\n".join(f"| {r} | " + " | ".join(f"{out[n][r]['zsl_top1']:.3f} / {out[n][r]['H']:.3f}" for n in out) + " |" for r in rungs)
    md += "\n\n" + "\n".join(f"- {n}: {out[n]['reading']}" for n in out)
    _save("ladder", out, md)


def layers(a, store):
    """Lite0 layer candidates on validation ZSL. Below `_blocks.15` the head holds several MBConv blocks and alpha2w's per-image
    importance matrices (one backward per feature dimension, D = 1280) take minutes per image batch on a CPU: `--n-feed`
    and `--single` (one NIWT setting, no grid) keep the comparison affordable; every layer gets the same protocol."""
    from niwt_nb.models import LAYER_CANDIDATES
    rows = []
    names = a.layers or LAYER_CANDIDATES["efficientnet_lite0"]
    for layer in names:
        extra = ({"n_feed": a.n_feed} if a.n_feed else {}) | ({"niwt_grid": {"alpha2w.lam": [1e-2], "norm_match": [True, False]}} if a.single else {})
        cfg = _cfg(dataset="cub", root=str(a.cub_root), present_only=True, baselines=(), explain=False, **_lite(layer=layer), **extra)
        m = _run(cfg, [0], store)
        sel = m["selected"]["0"]["attributes"]["niwt"]
        rows.append({"layer": layer, "val_zsl": sel["val_zsl"], "seen_val_acc": m["per_seed"][0]["extra"]["seen_val_acc_best"],
                     **{k: m["methods"]["niwt"][k] for k in ("zsl_top1", "H_cal")}, "wall_s": m["wall_s"]})
    proto = f"n_feed {a.n_feed or 'default'}, " + ("one NIWT setting (lam 1e-2, rows rescaled or not chosen on validation)" if a.single else "the NIWT grid")
    md = (f"## EfficientNet-Lite0 importance layer (CUB 001-025, attributes, seed 0; {proto}): chosen on validation ZSL\n\n"
          "| layer | val ZSL (selection) | seen val acc | test ZSL | H cal | wall s |\n|---|---|---|---|---|---|\n"
          + "\n".join(f"| `{r['layer']}` | {r['val_zsl']:.3f} | {r['seen_val_acc']:.3f} | {r['zsl_top1']:.3f} | {r['H_cal']:.3f} | {r['wall_s']} |" for r in rows))
    _save("layers", {"rows": rows}, md)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["shapes", "cub", "cub_captions", "feeds", "ladder", "layers"])
    p.add_argument("--cub-root", type=Path, default=ROOT.parent / "shared" / "data" / "cub")
    p.add_argument("--cache", type=Path, default=ROOT / "experiments" / "cache")
    p.add_argument("--out", type=Path, default=None, help="also write each run's report here")
    p.add_argument("--layers", nargs="*", default=None, help="layers: only these candidates")
    p.add_argument("--n-feed", type=int, default=None, help="layers: images fed to alpha2w (default: the run's default)")
    p.add_argument("--single", action="store_true", help="layers: one NIWT setting instead of the grid")
    a = p.parse_args(argv)
    from niwt_nb.core import ArtifactStore
    if a.what != "shapes" and not (a.cub_root / "CUB_200_2011").is_dir(): sys.exit(f"no CUB at {a.cub_root} (pass --cub-root)")
    globals()[a.what](a, ArtifactStore(a.cache))


if __name__ == "__main__": main()
