"""(b) Importances for every class: niwt_nb.engine.all_class_importances vs a per-class loop.

The loop is what one does without the engine: one call of `niwt_nb.importance.importances(model, x, c)` per class
(a forward and a backward each). Every iteration of that loop costs the same (same batch, same graph, only the class
row differs), so the loop is timed over `n_loop` classes, interleaved with the engine, and scaled to C classes;
`--full-loop` times the whole loop instead (slow: minutes for ResNet-18 at 200 classes).

The engine runs the body once, the head once on `A + eps` and feeds all C class directions through one batched
backward to the spatial offsets `eps` (`method='auto'`: C directions, or the D feature directions when C > D), with the
head's first convolution folded into a matrix product (see nbs/05a_engine.ipynb). For reference the script also
measures the three parts of one loop iteration (body forward, head forward, plain head backward to A) and prints
(F_body + F_head + B_head) / B_head: the best speed-up any "one forward, C plain backwards" scheme could reach
(the engine beats it when folding and batching make its backward cheaper than a plain one).

Bar (issue "Fast and scalable"): >= 10x at 50 classes.
"""
from __future__ import annotations
import statistics, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, setup, interleaved, save, say, fmt_s
import torch

from niwt_nb.models import ModelConfig, build_model
from niwt_nb.importance import importances
from niwt_nb.engine import all_class_importances, frozen


def parts(model, x, reps):
    "Median times of the body forward (no graph), the head forward (graph on A) and one head backward to A."
    with frozen(model):
        with torch.no_grad(): A = model.acts(x)
        A.requires_grad_(True)
        f = model.features(A)
        w = model.fc.weight[0].expand_as(f)
        def body():
            with torch.no_grad(): model.acts(x)
        r = interleaved({"body_fwd": body, "head_fwd": lambda: model.features(A),
                         "head_bwd": lambda: torch.autograd.grad(f, A, w, retain_graph=True)}, reps, ref="body_fwd")
    return {k: v["median_s"] for k, v in r.items()}


def run(args) -> dict:
    setup(args)
    cases = [("smallcnn", ModelConfig(), 64, 32), ("resnet18", ModelConfig("resnet18"), 32, 112)]
    Cs = (50, 200)
    if args.quick: cases, Cs = [("smallcnn", ModelConfig(width=8), 8, 32)], (5, 40)
    reps = args.repeats or (2 if args.quick else 5)
    out = {"cases": {}, "bars": {}}
    for name, cfg, B, px in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(B, 3, px, px, generator=g)
        for C in Cs:
            model = build_model(cfg, n_seen=C).eval()
            n_loop = C if args.full_loop else min(C, args.n_loop)
            ref = torch.stack([importances(model, x, c) for c in range(min(C, 3))], 1)
            assert torch.allclose(all_class_importances(model, x)[:, :3], ref, atol=1e-5)
            method = "jacobian" if C > model.D else "vjp"
            fns = {"loop": lambda: [importances(model, x, c) for c in range(n_loop)],
                   "engine": lambda: all_class_importances(model, x)}
            res = interleaved(fns, reps, ref="engine", warmup=1)
            loop_C = [t * C / n_loop for t in res["loop"]["times_s"]]
            speedup = statistics.median(l / e for l, e in zip(loop_C, res["engine"]["times_s"]))
            p = parts(model, x, reps)
            bound = (p["body_fwd"] + p["head_fwd"] + p["head_bwd"]) / p["head_bwd"]
            key = f"{name}_C{C}"
            out["cases"][key] = {"B": B, "px": px, "C": C, "K": model.K, "D": model.D, "method": method, "n_loop": n_loop,
                                 "loop_s_scaled": statistics.median(loop_C), "engine_s": res["engine"]["median_s"],
                                 "speedup": speedup, "parts_s": p, "estimate_one_fwd_C_plain_bwd": bound, "raw": res}
            if C == 50: out["bars"][name] = {"speedup>=10_at_50": speedup >= 10}
            say(f"(b) {name} C={C:3d} (K={model.K}, D={model.D}, method {method}), {B} images at {px} px: loop "
                f"{fmt_s(statistics.median(loop_C))} (timed over {n_loop} classes), engine {fmt_s(res['engine']['median_s'])}: "
                f"x{speedup:.1f}   [parts: body {fmt_s(p['body_fwd'])}, head fwd {fmt_s(p['head_fwd'])}, head bwd "
                f"{fmt_s(p['head_bwd'])}; no-batching estimate x{bound:.1f}]")
    return out


if __name__ == "__main__":
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--n-loop", type=int, default=10, help="classes timed in the per-class loop (then scaled to C)")
    ap.add_argument("--full-loop", action="store_true", help="time the loop over all C classes")
    a = ap.parse_args()
    r = run(a)
    say("wrote", save("b_all_classes", r, a.out))
