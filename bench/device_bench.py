"""The device suite as a script: ``hmmgpu bench device`` with a size knob and the JSON of old.

    PYTHONPATH=. python3 bench/device_bench.py [--gib 1] [--reps 5] [--json out.json] [--only dma,reduce]
    PYTHONPATH=. python3 bench/device_bench.py --cpu     # the NumPy fallback's figures

It runs ``bench/suites/device.py`` through the framework (same timing, same baselines) and
writes ``{"date", "device", "backend", "bytes", "figures": {figure: {"ratio", "target",
"GBps", "baseline_GBps", "time_s", "baseline_s", "spread", "baseline", "note"}}, "without_ratio":
{figure: {"GBps", "baseline"}}, "unavailable": {...}}``, where ``target`` is the number x of
">= x"; a figure whose baseline could not be measured here is under "without_ratio".  The
suite's 2 MiB-folio rows (its part "thp": costs per folio and per lane, no targets) are not such
figures: ``hmmgpu bench device`` shows them.
"""
import argparse
import json
import sys
import time

PARTS = ("dma", "reduce", "remote", "prefetch", "fault")   # the parts whose rows are GB/s figures


def main(argv=None):
    from hmmgpu.bench import framework, measure
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="bytes per figure, in GiB (default 1)")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per figure (default 5)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON to FILE")
    ap.add_argument("--only", default=None, help="comma-separated: dma,reduce,remote,prefetch,fault")
    ap.add_argument("--cpu", action="store_true", help="the NumPy backend's figures only")
    opt = ap.parse_args(argv)
    if opt.gib <= 0 or opt.reps < 1:
        ap.error("--gib must be > 0 and --reps at least 1")
    only = set(opt.only.split(",")) if opt.only else set(PARTS)
    if not only <= set(PARTS):
        ap.error(f"--only takes {','.join(PARTS)}")
    options = {"device_bytes": int(opt.gib * (1 << 30)), "only": only}
    from hmmgpu.errors import BackendUnavailable
    try:
        res = framework.run(["device"], backend="numpy" if opt.cpu else "cupy", repeat=opt.reps, options=options)
    except BackendUnavailable as e:
        print(f"device_bench.py: the GPU figures need CuPy and a GPU ({e}); --cpu measures the NumPy "
              "backend's", file=sys.stderr)
        return 2
    figures, no_ratio = {}, {}
    for r in res["rows"]:
        nbytes = options["device_bytes"]
        if r["ratio"] is None:          # the baseline could not be measured here: says why
            no_ratio[r["figure"]] = {"GBps": r["ours"], "baseline": r["baseline_name"]}
            print(f"{r['figure'][:48]:48s} {r['ours']:8.1f} GB/s  no ratio: {r['baseline_name']}", flush=True)
            continue
        figures[r["figure"]] = {
            "ratio": r["ratio"], "target": measure.target_value(r["target"]), "GBps": r["ours"],
            "baseline_GBps": r["baseline"], "time_s": nbytes / (r["ours"] * 1e9),
            "baseline_s": None if not r["baseline"] else nbytes / (r["baseline"] * 1e9),
            "spread": r["ratio_spread"], "baseline": r["baseline_name"], "note": r["note"]}
        print(f"{r['figure'][:48]:48s} {r['ours']:8.1f} GB/s  ratio {r['ratio']:5.2f} (target {r['target']})  "
              f"vs {r['baseline_name']}", flush=True)
    for name, why in res["unavailable"].items():
        print(f"{name}: not available: {why}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": res["meta"]["device"].get("name"),
           "backend": res["meta"]["backend"], "label": res["meta"]["label"], "bytes": options["device_bytes"],
           "repeat": opt.reps, "figures": figures, "without_ratio": no_ratio, "unavailable": res["unavailable"]}
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if res["unavailable"] else 0


if __name__ == "__main__":
    sys.exit(main())
