"""(d) The main job end to end: run_niwt on Shapes, and how its time grows with the number of images and of classes.

Each configuration runs the whole pipeline (every stage of `run_niwt`: data generation, seen fine-tuning, alphas,
dom2alpha, alpha2w, features, GZSL evaluation, baselines, and whatever later stages the pipeline has) in a fresh store, so nothing comes from a cache. Sizes vary one at a time around
a base of 24 classes x 60 images per class:

- images: n_per_class in (30, 60, 120)  -> 720, 1440, 2880 images
- classes: n_classes in (12, 24, 48) at 60 images per class (n_unseen = n_classes / 4, n_val_classes = n_classes / 8)

The fine-tuning runs a fixed number of epochs (no early stopping) so that its work is proportional to the images;
alpha2w runs to its own stopping rule, as in a real run. Reported per stage: seconds and the log-log slope of time
against the varied size (1 = linear). `--full` adds the default `RunConfig()` (48 classes x 120 images, 12 epochs;
about 3-4 minutes on 2 shared CPU cores).
"""
from __future__ import annotations
import dataclasses, math, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, setup, save, say
import torch

from niwt_nb.core import ArtifactStore
from niwt_nb.shapes import ShapesConfig
from niwt_nb.models import TrainConfig
from niwt_nb.pipeline import RunConfig, run_niwt



def one(cfg: RunConfig) -> dict:
    with tempfile.TemporaryDirectory() as d:
        old = os.environ.get("NIWT_CACHE"); os.environ["NIWT_CACHE"] = d          # Shapes generation is not cached either
        try:
            t0 = time.perf_counter()
            m = run_niwt(cfg, out=None, store=ArtifactStore(Path(d) / "artifacts"), log=lambda *a: None, report=False)
            wall = time.perf_counter() - t0
        finally:
            if old is None: os.environ.pop("NIWT_CACHE", None)
            else: os.environ["NIWT_CACHE"] = old
    t = m["timings_s"]
    n = m["methods"]["niwt"]
    return {"timings_s": dict(t), "wall_s": wall, "H": n["H"], "H_cal": n.get("H_cal"),
            "zsl_top1": n["zsl_top1"], "alpha2w_steps": m["per_seed"][0]["extra"]["alpha2w_steps"]}


def slope(xs, ys) -> float:
    lx, ly = [math.log(v) for v in xs], [math.log(max(v, 1e-6)) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def shapes(n_classes, n_per_class):
    return ShapesConfig(n_classes=n_classes, n_unseen=max(1, n_classes // 4), n_val_classes=max(1, n_classes // 8),
                        n_per_class=n_per_class)


def run(args) -> dict:
    setup(args)
    base = RunConfig(train=TrainConfig(epochs=8, lr=3e-3, bs=128, patience=None), n_feed=128)
    per_class, classes = ((30, 60, 120), (12, 24, 48)) if not args.quick else ((10, 20), (8, 16))
    mid_c, mid_n = (24, 60) if not args.quick else (8, 20)
    if args.quick: base = base.replace(train=base.train.replace(epochs=1), n_feed=16, baselines=("eszsl",))
    one(base.replace(shapes=shapes(8, 10), train=base.train.replace(epochs=1), n_feed=16))   # warm-up (imports, first calls)
    runs = {}
    for n in per_class: runs[(mid_c, n)] = None
    for c in classes: runs[(c, mid_n)] = None
    for c, n in list(runs):
        r = one(base.replace(shapes=shapes(c, n)))
        runs[(c, n)] = r
        say(f"(d) run_niwt  {c:3d} classes x {n:3d} images/class ({c * n:5d} images): {r['wall_s']:6.1f} s   "
            + "  ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items() if k != "total" and v >= 0.05)
            + f"   (H {r['H']:.3f}, alpha2w {r['alpha2w_steps']} steps)")
    out = {"base": base.to_dict(), "runs": {f"{c}x{n}": r for (c, n), r in runs.items()}, "slopes": {}}
    stages = list(next(iter(runs.values()))["timings_s"])
    for axis, pts in (("images", [((mid_c, n), mid_c * n) for n in per_class]), ("classes", [((c, mid_n), c) for c in classes])):
        out["slopes"][axis] = {k: slope([x for _, x in pts], [runs[key]["timings_s"].get(k) or 1e-6 for key, _ in pts]) for k in stages}
        big = [k for k in stages if k == "total" or max(r["timings_s"].get(k) or 0 for r in runs.values()) >= 0.5]
        say(f"(d) time ~ {axis}^slope (stages taking >= 0.5 s): " + "  ".join(f"{k} {out['slopes'][axis][k]:.2f}" for k in big))
    if args.full:
        r = one(RunConfig())
        out["default_run"] = r
        say(f"(d) default RunConfig() (48 classes x 120 images, 12 epochs): {r['wall_s']:.1f} s  "
            + "  ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items() if k != "total" and v >= 0.05) + f"  (H {r['H']:.3f})")
    return out


if __name__ == "__main__":
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also time the default configuration (minutes)")
    a = ap.parse_args()
    r = run(a)
    say("wrote", save("d_pipeline", r, a.out))
