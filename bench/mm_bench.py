"""Control-plane scaling of the emulated host kernel: per-page cost from 2^10 to 2^20 pages.

Each operation runs over one range of N pages in a fresh System sized for it:
fault-in (a write to untouched anonymous memory: demand-zero), mprotect
(write-protect), fork (the COW copy of the page tables), writeback (msync of a
dirty shared file mapping) and munmap.  The figure is seconds per page; the
target is flat within 1.5x across sizes (the max/min ratio is printed).

    python bench/mm_bench.py [--min-exp 10] [--max-exp 20] [--repeat 3] [--json]

Timings are host (CPU) timings of the emulation itself, whatever the backend.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE

RW = PROT_READ | PROT_WRITE
OPS = ("fault-in", "mprotect", "fork", "writeback", "munmap")


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(npages, backend="numpy", tmpdir=None):
    """One round over ``npages``: seconds for each operation."""
    out = {}
    system = hmmgpu.System(backend=backend, ram_bytes=(npages + 64) * PAGE_SIZE)
    proc = system.spawn()
    length = npages * PAGE_SIZE
    a = proc.mmap(length, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    data = np.full(length, 7, np.uint8)
    out["fault-in"] = _time(lambda: proc.write(a, data))
    out["mprotect"] = _time(lambda: proc.mprotect(a, length, PROT_READ))
    child = {}
    out["fork"] = _time(lambda: child.setdefault("c", proc.fork()))
    child["c"].exit()
    proc.munmap(a, length)
    fd, path = tempfile.mkstemp(dir=tmpdir)
    try:
        os.ftruncate(fd, length)
        f = proc.mmap(length, RW, MAP_SHARED, fd)
        proc.write(f, data)
        out["writeback"] = _time(lambda: proc.msync(f, length))
        out["munmap"] = _time(lambda: proc.munmap(f, length))
    finally:
        os.close(fd)
        os.unlink(path)
    proc.exit()
    return out


def run(min_exp=10, max_exp=20, repeat=3, backend="numpy", progress=None):
    rows = []
    for e in range(min_exp, max_exp + 1):
        n = 1 << e
        samples = []
        for _ in range(repeat):
            samples.append(measure(n, backend))
            gc.collect()     # a System and its processes form cycles: free the arena now
        row = {"pages": n}
        for op in OPS:
            row[op] = statistics.median(s[op] for s in samples) / n
        rows.append(row)
        if progress:
            progress(row)
    flat = {op: max(r[op] for r in rows) / min(r[op] for r in rows) for op in OPS}
    return {"rows": rows, "max_over_min": flat}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-exp", type=int, default=10)
    ap.add_argument("--max-exp", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)

    def show(row):
        cells = "  ".join(f"{op} {row[op] * 1e9:8.1f} ns" for op in OPS)
        print(f"2^{row['pages'].bit_length() - 1:<2} pages  {cells}", file=sys.stderr, flush=True)

    res = run(args.min_exp, args.max_exp, args.repeat, args.backend, show)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print("max/min per-page cost across sizes (target <= 1.5): "
              + ", ".join(f"{op} {v:.2f}" for op, v in res["max_over_min"].items()))


if __name__ == "__main__":
    main()
