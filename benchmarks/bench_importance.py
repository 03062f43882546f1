"""(a) Seen-class importance extraction: niwt_nb.engine vs captum LayerGradCam vs the floor.

One batch, one target class per image (what `extract_alphas` does for every training image), same model, same batch,
same targets for every candidate:

- engine      `niwt_nb.engine.target_importances` (frozen parameters, body under no_grad, one head backward)
- importance  `niwt_nb.importance.importances` (the 05_importance function)
- captum      `captum.attr.LayerGradCam(model, model.body).attribute(x, target=t, attr_dim_summation=False)` on the
              model as a user holds it (parameters requiring grad, eval mode)
- captum_frozen  the same with every parameter's requires_grad off (captum's best case)
- floor       the least code that computes the same numbers: body under no_grad, head + fc forward with a graph on A
              only, one `torch.autograd.grad` to A, spatial sum; parameters frozen outside the timed region
- full_fwd_bwd  a plain forward with a graph everywhere (parameters requiring grad) and a backward to A: what an
              explainer without any care costs

Bars (issue "Fast and scalable"): engine <= captum, engine <= 1.3 x floor.
"""
from __future__ import annotations
import statistics, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, setup, interleaved, save, say, fmt_s
import torch

from niwt_nb.core import eval_mode
from niwt_nb.models import ModelConfig, build_model
from niwt_nb.importance import importances
from niwt_nb.engine import target_importances, frozen


def candidates(model, x, t):
    from captum.attr import LayerGradCam
    gc = LayerGradCam(model, model.body)

    def captum():
        with eval_mode(model): return gc.attribute(x, target=t, attr_dim_summation=False)

    def captum_frozen():
        with frozen(model): return gc.attribute(x, target=t, attr_dim_summation=False)

    def floor():
        with frozen(model):  # a few microseconds: loops over the parameters and modules
            with torch.no_grad(): A = model.body(x)
            A.requires_grad_(True)
            y = model.fc(model.head(A))
            g, = torch.autograd.grad(y.gather(1, t[:, None]).sum(), A)
            return g.sum((2, 3))

    def full_fwd_bwd():
        with eval_mode(model):
            A = model.body(x)
            y = model.fc(model.head(A))
            g, = torch.autograd.grad(y.gather(1, t[:, None]).sum(), A)
            return g.sum((2, 3))

    return {"floor": floor, "engine": lambda: target_importances(model, x, t),
            "importance": lambda: importances(model, x, t), "captum": captum, "captum_frozen": captum_frozen,
            "full_fwd_bwd": full_fwd_bwd}


def run(args) -> dict:
    setup(args)
    cases = [("smallcnn", ModelConfig(), 64, 32), ("resnet18", ModelConfig("resnet18"), 64, 112)]
    if args.quick: cases = [("smallcnn", ModelConfig(width=8), 8, 32), ("resnet18", ModelConfig("resnet18"), 4, 64)]
    reps = args.repeats or (2 if args.quick else 7)
    out = {"cases": {}, "bars": {}}
    for name, cfg, B, px in cases:
        model = build_model(cfg, n_seen=50).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.rand(B, 3, px, px, generator=g)
        t = torch.randint(0, 50, (B,), generator=g)
        fns = candidates(model, x, t)
        ref = fns["engine"]()  # every candidate computes the same importances (captum: mean gradient x A)
        for k in ("floor", "importance", "full_fwd_bwd"):
            assert torch.allclose(fns[k](), ref, atol=1e-5), f"{k} and the engine disagree"
        res = interleaved(fns, reps, ref="floor")
        eng = res["engine"]
        e_floor = eng["ratio_vs_floor"]
        paired_captum = statistics.median(a / b for a, b in zip(eng["times_s"], res["captum"]["times_s"]))
        out["cases"][name] = {"B": B, "px": px, "K": model.K, "D": model.D, "layer": model.layer, "repeats": reps,
                              "results": res, "engine_vs_floor": e_floor, "engine_vs_captum": paired_captum}
        out["bars"][name] = {"engine_vs_floor<=1.3": e_floor <= 1.3, "engine_vs_captum<=1": paired_captum <= 1}
        say(f"\n(a) {name} {model.layer} (K={model.K}), {B} images at {px} px, one target per image, {reps} interleaved repeats")
        for k, v in res.items():
            say(f"  {k:14s} {fmt_s(v['median_s']):>10s}   x{v['ratio_vs_floor']:.3f} of the floor")
        say(f"  engine / floor = {e_floor:.3f} (bar <= 1.3)   engine / captum = {paired_captum:.3f} (bar <= 1)")
    return out


if __name__ == "__main__":
    a = parser(__doc__.splitlines()[0]).parse_args()
    r = run(a)
    say("wrote", save("a_importance", r, a.out))
