"""(f) What made the real-CUB run fit 5 minutes on a CPU: three changes, each measured side by side against what it replaced.

1. `body`: EfficientNet-Lite0's body (up to `_blocks.15`) on 64 real CUB photos at 224 px, as `cache_activations` runs it:
   one batch of 64 (before) vs 8 chunks of `CPU_FORWARD_BS` = 8 (now). Same activations (checked).
2. `sae`: the SAE baseline over its lambda grid (8 values, as `DEFAULT_GRIDS`) on features of CUB's shapes (n images x
   D = 1280 from the fine-tuned Lite0 head, k = 312 attributes, 22 classes): `scipy.linalg.solve_sylvester` per lambda
   (before) vs `fit_sae` (now: one eigendecomposition for the grid). On this rank-deficient problem (n < D, 22 < k)
   the equation has many solutions: reported is how well each satisfies it, and the norm of the solution each picks.
3. `alpha2w`: one step of the 'pairs' objective on a Lite0 feed: 256 images (before) vs 64 (`default_n_feed`).

    python benchmarks/bench_cub_cpu.py [--quick] [--threads 1]
"""
from __future__ import annotations
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, parser, setup, interleaved, save, say, fmt_s
import torch

SHARED = ROOT.parent / "shared" / "data" / "cub" / "CUB_200_2011" / "images"


def photos(n: int, size: int = 224) -> torch.Tensor:
    "n real CUB photos (shorter side to size/0.875, centre crop), uint8 (n, 3, size, size); random pixels without ../shared."
    from niwt_nb.xlsa17 import decode_images
    files = sorted(str(p.relative_to(SHARED)) for p in SHARED.glob("*/*.jpg"))[:: 7][:n] if SHARED.is_dir() else []
    if len(files) < n:
        say(f"note: {SHARED} absent or short: random pixels instead of photos (timings comparable, not the activations)")
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return decode_images(files, size, SHARED)[0]


def main(argv=None):
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(a)
    from niwt_nb.models import ModelConfig, build_model, CPU_FORWARD_BS, _body_acts
    from niwt_nb.evaluate import fit_sae
    from niwt_nb.alpha2w import importance_matrix, _pairs_loss_grad
    from scipy.linalg import solve_sylvester
    reps = a.repeats or (2 if a.quick else 3)
    out = {"threads": a.threads, "repeats": reps}
    dev = torch.device("cpu")

    # 1. the body, one batch vs chunks
    n = 16 if a.quick else 64
    model = build_model(ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), 22).eval()
    x = photos(n)
    with torch.no_grad():
        same = torch.allclose(model.acts(x), _body_acts(model, x, dev), atol=1e-4, rtol=1e-4)
        r = interleaved({"one_batch": lambda: model.acts(x), "chunks": lambda: _body_acts(model, x, dev)}, reps, ref="one_batch")
    out["body"] = {"images": n, "chunk": CPU_FORWARD_BS, "same_activations": same, **r}
    say(f"body, {n} photos: one batch {fmt_s(r['one_batch']['median_s'])}, chunks of {CPU_FORWARD_BS} {fmt_s(r['chunks']['median_s'])} "
        f"(paired ratio {r['chunks']['ratio_vs_one_batch']:.2f}); same activations: {same}")

    # 2. SAE over the lambda grid
    g = torch.Generator().manual_seed(0)
    n_img, D, k, C = (200, 256, 64, 10) if a.quick else (1100, 1280, 312, 22)
    y = torch.arange(n_img) % C
    dom = torch.rand(C, k, generator=g)
    X = torch.relu(torch.randn(C, D, generator=g)[y] + 0.5 * torch.randn(n_img, D, generator=g))
    lams = [10.0 ** e for e in range(-2, 6)]
    Xd, S = X.double(), dom[y].double()
    def scipy_grid():
        return [solve_sylvester((S.T @ S).numpy(), (l * Xd.T @ Xd).numpy(), ((1 + l) * S.T @ Xd).numpy()) for l in lams]
    def ours_grid():
        from niwt_nb import evaluate
        evaluate._SAE_EIG.clear()                                          # the grid's decomposition counted every repeat
        return [fit_sae(X, y, dom, torch.arange(C), lam=l).W for l in lams]
    r = interleaved({"scipy": scipy_grid, "eigen": ours_grid}, reps, ref="scipy")
    def resid(W, l):
        A, B, Cm = S.T @ S, l * Xd.T @ Xd, (1 + l) * S.T @ Xd
        W = torch.as_tensor(W, dtype=torch.float64)
        return float((A @ W + W @ B - Cm).norm() / Cm.norm())
    res = {"scipy": max(resid(W, l) for W, l in zip(scipy_grid(), lams)), "eigen": max(resid(W, l) for W, l in zip(ours_grid(), lams))}
    norms = {"scipy": [float(torch.as_tensor(W).norm()) for W in scipy_grid()], "eigen": [float(W.norm()) for W in ours_grid()]}
    out["sae"] = {"n": n_img, "D": D, "k": k, "classes": C, "lams": lams, "max_relative_residual": res, "W_norm": norms, **r}
    say(f"SAE grid of {len(lams)} on ({n_img} x {D}), k={k}: scipy {fmt_s(r['scipy']['median_s'])}, eigen {fmt_s(r['eigen']['median_s'])} "
        f"(paired ratio {r['eigen']['ratio_vs_scipy']:.3f}); worst relative residual scipy {res['scipy']:.1e}, eigen {res['eigen']:.1e}; "
        f"|W| at lam=1: scipy {norms['scipy'][2]:.3g}, eigen {norms['eigen'][2]:.3g} (both solve it; the eigen one is the minimum-norm solution)")

    # 3. one alpha2w 'pairs' step on 256 vs 64 fed activations
    from niwt_nb.pipeline import OnActivations
    net = OnActivations(model)
    nf = 16 if a.quick else 256
    with torch.no_grad(): A = torch.cat([model.acts(x[i % n:i % n + 1]) for i in range(nf)])   # (nf, K, 7, 7): photos repeated
    t0 = time.time(); Gx = importance_matrix(net, A, per_image=True); t_G = time.time() - t0       # (nf, K, D)
    W, target = model.fc.weight.detach()[:4].clone(), torch.rand(4, Gx.shape[1], generator=g)
    w_mean = model.fc.weight.detach().mean(0)
    small = Gx[: max(1, nf // 4)]
    r = interleaved({"feed_256": lambda: _pairs_loss_grad(Gx, W, target, w_mean, 1e-2, "mean", 256),
                     "feed_64": lambda: _pairs_loss_grad(small, W, target, w_mean, 1e-2, "mean", 256)}, reps, ref="feed_256")
    out["alpha2w_step"] = {"feed": [nf, len(small)], "G_shape": list(Gx.shape), "importance_matrix_s": t_G, **r}
    say(f"alpha2w pairs step, G {tuple(Gx.shape)}: {nf} images {fmt_s(r['feed_256']['median_s'])}, {len(small)} images "
        f"{fmt_s(r['feed_64']['median_s'])} (paired ratio {r['feed_64']['ratio_vs_feed_256']:.2f})")
    save("f_cub_cpu", out, a.out)


if __name__ == "__main__": main()
