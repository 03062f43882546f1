"""Run every benchmark (a)-(d), print their figures and a summary against the bars of issue "Fast and scalable", and
record the results as JSON under benchmarks/results/ (one file per benchmark plus summary.json).

    python benchmarks/run_all.py            # about 8-9 minutes on 2 shared CPU cores
    python benchmarks/run_all.py --quick    # smoke test of the scripts (tiny sizes; the figures mean nothing)

Each benchmark runs in its own process (a fresh interpreter: no warm caches or allocator state carried between them).
"""
from __future__ import annotations
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, say

HERE = Path(__file__).resolve().parent
BENCHES = [("a_importance", "bench_importance.py"), ("b_all_classes", "bench_all_classes.py"),
           ("c_alpha2w", "bench_alpha2w.py"), ("d_pipeline", "bench_pipeline.py"), ("e_finetune", "bench_finetune.py"), ("f_cub_cpu", "bench_cub_cpu.py")]


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="*", help="benchmark names to run (default all), e.g. a_importance c_alpha2w")
    p.add_argument("--summary", action="store_true", help="run nothing: summarise the result files already in --out")
    a = p.parse_args(argv)
    extra = ["--threads", str(a.threads), "--out", a.out] + (["--quick"] if a.quick else [])
    t_all, secs, failed = time.time(), {}, []
    for name, script in BENCHES:
        if a.summary or (a.only and name not in a.only): continue
        say(f"\n=== {name} ({script})")
        t0 = time.time()
        r = subprocess.run([sys.executable, str(HERE / script), *extra])
        secs[name] = round(time.time() - t0, 1)
        if r.returncode != 0: failed.append(name)
    summary = {"machine": machine(), "quick": a.quick, "seconds": secs, "total_s": round(time.time() - t_all, 1),
               "failed": failed, "bars": {}, "result_dates": {}}
    say("\n=== summary (result files in " + a.out + ", with the date each was measured)")
    for name, _ in BENCHES:
        f = Path(a.out) / f"{name}.json"
        if not f.exists(): continue                                  # results of earlier runs are summarised too
        res = json.loads(f.read_text())
        summary["result_dates"][name] = res["machine"]["date"]
        if name == "a_importance":
            for m, c in res["cases"].items():
                say(f"(a) {m:9s} engine / floor = {c['engine_vs_floor']:.3f} (bar <= 1.3)   engine / captum = {c['engine_vs_captum']:.3f} (bar <= 1)")
        elif name == "b_all_classes":
            for k, c in res["cases"].items():
                say(f"(b) {k:15s} all-class engine vs per-class loop: x{c['speedup']:.1f}" + ("  (bar >= 10 at 50 classes)" if c["C"] == 50 else ""))
        elif name == "c_alpha2w":
            say(f"(c) alpha2w fast vs reference to the same loss: x{res['speedup_to_same_loss']:.0f} (bar >= 20)")
        elif name == "d_pipeline":
            for axis, s in res["slopes"].items():
                say(f"(d) run_niwt total time ~ {axis}^{s['total']:.2f}")
        summary["bars"][name] = res.get("bars")
    say(f"\nall benchmarks: {summary['total_s']:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    say("wrote", Path(a.out) / "summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
