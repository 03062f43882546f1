"""(c) alpha2w: the fast path (importance matrix G once, Adam on the small problem) vs the faithful reference loop.

The reference (`Alpha2WConfig(method='reference')`) is the original algorithm: every Adam step runs the network on the
fed images, takes the importances of every new class by `torch.autograd.grad(create_graph=True)` and backpropagates
through them (double backward). With `bs` = all fed images it optimises exactly the fast path's objective, from the
same initialisation, with the same Adam: the two follow the same trajectory (checked: the per-step losses of the
first `k` reference steps are compared with the fast path's), so "time to the same loss" for the reference is the
number of steps the fast path needed to reach its best loss times the reference's time per step. The per-step time
is measured over `k` steps, interleaved with full fast runs; `--full-ref` runs the reference to its own stopping point.

Setting: the Shapes pipeline's defaults (small CNN width 32, K = D = 128, 256 fed images of 32 px, 12 unseen + 6
validation classes = 18 new rows), targets = the true importances of known weight rows near the seen ones (so the
best achievable cosine is 1). Bar (issue "Fast and scalable"): >= 20x at equal accuracy.
"""
from __future__ import annotations
import statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, setup, interleaved, save, say, fmt_s
import torch
import torch.nn.functional as F

from niwt_nb.models import ModelConfig, build_model
from niwt_nb.alpha2w import Alpha2WConfig, fit_alpha2w, importance_matrix
from niwt_nb.engine import all_class_importances


def run(args) -> dict:
    setup(args)
    width, N, n_new, k = (32, 256, 18, args.k) if not args.quick else (8, 16, 3, 3)
    reps = args.repeats or (2 if args.quick else 3)
    model = build_model(ModelConfig(width=width), n_seen=36).eval()
    g = torch.Generator().manual_seed(0)
    feed = torch.rand(N, 3, 32, 32, generator=g)                                     # (N,3,H,W) floats
    W_seen, b_seen = model.fc.weight.detach(), model.fc.bias.detach()
    W_true = W_seen.mean(0) + 0.3 * W_seen.std(0) * torch.randn(n_new, model.D, generator=g)
    target = all_class_importances(model, feed, W=W_true).mean(0)                    # (n_new, K): mean over images
    cfg = Alpha2WConfig(bs=N)                                                         # full batch: the same objective
    fast = lambda: fit_alpha2w(model, target, feed, W_seen, b_seen, cfg)
    ref_k = lambda: fit_alpha2w(model, target, feed, W_seen, b_seen, cfg.replace(method="reference", max_steps=k))
    res = interleaved({"fast": fast, "reference_k_steps": ref_k}, reps, ref="fast", warmup=0)
    rf, rr = fast(), ref_k()
    # where the fast path's time goes, and what the engine would save there: G = mean over images of the spatially
    # summed Jacobian, i.e. the engine's 'jacobian' route with W = I (head convolution folded)
    eye = torch.eye(model.D)
    def G_engine():
        return sum(all_class_importances(model, feed[i:i + cfg.bs], W=eye, method="jacobian").sum(0) for i in range(0, N, cfg.bs)).T / N
    rG = interleaved({"importance_matrix": lambda: importance_matrix(model, feed, cfg.bs, cfg.chunk_mb), "engine": G_engine},
                     reps, ref="importance_matrix", warmup=0)
    G = importance_matrix(model, feed, cfg.bs, cfg.chunk_mb)
    assert torch.allclose(G_engine(), G, atol=1e-5, rtol=1e-4), "engine G differs"
    t_G, t_G_engine = rG["importance_matrix"]["median_s"], rG["engine"]["median_s"]
    per_step = statistics.median(res["reference_k_steps"]["times_s"]) / k
    steps_needed = rf["best_step"] + 1
    dev = max(abs(a - b) for a, b in zip(rf["history"]["loss"][:k], rr["history"]["loss"]))
    fast_s = res["fast"]["median_s"]
    ratio = statistics.median(t / k * steps_needed / f for t, f in zip(res["reference_k_steps"]["times_s"], res["fast"]["times_s"]))
    out = {"N": N, "n_new": n_new, "K": model.K, "D": model.D, "k": k, "fast_s": fast_s, "fast_steps": rf["steps"],
           "fast_best_step": rf["best_step"], "fast_loss": rf["loss"], "fast_mean_cos": float(rf["cos"].mean()),
           "G_s": t_G, "G_engine_s": t_G_engine, "G_engine_ratio": rG["engine"]["ratio_vs_importance_matrix"],
           "adam_loop_s_est": fast_s - t_G, "ref_per_step_s": per_step, "ref_s_to_same_loss_extrapolated": per_step * steps_needed,
           "max_abs_loss_diff_first_k_steps": dev, "speedup_to_same_loss": ratio, "raw": res}
    say(f"(c) alpha2w, {n_new} new classes, {N} fed images, K={model.K}, D={model.D}: fast {fmt_s(fast_s)} "
        f"({rf['steps']} Adam steps, best loss {rf['loss']:.5f} at step {rf['best_step']}, mean cos {out['fast_mean_cos']:.4f})")
    say(f"    fast = G {fmt_s(t_G)} + {rf['steps']} Adam steps ~{fmt_s(fast_s - t_G)} ({(fast_s - t_G) / rf['steps'] * 1e6:.0f} us/step); "
        f"G by the engine (folded head conv): {fmt_s(t_G_engine)} (x{1 / rG['engine']['ratio_vs_importance_matrix']:.1f} faster)")
    say(f"    reference {fmt_s(per_step)} per step (median over {reps} runs of {k} steps); same trajectory: max |loss "
        f"difference| over the first {k} steps {dev:.2e}")
    say(f"    reference to the same loss ({steps_needed} steps): {fmt_s(per_step * steps_needed)} -> fast is x{ratio:.0f}")
    if args.full_ref:
        t0 = time.perf_counter(); full = fit_alpha2w(model, target, feed, W_seen, b_seen, cfg.replace(method="reference"))
        t_full = time.perf_counter() - t0
        out.update(full_ref_s=t_full, full_ref_steps=full["steps"], full_ref_loss=full["loss"],
                   full_ref_W_maxdiff=float((full["W"] - rf["W"]).abs().max()))
        say(f"    full reference run: {fmt_s(t_full)}, {full['steps']} steps, best loss {full['loss']:.5f} "
            f"(fast {rf['loss']:.5f}), max |W_ref - W_fast| {out['full_ref_W_maxdiff']:.2e}")
    out["bars"] = {"speedup>=20": ratio >= 20}
    return out


if __name__ == "__main__":
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10, help="reference steps timed per repeat")
    ap.add_argument("--full-ref", action="store_true", help="also run the reference to its own stopping point (slow)")
    a = ap.parse_args()
    r = run(a)
    say("wrote", save("c_alpha2w", r, a.out))
