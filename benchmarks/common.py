"""Shared helpers of the benchmarks: interleaved timing, machine description, result files.

Every benchmark measures the things it compares side by side in one process: each repeat runs every candidate once,
in an order that rotates from repeat to repeat, and the reported figure is the median over repeats of the *paired*
ratio (candidate time / reference time within the same repeat). On a shared machine the load drifts; pairing within a
repeat and taking medians removes most of that drift. Timings are never asserted anywhere (tests check numbers, not
speed); BENCHMARKS.md records the figures with the machine they ran on.
"""
from __future__ import annotations
import argparse, gc, json, os, platform, statistics, sys, time
from pathlib import Path

# BLAS libraries (scipy's OpenBLAS, used by the SAE baseline) single-threaded, set before numpy/torch load them: on a
# loaded 2-core machine their spinning worker threads made run_niwt's baselines 60x slower (18 s instead of 0.3 s).
for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(_k, "1")
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke test of the script, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: per benchmark)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the reference machine is shared; ratios are what we compare)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result file")
    return p


def setup(args) -> None:
    os.environ.setdefault("NIWT_QUIET", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def machine() -> dict:
    "Where and with what the benchmark ran."
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    try: load = os.getloadavg()
    except OSError: load = None
    vers = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "captum", "scipy", "niwt_nb"):
        try:
            if mod == "torchvision":                                   # always through niwt_nb (CPU torch + CUDA wheel)
                from niwt_nb.core import import_torchvision
                vers[mod] = import_torchvision().__version__
            else: vers[mod] = __import__(mod).__version__
        except Exception: vers[mod] = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_at_start": load,
            "blas_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "versions": vers}


def interleaved(fns: dict, repeats: int, ref: str, warmup: int = 1) -> dict:
    """Time every function of `fns` (name -> zero-argument callable) `repeats` times, interleaved with a rotating order.
    Returns {name: {median_s, min_s, times_s, ratio_vs_ref (median of per-repeat paired ratios)}}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names: fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            gc.collect()
            t0 = time.perf_counter(); fns[n](); times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[ref])]
        out[n] = {"median_s": statistics.median(times[n]), "min_s": min(times[n]), "times_s": times[n],
                  "ratio_vs_" + ref: statistics.median(ratios)}
    return out


def save(name: str, result: dict, out: str | Path = RESULTS) -> Path:
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    p = out / f"{name}.json"
    p.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=1, default=str))
    return p


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def say(*a):
    print(*a, flush=True)
