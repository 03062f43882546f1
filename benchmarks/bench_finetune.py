"""(e) Seen-class fine-tuning on a CPU: head + fc on cached activations vs full fine-tuning, EfficientNet-Lite0 at 224 px.

Real CUB-200-2011 photos from ../shared/data (classes 001-025, `--per-class` photos each), decoded once like the data
layer does (shorter side to 256, centre crop 224, uint8 in memory). EfficientNet-Lite0 with its ImageNet weights, cut
at its default layer (`_blocks.15`: A is 320 x 7 x 7), a new fc for the 25 classes. One epoch of `train_seen`
(bs 32, random flips, no validation split so that only training is timed) in three ways, interleaved:

- `full`: `mode='full'`, every layer trained (what a GPU does),
- `frozen`: `mode='full', finetune_all=False`: images through the frozen body every epoch, head + fc trained,
- `cached`: `mode='cached'` with a ready `ActivationCache` (float16, flips cached): head + fc on the cached A only.
  `frozen` and `cached` are the same training (tests/test_models.py); `cached` replaces the body's forward passes.

Also timed: the one-off cost of building the cache (`cache_activations`, body forward of every image and its flip).
Peak memory (RSS) of each, measured in a fresh process per case (VmHWM), with the RSS just before the measured
step (data, model and, for `cached`, the cache already loaded) so that the step's own increase shows.
"""
from __future__ import annotations
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, parser, setup, interleaved, save, say, fmt_s
import numpy as np
import torch

from niwt_nb.models import ModelConfig, TrainConfig, build_model, train_seen, cache_activations, load_activations

SHARED = ROOT.parent / "shared" / "data" / "cub" / "CUB_200_2011" / "images"


def decode(per_class: int, size: int):
    "uint8 images (n, 3, size, size) and class labels of `per_class` photos of each CUB class present (resize + centre crop)."
    from PIL import Image
    xs, ys = [], []
    for c, d in enumerate(sorted(p for p in SHARED.iterdir() if p.is_dir())):
        for f in sorted(d.glob("*.jpg"))[:per_class]:
            im = Image.open(f).convert("RGB")
            r = round(size / 0.875) / min(im.size)
            im = im.resize((max(size, round(im.size[0] * r)), max(size, round(im.size[1] * r))), Image.BILINEAR)
            l, t = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            xs.append(torch.from_numpy(np.array(im.crop((l, t, l + size, t + size)))).permute(2, 0, 1).contiguous()); ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


def as_data(x, y):
    "The ZSLData fields fine-tuning needs: every image in 'train', all classes seen, no validation split."
    from types import SimpleNamespace
    n_cls = int(y.max()) + 1
    return SimpleNamespace(classes=[str(i) for i in range(n_cls)], labels=y, splits={"train": torch.arange(len(y))},
                           seen=torch.arange(n_cls), unseen=torch.zeros(0, dtype=torch.long), images=x)


CFG = dict(epochs=1, bs=32, lr=1e-3, patience=None, augment=True, seed=0)
CASES = {"full": dict(mode="full"), "frozen": dict(mode="full", finetune_all=False), "cached": dict(mode="cached")}


def rss_mb(field: str = "VmRSS") -> float:
    "Resident memory now (VmRSS) or its peak in this process image (VmHWM; unlike ru_maxrss, not inherited over fork+exec)."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    return float("nan")


def measure(case: str, images: str, acts_dir: str, threads: int) -> dict:
    "In a fresh process: RSS before and peak RSS of one epoch of `case` (or of building the cache, case 'build')."
    torch.set_num_threads(threads)
    x, y = torch.load(images, weights_only=True).values()
    data = as_data(x, y)
    net = build_model(ModelConfig("efficientnet_lite0", weights="imagenet"), len(data.seen))
    acts = load_activations(acts_dir) if case == "cached" else None
    before = rss_mb()
    t0 = time.perf_counter()
    if case == "build": cache_activations(net, data, "train", flip=True, bs=32)
    else: train_seen(net, data, TrainConfig(**CFG, **CASES[case]), acts=acts)
    secs = time.perf_counter() - t0
    return {"rss_before_mb": before, "peak_rss_mb": rss_mb("VmHWM"), "seconds": secs}


def run(args) -> dict:
    setup(args)
    per_class, size = (2, 224) if args.quick else (args.per_class, 224)
    if not SHARED.is_dir():
        raise SystemExit(f"CUB photos not found under {SHARED}: this benchmark needs ../shared/data")
    t0 = time.perf_counter(); x, y = decode(per_class, size); t_dec = time.perf_counter() - t0
    data = as_data(x, y)
    say(f"(e) {len(y)} CUB photos of {len(data.seen)} classes at {size} px (decoded in {t_dec:.1f} s); EfficientNet-Lite0 "
        f"(ImageNet weights) cut at _blocks.15; bs {CFG['bs']}, flips on; torch threads {torch.get_num_threads()}")
    net0 = build_model(ModelConfig("efficientnet_lite0", weights="imagenet"), len(data.seen))
    state0 = {k: v.clone() for k, v in net0.state_dict().items()}
    def fresh():
        net0.load_state_dict(state0); return net0
    acts = cache_activations(fresh(), data, "train", flip=True, bs=32)
    say(f"    {acts}")
    # the same training: frozen (images) and cached give the same loss, up to float16 rounding of A
    _, h_f = train_seen(fresh(), data, TrainConfig(**CFG, **CASES["frozen"]))
    _, h_c = train_seen(fresh(), data, TrainConfig(**CFG, **CASES["cached"]), acts=acts)
    say(f"    one epoch's train loss: frozen body on images {h_f['train_loss'][0]:.5f}, cached {h_c['train_loss'][0]:.5f}")
    reps = args.repeats or (2 if args.quick else 3)
    fns = {name: (lambda kw=kw: train_seen(fresh(), data, TrainConfig(**CFG, **kw), acts=acts if kw["mode"] == "cached" else None))
           for name, kw in CASES.items()}
    res = interleaved(fns, reps, ref="full", warmup=0)  # the two runs above warmed everything up
    build = interleaved({"build": lambda: cache_activations(fresh(), data, "train", flip=True, bs=32),
                         "cached": fns["cached"]}, reps, ref="build", warmup=0)
    for name in CASES:
        faster = f", {1 / res[name]['ratio_vs_full']:.1f}x faster than full (paired median)" if name != "full" else ""
        say(f"    epoch {name:6s}: {fmt_s(res[name]['median_s'])} (min {fmt_s(res[name]['min_s'])}){faster}")
    say(f"    building the cache (with flips): {fmt_s(build['build']['median_s'])} = "
        f"{1 / build['cached']['ratio_vs_build']:.0f} cached epochs, {build['build']['median_s'] / res['full']['median_s']:.2f} full epochs")
    # peak memory, one fresh process per case
    mem = {}
    with tempfile.TemporaryDirectory() as d:
        torch.save({"x": x, "y": y}, f"{d}/images.pt"); acts.save(f"{d}/acts")
        for case in ("build", *CASES):
            r = subprocess.run([sys.executable, __file__, "--measure", case, "--images", f"{d}/images.pt", "--acts", f"{d}/acts",
                                "--threads", str(args.threads)], capture_output=True, text=True, env={**os.environ, "NIWT_QUIET": "1"})
            if r.returncode != 0: raise RuntimeError(r.stderr[-3000:])
            mem[case] = json.loads(r.stdout.strip().splitlines()[-1])
            say(f"    peak RSS {case:6s}: {mem[case]['peak_rss_mb']:.0f} MB (before the step {mem[case]['rss_before_mb']:.0f} MB, "
                f"+{mem[case]['peak_rss_mb'] - mem[case]['rss_before_mb']:.0f} MB)")
    return {"n_images": len(y), "n_classes": len(data.seen), "size": size, "train_config": CFG, "cache_mb": acts.nbytes / 2**20,
            "cache_shape": acts.shape, "loss_frozen_vs_cached": [h_f["train_loss"][0], h_c["train_loss"][0]],
            "epoch": res, "build": build, "memory": mem, "decode_s": t_dec,
            "speedup_cached_vs_full": 1 / res["cached"]["ratio_vs_full"], "speedup_cached_vs_frozen":
            res["frozen"]["median_s"] / res["cached"]["median_s"]}


if __name__ == "__main__":
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=8, help="photos per CUB class (25 classes present)")
    ap.add_argument("--measure", choices=["build", *CASES], help="(internal) measure the memory of one case in this process")
    ap.add_argument("--images", help="(internal) decoded images file for --measure")
    ap.add_argument("--acts", help="(internal) saved cache folder for --measure")
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.images, a.acts, a.threads)))
    else:
        r = run(a)
        say("wrote", save("e_finetune", r, a.out))
