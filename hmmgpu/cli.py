"""The ``hmmgpu`` command: ``info``, ``demo`` and ``bench``.

    hmmgpu info              which backend runs here and why; CUDA, driver, GPUs, emulated devices
    hmmgpu demo              the main job, end to end: a CPU-built data set (arrays, a linked list,
                             a tree), device jobs on it through the mirrored address space, hot data
                             migrated to the device and back, rss and memcg before and after
    hmmgpu bench [SUITE...]  the benchmark suites, each figure beside its baseline from the same run

Every command takes ``--backend auto|cupy|numpy`` (default: the HMMGPU_BACKEND variable, else
auto) and ``--json``.  ``demo`` and ``bench`` take ``--trace FILE.json`` (a Chrome trace that
https://ui.perfetto.dev opens).  ``demo`` and ``bench`` print their live tables and progress
on stderr and JSON on stdout, so ``hmmgpu bench --json > out.json`` works; ``info`` prints its
table (or JSON) on stdout.

The demo's device driver is ``hmmgpu.drivers.mirrorgpu.MirrorGpu``: an address space on the
dmirror device's ``EmulatedDevice`` whose faults are serviced with ``hmm_range_fault``.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from . import trace

EMULATED_LABEL = "emulated (numpy fallback)"


# ---------------------------------------------------------------------------------------------
# small helpers

def _console(stderr=True):
    from rich.console import Console
    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):   # logs, pipes: room for the tables
        con = Console(stderr=stderr, highlight=False, width=max(con.width, 150))
    return con


def _mib(nbytes):
    return f"{nbytes / (1 << 20):,.1f} MiB"


def _fmt_bytes(n):
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _emit_json(obj):
    sys.stdout.write(json.dumps(trace._jsonable(obj), indent=1) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# hmmgpu info

def gather_info(backend=None):
    """Facts for ``hmmgpu info`` as a dict (never raises for a missing optional piece)."""
    import hmmgpu
    from .device.backend import backend_info, get_backend
    bi = backend_info()
    chosen = backend or os.environ.get("HMMGPU_BACKEND") or "auto"
    out = {"hmmgpu": hmmgpu.__version__, "python": sys.version.split()[0], "numpy": np.__version__,
           "auto_backend": bi["backend"], "auto_reason": bi["reason"], "HMMGPU_BACKEND": bi["env"],
           "requested_backend": chosen}
    try:
        import rich
        out["rich"] = getattr(rich, "__version__", None) or _dist_version("rich")
    except Exception:
        pass
    try:
        be = get_backend(None if chosen == "auto" else chosen)
        out["backend"] = be.name
        out["emulated"] = bool(getattr(be, "emulated", True))
    except Exception as e:
        out["backend"] = None
        out["backend_error"] = f"{type(e).__name__}: {e}"
    # CUDA / CuPy facts (only when CuPy imports; importing it does not start CUDA)
    try:
        import cupy
        out["cupy"] = cupy.__version__
        rt = cupy.cuda.runtime
        try:
            out["cuda_runtime"] = rt.runtimeGetVersion()
            out["cuda_driver"] = rt.driverGetVersion()
            ngpu = rt.getDeviceCount()
        except Exception as e:
            out["cuda_error"] = f"{type(e).__name__}: {e}"
            ngpu = 0
        gpus = []
        for g in range(ngpu):
            try:
                from .kernels.backend import cuda_info
                gpus.append(cuda_info(g))
            except Exception as e:
                gpus.append({"gpu": g, "error": f"{type(e).__name__}: {e}"})
        out["gpus"] = gpus
        try:                        # what compiles the kernels (auto needs it to pick cupy)
            from .kernels.backend import nvrtc_version
            out["nvrtc"] = "%d.%d" % nvrtc_version()
        except Exception as e:
            out["nvrtc"] = None
            out["nvrtc_error"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        out["cupy"] = None
        out["cupy_error"] = f"{type(e).__name__}: {e}"
        out["gpus"] = []
    try:
        import pynvml  # noqa: F401
        out["pynvml"] = _dist_version("nvidia-ml-py") or "installed"
    except Exception:
        out["pynvml"] = None
    try:
        import matplotlib
        out["matplotlib"] = matplotlib.__version__
    except Exception:
        out["matplotlib"] = None
    out["emulated_devices"] = _emulated_devices(out.get("backend"))
    return out


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def _emulated_devices(backend_name):
    """What an emulated machine is made of by default (nothing is allocated to find out)."""
    from .constants import PAGE_SIZE
    from .system import DEFAULT_RAM_BYTES
    rows = []
    host_kind = ("pinned, mapped host memory (a GPU kernel reads it over PCIe, zero-copy)"
                 if backend_name == "cupy" else "a NumPy array")
    rows.append({"device": "system RAM", "memory": DEFAULT_RAM_BYTES,
                 "where": host_kind, "note": "hmmgpu.System(ram_bytes=...)"})
    try:
        from .drivers import dmirror
        rows.append({"device": "dmirror (lib/test_hmm.c)",
                     "memory": dmirror.DEVMEM_CHUNK_PAGES * PAGE_SIZE,
                     "where": "GPU memory" if backend_name == "cupy" else "a NumPy array",
                     "note": "per chunk (memremap_pages); private or coherent; grows on demand"})
    except Exception as e:
        rows.append({"device": "dmirror", "memory": None, "where": "-",
                     "note": f"not available: {type(e).__name__}: {e}"})
    try:
        from .device import faults as _f
        from .device import pagetable as _pt
        rows.append({"device": "EmulatedDevice (hmmgpu.device)", "memory": None,
                     "where": "GPU memory" if backend_name == "cupy" else "a NumPy array",
                     "note": (f"{_pt.PT_LEVELS}-level device page table ({12 + _pt.VPN_BITS}-bit VA), "
                              f"fault buffer {_f.DEFAULT_FAULT_BUFFER_ENTRIES} entries, "
                              f"batch {_f.DEFAULT_FAULT_BATCH}; frames sized by its driver")})
    except Exception as e:
        rows.append({"device": "EmulatedDevice", "memory": None, "where": "-",
                     "note": f"not available: {type(e).__name__}: {e}"})
    return rows


def cmd_info(opt):
    info = gather_info(opt.backend)
    if opt.json:
        _emit_json(info)
        return 0
    from rich.markup import escape
    from rich.table import Table
    con = _console(stderr=False)
    t = Table(title="hmmgpu", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    be = info.get("backend") or f"[red]none[/] ({info.get('backend_error')})"
    if info.get("backend") == "numpy":
        be += f"  [yellow]{EMULATED_LABEL}: device memory is host memory, timings are not GPU timings[/]"
    t.add_row("backend in use", be)
    t.add_row("auto would pick", f"{info['auto_backend']}: {info['auto_reason']}")
    t.add_row("HMMGPU_BACKEND", info.get("HMMGPU_BACKEND") or "unset")
    t.add_row("versions", f"hmmgpu {info['hmmgpu']}, Python {info['python']}, NumPy {info['numpy']}, "
                          f"rich {info.get('rich')}")
    cu = info.get("cupy")
    t.add_row("CuPy", cu if cu else escape(f"not installed ({info.get('cupy_error', '')}); "
                                           "pip install -e '.[cuda12]' or '.[cuda13]'"))
    if cu:
        t.add_row("CUDA runtime / driver", f"{_cuda_ver(info.get('cuda_runtime'))} / "
                                           f"{_cuda_ver(info.get('cuda_driver'))}"
                  + (f"  ({info['cuda_error']})" if info.get("cuda_error") else ""))
        t.add_row("NVRTC", info.get("nvrtc") or "[red]none[/] " + escape(f"({info.get('nvrtc_error')})"))
    t.add_row("pynvml", info.get("pynvml") or "not installed (optional: GPU names, PCIe link)")
    t.add_row("matplotlib", info.get("matplotlib") or "not installed (optional: bench --plot)")
    con.print(t)
    if info.get("gpus"):
        g = Table(title="GPUs", title_justify="left")
        for c in ("#", "name", "CC", "SMs", "memory total", "memory free", "PCIe", "driver"):
            g.add_column(c)
        for d in info["gpus"]:
            if "error" in d:
                g.add_row(str(d.get("gpu")), f"[red]{d['error']}[/]", "", "", "", "", "", "")
                continue
            pcie = "-"
            if d.get("pcie_gen"):
                pcie = f"gen{d['pcie_gen']} x{d.get('pcie_width')}"
                if d.get("pcie_gen_max"):
                    pcie += f" (max gen{d['pcie_gen_max']} x{d.get('pcie_width_max')})"
            g.add_row(str(d.get("gpu")), d.get("nvml_name") or d.get("name", "?"),
                      str(d.get("compute_capability", "")), str(d.get("multiprocessors", "")),
                      _fmt_bytes(d.get("memory_total")), _fmt_bytes(d.get("memory_free")), pcie,
                      str(d.get("driver", d.get("nvml", "-"))))
        con.print(g)
    else:
        con.print("GPUs: none visible to CUDA here")
    e = Table(title="emulated devices", title_justify="left")
    for c in ("device", "memory", "backed by", "note"):
        e.add_column(c)
    for d in info["emulated_devices"]:
        e.add_row(d["device"], _fmt_bytes(d["memory"]) if d["memory"] else "-", d["where"], d["note"])
    con.print(e)
    return 0


def _cuda_ver(v):
    if not v:
        return "-"
    v = int(v)
    return f"{v // 1000}.{(v % 1000) // 10}"


# ---------------------------------------------------------------------------------------------
# hmmgpu demo

def run_demo(mib=8, backend=None, quiet=False, seed=7, on_step=None):
    """The main job, end to end; returns a dict of steps, figures and checks.

    ``on_step(step_dict)`` is called as each step completes (the CLI's live table).
    """
    import hmmgpu
    from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
    from .drivers import dmirror
    from .drivers.mirrorgpu import MirrorGpu
    rw, priv = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
    rng = np.random.default_rng(seed)
    n = max(1024, (int(mib * (1 << 20)) // 8) // 1024 * 1024)   # float32 elements per array
    nbytes = n * 4
    npages = nbytes // PAGE_SIZE
    n_nodes = 1 << 12
    n_tree = 1 << 12
    chunk_pages = ((2 * npages + 4096 + 511) // 512) * 512
    ram = 4 * nbytes + (64 << 20)
    system = hmmgpu.System(backend=backend or "auto", ram_bytes=ram)
    cg = system.memcg("demo")
    proc = system.spawn(memcg=cg)
    trace.watch_notifiers(proc.mm)
    steps = []
    result = {"backend": system.backend_name,
                         "label": EMULATED_LABEL if system.backend_name == "numpy" else "GPU (cupy)",
                         "array_bytes": nbytes, "steps": steps, "checks": {}}

    def snap(tag):
        dm = state.get("dmdev")
        return {"tag": tag, "rss_pages": proc.rss, "memcg_bytes": cg.usage,
                "memcg_peak_bytes": cg.max_pages * PAGE_SIZE,
                "device_pages": dm.nr_allocated() if dm is not None else 0}

    def step(name, what, fn):
        t0 = time.perf_counter()
        with trace.span(name, trace.CAT_CPU, track="cpu/demo"):
            detail = fn() or {}
        s = {"step": name, "what": what, "seconds": time.perf_counter() - t0, **detail}
        steps.append(s)
        if on_step:
            on_step(s)
        return s

    state = {}

    def build():
        # arrays x and y, a linked list in shuffled heap order, a binary search tree: ordinary
        # pointers (virtual addresses of this process) written by the CPU
        x0 = rng.standard_normal(n).astype(np.float32)
        y0 = rng.standard_normal(n).astype(np.float32)
        hot = proc.mmap(2 * nbytes, rw, priv)
        proc.write(hot, x0)
        proc.write(hot + nbytes, y0)
        heap_bytes = n_nodes * 16 + n_tree * 32
        heap = proc.mmap(heap_bytes, rw, priv)
        order = rng.permutation(n_nodes)                  # node i lives in slot order[i]
        addr_of = heap + order.astype(np.int64) * 16
        nodes = np.zeros((n_nodes, 2), np.uint64)
        vals = rng.integers(1, 1 << 20, n_nodes).astype(np.uint64)
        nxt = np.zeros(n_nodes, np.uint64)
        nxt[:-1] = addr_of[1:].astype(np.uint64)
        nodes[order, 0] = nxt
        nodes[order, 1] = vals
        proc.write(heap, nodes)
        # a balanced BST over sorted keys, nodes {left, right, key, value} in shuffled slots
        keys = np.sort(rng.choice(1 << 30, n_tree, replace=False)).astype(np.uint64)
        tslot = rng.permutation(n_tree)
        taddr = heap + n_nodes * 16 + tslot.astype(np.int64) * 32
        tree = np.zeros((n_tree, 4), np.uint64)

        def build_bst(lo, hi):
            if lo >= hi:
                return 0
            mid = (lo + hi) // 2
            left, right = build_bst(lo, mid), build_bst(mid + 1, hi)
            tree[tslot[mid]] = (left, right, keys[mid], keys[mid] * np.uint64(3) + np.uint64(1))
            return int(taddr[mid])

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        root = build_bst(0, n_tree)
        proc.write(heap + n_nodes * 16, tree)
        other = proc.mmap(nbytes, rw, priv)
        state.update(x0=x0, y0=y0, hot=hot, heap=heap, heap_bytes=heap_bytes, head=int(addr_of[0]),
                     vals=vals, keys=keys, root=root, other=other)
        state["before"] = snap("after the CPU built the data set")
        return {"detail": f"x, y: {n:,} float32 each ({_mib(nbytes)} each); linked list of "
                          f"{n_nodes:,} nodes and a BST of {n_tree:,} nodes with CPU pointers"}

    step("build", "the CPU builds the data set in process memory", build)

    def attach():
        dmdev = dmirror.DMirrorDevice(system, memory="private", chunk_pages=chunk_pages, max_chunks=1)
        mirror = dmdev.open(proc)
        trace.watch_pagemap_ops(dmdev.ops, track="gpu0/migrate")
        lo = min(state["hot"], state["heap"], state["other"])
        hi = max(state["hot"] + 2 * nbytes, state["heap"] + state["heap_bytes"],
                 state["other"] + nbytes)
        lo &= ~(PAGE_SIZE - 1)
        hi = (hi + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        gpu = MirrorGpu(system, proc, dmdev, lo, hi)
        state.update(dmdev=dmdev, mirror=mirror, gpu=gpu)
        return {"detail": f"device memory {_mib(chunk_pages * PAGE_SIZE)} (device-private, "
                          f"memremap_pages); mirrors [0x{lo:x}, 0x{hi:x}) with an mmu interval notifier"}

    step("attach", "a device mirrors the process's address space (HMM)", attach)
    gpu = state["gpu"]

    def chase():
        r = gpu.jobs.list_chase([state["head"]], max_steps=n_nodes + 1)
        total, visited = int(r.value[0][0]), int(r.value[1][0])
        expect = int(state["vals"].sum(dtype=np.uint64))
        ok = total == expect and visited == n_nodes
        result["checks"]["linked list sum"] = ok
        t = gpu.jobs.tree_search(state["root"], state["keys"][::7])
        found = np.asarray(t.value[0], dtype=np.uint64)
        ok2 = bool((found == state["keys"][::7] * np.uint64(3) + np.uint64(1)).all())
        result["checks"]["tree lookups"] = ok2
        return {"detail": f"list: {visited:,} nodes, sum {total} ({'ok' if ok else 'WRONG'}); "
                          f"tree: {found.size} lookups ({'ok' if ok2 else 'WRONG'}); "
                          f"{r.faults + t.faults} device faults, serviced by hmm_range_fault "
                          f"(system pages mapped remotely, zero-copy)"}

    step("pointer chase", "device jobs follow the CPU's pointers in place (no copy)", chase)

    def migrate():
        m = state["mirror"]
        with trace.span("migrate_to_dev", trace.CAT_MIGRATE, track="gpu0/migrate", npages=2 * npages):
            r = m.migrate_to_dev(state["hot"], 2 * npages)
        s = m.snapshot(state["hot"], 2 * npages)
        local = int(np.count_nonzero((s.data & 0xF0) == dmirror.PROT_DEV_PRIVATE_LOCAL))
        result["checks"]["hot data on device"] = local == 2 * npages
        return {"detail": f"x, y: {r.cpages:,} pages migrated to device memory (migrate_vma); "
                          f"{local:,} now device-private", "pages": r.cpages}

    step("migrate hot data", "hot data migrates to the device (migrate_vma_*)", migrate)

    a = np.float32(2.5)

    def axpy():
        r = gpu.jobs.axpy(a, state["hot"], state["hot"] + nbytes, n)
        r2 = gpu.jobs.reduce_sum(state["hot"], nbytes)
        expect = int(state["x0"].view(np.uint32).astype(np.uint64).sum(dtype=np.uint64))
        result["checks"]["reduce over device pages"] = r2.value == expect
        return {"detail": f"y = {a}*x + y over {n:,} floats and a reduce over x, on device-local "
                          f"pages ({r.faults + r2.faults} faults, mapped local)"}

    step("device jobs", "axpy and reduce run on the device-resident pages", axpy)
    state["middle"] = snap("hot data on the device")

    def cpu_work():
        data = np.arange(nbytes // 8, dtype=np.int64)
        proc.write(state["other"], data)
        back = proc.read(state["other"], nbytes).view(np.int64)
        result["checks"]["cpu work"] = bool((back == data).all())
        snap_dev = state["mirror"].snapshot(state["hot"], 2 * npages)
        still = int(np.count_nonzero((snap_dev.data & 0xF0) == dmirror.PROT_DEV_PRIVATE_LOCAL))
        return {"detail": f"the CPU writes and reads {_mib(nbytes)} of other data; "
                          f"{still:,} hot pages stay on the device meanwhile"}

    step("cpu meanwhile", "the CPU keeps working on other data", cpu_work)

    def touch():
        y = proc.read(state["hot"] + nbytes, nbytes).view(np.float32)
        expect = a * state["x0"] + state["y0"]
        ok = bool(np.allclose(y, expect, rtol=1e-5, atol=1e-5))
        result["checks"]["axpy result"] = ok
        s = state["mirror"].snapshot(state["hot"] + nbytes, npages)
        back = int(np.count_nonzero((s.data & 0xF0) != dmirror.PROT_DEV_PRIVATE_LOCAL))
        return {"detail": f"the CPU reads y: {back:,} pages migrate back on CPU fault "
                          f"(migrate_to_ram); result {'ok' if ok else 'WRONG'}"}

    step("cpu touches results", "results migrate back when the CPU touches them", touch)

    def evict():
        dm = state["dmdev"]
        before = dm.nr_allocated()
        with trace.span("release", trace.CAT_EVICT, track="gpu0/migrate", npages=before):
            state["mirror"].release()
        x = proc.read(state["hot"], nbytes).view(np.float32)
        ok = bool(np.array_equal(x, state["x0"])) and dm.nr_allocated() == 0
        result["checks"]["evicted data intact"] = ok
        return {"detail": f"the driver gives its memory back: {before:,} device pages evicted to system "
                          f"memory (migrate_device_range); x {'intact' if ok else 'WRONG'}"}

    step("evict", "the device's memory is evicted back to the system", evict)

    state["after"] = snap("at the end")
    gpu.device.synchronize()
    result["rss_memcg"] = [state["before"], state["middle"], state["after"]]
    result["counters"] = trace.collect_counters(system, devices=[gpu], dmirror=_dmirror_counters(state["dmdev"]))
    result["notifier_events"] = trace.notifier_event_counts(proc.mm)
    result["ok"] = all(result["checks"].values())
    gpu.close()
    state["mirror"].close()
    proc.exit()
    return result


class _Counters:
    def __init__(self, d):
        self.counters = d


def _dmirror_counters(dmdev):
    return _Counters({"device_pages_allocated": dmdev.calloc, "device_pages_freed": dmdev.cfree,
                      "device_pages_in_use": dmdev.nr_allocated(), "chunks": len(dmdev.chunks)})


def cmd_demo(opt):
    con = _console()
    from rich.live import Live
    from rich.table import Table

    def table(steps):
        t = Table(title="hmmgpu demo: the main job", title_justify="left", expand=False)
        t.add_column("step", style="bold")
        t.add_column("time", justify="right")
        t.add_column("what happened")
        for s in steps:
            t.add_row(s["step"], f"{s['seconds'] * 1e3:,.1f} ms", s.get("detail", ""))
        return t

    shown = []
    tr = trace.enable() if opt.trace else None
    try:
        with Live(table(shown), console=con, refresh_per_second=8, transient=False) as live:
            def on_step(s):
                shown.append(s)
                live.update(table(shown))
            res = run_demo(mib=opt.mib, backend=opt.backend, on_step=on_step)
        con.print()
    finally:
        if tr is not None:
            trace.disable()
    if tr is not None:
        n = tr.write(opt.trace, {"command": "hmmgpu demo"})
        res["trace"] = {"path": opt.trace, "events": n}
    if opt.json:
        _emit_json(res)
    _print_demo_summary(con, res)
    if tr is not None:
        _print_trace_summary(con, tr, opt.trace)
    return 0 if res["ok"] else 1


def _print_demo_summary(con, res):
    from rich.table import Table
    label = res["label"]
    con.print(f"backend: [bold]{res['backend']}[/] -- {label}")
    t = Table(title="memory accounting (pages; memcg in bytes)", title_justify="left")
    for c in ("when", "rss anon", "rss file", "rss shmem", "memcg 'demo'", "memcg peak", "in device memory"):
        t.add_column(c, justify="right" if c != "when" else "left")
    for s in res["rss_memcg"]:
        r = s["rss_pages"]
        t.add_row(s["tag"], f"{r.get('anon', 0):,}", f"{r.get('file', 0):,}", f"{r.get('shmem', 0):,}",
                  _fmt_bytes(s["memcg_bytes"]), _fmt_bytes(s["memcg_peak_bytes"]),
                  f"{s.get('device_pages', 0):,} pages")
    con.print(t)
    print_counters(con, res["counters"], res.get("notifier_events"))
    checks = ", ".join(f"{k}: {'ok' if v else '[red]FAILED[/]'}" for k, v in res["checks"].items())
    con.print(f"checks: {checks}")


def _print_trace_summary(con, tracer, path):
    """What the trace holds, by category and event name (the busiest first)."""
    from rich.table import Table
    summary = tracer.summary()
    t = Table(title=f"trace: {len(tracer)} events -> {path} (open in https://ui.perfetto.dev)",
              title_justify="left")
    for c, j in (("category", "left"), ("event", "left"), ("count", "right"), ("total time", "right")):
        t.add_column(c, justify=j)
    groups = {}
    for (cat, name), (n, dur) in summary.items():
        key = (cat, name.split(" #")[0])          # job rounds: "axpy #3 round 1" -> "axpy"
        a, b = groups.get(key, (0, 0.0))
        groups[key] = (a + n, b + dur)
    for (cat, name), (n, dur) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]:
        t.add_row(cat, name, f"{n:,}", f"{dur / 1e3:,.1f} ms" if dur else "-")
    if tracer.dropped:
        t.caption = f"{tracer.dropped:,} events did not fit and were dropped"
    con.print(t)


def print_counters(con, counters, notifier_events=None):
    from rich.table import Table
    if not counters and not notifier_events:
        return
    t = Table(title="counters (UVM fault_stats names where they apply)", title_justify="left")
    t.add_column("source", style="bold")
    t.add_column("counter")
    t.add_column("value", justify="right")
    for src, c in counters.items():
        first = True
        for k, v in c.items():
            t.add_row(src if first else "", k, f"{v:,}" if isinstance(v, int) else f"{v:.3g}")
            first = False
    if notifier_events:
        first = True
        for k, v in sorted(notifier_events.items()):
            t.add_row("mmu notifier" if first else "", k, f"{v:,}")
            first = False
    con.print(t)


# ---------------------------------------------------------------------------------------------
# hmmgpu bench

def _import_bench():
    """The bench package lives beside hmmgpu/ in a source checkout (pip install -e .)."""
    try:
        import bench.bench as b
        return b
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "bench", "bench.py")):
        sys.path.insert(0, root)
        for mod in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
            del sys.modules[mod]
        import bench.bench as b
        return b
    raise SystemExit("hmmgpu bench: the benchmark suites (bench/) ship with the source checkout; "
                     "clone the repository and `pip install -e .` there")


def cmd_bench(opt):
    b = _import_bench()
    if opt.list:
        con = _console(stderr=False)
        for name, suite in b.SUITES.items():
            con.print(f"[bold]{name:10s}[/] {suite.DESCRIPTION}")
        return 0
    suites = opt.suites or list(b.SUITES)
    unknown = [s for s in suites if s not in b.SUITES]
    if unknown:
        raise SystemExit(f"hmmgpu bench: unknown suite(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(b.SUITES)} (hmmgpu bench --list)")
    con = _console()
    tr = trace.enable() if opt.trace else None
    try:
        res = b.run(suites, quick=opt.quick, backend=opt.backend, repeat=opt.repeat,
                    console=None if opt.no_progress else con)
    finally:
        if tr is not None:
            trace.disable()
    if tr is not None:
        res["trace"] = {"path": opt.trace, "events": tr.write(opt.trace, {"command": "hmmgpu bench"})}
    b.print_results(res, con)
    if opt.plot:
        from rich.markup import escape
        con.print(escape(b.plot(res, opt.plot)))
    if tr is not None:
        _print_trace_summary(con, tr, opt.trace)
    if opt.json:
        _emit_json(res)
    return 0


# ---------------------------------------------------------------------------------------------
# argument parsing

_EPILOG = """\
examples:
  hmmgpu info                         what runs here: backend and why, CUDA, GPUs, emulated devices
  hmmgpu demo                         the main job, end to end (works with or without a GPU)
  hmmgpu demo --trace demo.json       ... and a Chrome trace of faults, migrations, invalidations
  hmmgpu bench --quick                every suite at small sizes (under a minute on 2 CPU cores)
  hmmgpu bench migration scaling      two suites at full size
  hmmgpu bench --json > results.json  machine-readable results on stdout (tables go to stderr)
  HMMGPU_BACKEND=numpy hmmgpu demo    force the NumPy fallback on a GPU machine

On the NumPy fallback every figure is labelled "emulated (numpy fallback)": device memory is
host memory and timings are those of NumPy, not of a GPU.
"""


_SUITES_HELP = """\
suites:
  migration  migrate anonymous pages to device memory and back, scattered and contiguous frames
             (baseline: one pinned cudaMemcpy of the same bytes; fallback: a NumPy gather)
  jobs       a reduce job walking the device page table over device-resident and remote system
             pages (baseline: the same kernel on a flat array / a zero-copy read)
  faults     a job faulting on host-resident memory (remote map, or migrate on fault) and on
             untouched memory (baseline: CUDA managed memory, same access pattern)
  prefetch   explicit migrate + map of a range (baseline: cudaMemPrefetchAsync of managed memory)
  scaling    per-page cost of fault-in, fork, munmap, hmm_range_fault, migrate, 2^10..2^20 pages
             (baseline: itself at the largest size; target: flat within 1.5x)
  fallback   the NumPy backend's migration of scattered pages vs a NumPy gather (target >= 0.7)

examples:
  hmmgpu bench --quick --json > quick.json
  hmmgpu bench migration faults --repeat 9 --plot ratios.png
  hmmgpu bench scaling --trace scaling.json     (open in https://ui.perfetto.dev)
"""


def _wrap(text, width=92):
    import textwrap
    return textwrap.fill(" ".join(text.split()), width)


def build_parser():
    p = argparse.ArgumentParser(
        prog="hmmgpu", description="Linux HMM (Heterogeneous Memory Management) emulated with a real "
                                   "GPU in the loop (CuPy), or a NumPy fallback.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("--backend", choices=("auto", "cupy", "numpy"), default=None,
                        help="device backend (default: $HMMGPU_BACKEND, else auto: CuPy when a CUDA GPU "
                             "answers, else NumPy)")
        sp.add_argument("--json", action="store_true", help="print the results as JSON on stdout")

    sp = sub.add_parser("info", help="backend in use and why, CUDA/driver versions, GPUs, emulated devices",
                        description=_wrap("Which backend runs here and why (hmmgpu.backend_info()), CuPy/CUDA/"
                                    "driver versions, each GPU's name, memory and PCIe link (via pynvml "
                                    "when installed) and the emulated devices."))
    common(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("demo", help="the main job, end to end",
                        description=_wrap(
                            "A process builds arrays, a linked list and a tree with ordinary pointers "
                            "in its memory; a device mirrors the address space (HMM: mmu interval "
                            "notifier + hmm_range_fault) and runs jobs on it with no copy; hot data "
                            "migrates to device memory (migrate_vma); the CPU works on other data, then "
                            "reads the results, which migrate back on CPU fault; the driver then evicts what "
                            "is left.  Prints each step, rss and memcg along the way, and the device "
                            "counters; every result is checked against NumPy (exit status 1 if one is wrong)."),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("--mib", type=float, default=8, help="size of each hot array in MiB (default 8)")
    sp.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("bench", help="benchmark suites, each figure beside its same-run baseline",
                        description=_wrap(
                            "Run benchmark suites (all when none is named).  Every figure is printed as a "
                            "ratio to a baseline measured in the same run (pinned cudaMemcpy, the same "
                            "kernel on a flat array, zero-copy read, CUDA managed memory; a NumPy gather on "
                            "the fallback), ratio first, absolute figures second; medians of repeats after "
                            "a warm-up.  Suites whose pieces are missing say so instead of printing numbers."),
                        epilog=_SUITES_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all)")
    sp.add_argument("--quick", action="store_true", help="small sizes, few repeats: under a minute on 2 CPU cores")
    sp.add_argument("--repeat", type=int, default=None, help="timed repeats per figure (median is reported)")
    sp.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratios (needs matplotlib: "
                                                       "pip install -e '.[plot]')")
    sp.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace of the run")
    sp.add_argument("--list", action="store_true", help="list the suites and exit")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    p = build_parser()
    opt = p.parse_args(argv)
    if not getattr(opt, "func", None):
        p.print_help()
        return 0
    try:
        return opt.func(opt)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
