"""``hmmgpu demo``: the main job, end to end, with a live table.

A process builds arrays, a linked list and a tree with ordinary pointers in its memory; the UVM
driver (``hmmgpu.drivers.uvm.UvmDriver``: device memory of its own, an mmu interval notifier,
``hmm_range_fault`` and ``migrate_vma`` in its fault path) mirrors the address space and runs jobs
on it with no copy: the pointer-chased heap prefers the CPU (cudaMemAdvise), so its pages are
mapped remotely; hot data is prefetched to device memory (cudaMemPrefetchAsync); the CPU works on
other data, then reads the results, which migrate back on CPU fault; closing the driver evicts
what is left.  Every result is checked against NumPy.
"""
import argparse
import sys
import time

import numpy as np

from .. import trace
from ._common import (EMULATED_LABEL, UserError, available_ram_bytes, check_backend, check_writable, console,
                      emit_json, fmt_bytes, gpu_free_bytes, mib, print_trace_summary, recording, trace_written, wrap)

HELP = "the main job, end to end"
DESCRIPTION = ("A process builds arrays, a linked list and a tree with ordinary pointers in its memory; the "
               "UVM driver mirrors the address space (HMM: mmu interval notifier + hmm_range_fault) and runs "
               "jobs on it with no copy; hot data is prefetched to device memory (migrate_vma); the CPU "
               "works on other data, then reads the results, which migrate back on CPU fault; closing the "
               "driver evicts what is left.  Prints each step, rss and memcg along the way, where the device "
               "faults went, and the counters; every result is checked against NumPy (exit status 1 if "
               "one is wrong).")
DEFAULT_MIB = 4


def add_parser(sub, common):
    sp = sub.add_parser("demo", help=HELP, description=wrap(DESCRIPTION),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    common(sp)
    sp.add_argument("--mib", type=float, default=DEFAULT_MIB, metavar="N",
                    help=f"size of each of the two hot float32 arrays x and y, in MiB (default {DEFAULT_MIB})")
    sp.add_argument("--trace", metavar="FILE.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    sp.set_defaults(func=cmd_demo)
    return sp


def demo_sizes(mib_each):
    """What a demo of ``mib_each`` MiB arrays allocates: a dict of element and byte counts."""
    from ..constants import PAGE_SIZE
    n = max(1024, int(round(mib_each * (1 << 20) / 4 / 1024)) * 1024)   # float32 elements per array
    nbytes = n * 4
    npages = nbytes // PAGE_SIZE
    chunk_pages = ((2 * npages + 4096 + 511) // 512) * 512               # device memory: x, y, slack
    ram = 4 * nbytes + (64 << 20)                                         # x, y, other data, heap, slack
    # the emulation touches its RAM and device arenas; the checks keep NumPy copies of x, y, a result
    return {"n": n, "nbytes": nbytes, "npages": npages, "chunk_pages": chunk_pages, "ram_bytes": ram,
            "device_bytes": chunk_pages * PAGE_SIZE, "host_copies": 3 * nbytes}


def check_demo_fits(mib_each, backend):
    """UserError, before anything is allocated, when the demo cannot fit in this machine's memory."""
    if not mib_each > 0:
        raise UserError(f"--mib must be a positive number of MiB (got {mib_each:g})")
    s = demo_sizes(mib_each)
    host = s["ram_bytes"] + s["host_copies"] + (s["device_bytes"] if backend == "numpy" else 0)
    avail = available_ram_bytes()
    if avail is not None and host > avail:
        raise UserError(f"--mib {mib_each:g} needs about {fmt_bytes(host)} of host memory but "
                        f"{fmt_bytes(avail)} is available; try --mib {DEFAULT_MIB}")
    if backend == "cupy":
        free = gpu_free_bytes()
        if free is not None and s["device_bytes"] > free:
            raise UserError(f"--mib {mib_each:g} needs {fmt_bytes(s['device_bytes'])} of GPU memory but "
                            f"{fmt_bytes(free)} is free; try --mib {DEFAULT_MIB}")



def run_demo(mib_each=DEFAULT_MIB, backend=None, seed=7, on_step=None):
    """The main job, end to end; returns a dict of steps, figures and checks.

    ``on_step(step_dict)`` is called as each step completes (the CLI's live table).
    """
    import hmmgpu
    from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
    from ..drivers import uvm
    rw, priv = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
    rng = np.random.default_rng(seed)
    sizes = demo_sizes(mib_each)
    n, nbytes, npages = sizes["n"], sizes["nbytes"], sizes["npages"]
    n_nodes = 1 << 12
    n_tree = 1 << 12
    system = hmmgpu.System(backend=backend or "auto", ram_bytes=sizes["ram_bytes"])
    cg = system.memcg("demo")
    proc = system.spawn(memcg=cg)
    trace.watch_notifiers(proc.mm)
    steps = []
    result = {"backend": system.backend_name,
              "label": EMULATED_LABEL if system.backend_name == "numpy" else "GPU (cupy)",
              "array_bytes": nbytes, "steps": steps, "checks": {}}
    state = {}

    def snap(tag):
        drv = state.get("gpu")
        return {"tag": tag, "rss_pages": proc.rss, "memcg_bytes": cg.usage,
                "memcg_peak_bytes": cg.max_pages * PAGE_SIZE,
                "device_pages": device_pages(drv) if drv is not None else 0}

    def step(name, what, fn):
        drv = state.get("gpu")
        hw = drv.device(0).hw if drv is not None else None
        before = dict(hw.counters) if hw is not None else None
        m0 = drv.modelled_time if drv is not None else None
        t0 = time.perf_counter()
        with trace.span(name, trace.CAT_CPU, track="cpu/demo"):
            detail = fn() or {}
        s = {"step": name, "what": what, "seconds": time.perf_counter() - t0, **detail}
        if before is not None:
            s["modelled_s"] = drv.modelled_time - m0      # the driver's emulated clock (h100 profile)
            s["faults"] = fault_figures(before, hw.counters, s.pop("serviced", 0))
        steps.append(s)
        if on_step:
            on_step(s)
        return s

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
        return {"detail": f"x, y: {n:,} float32 each ({mib(nbytes)} each); linked list of "
                          f"{n_nodes:,} nodes and a BST of {n_tree:,} nodes with CPU pointers"}

    step("build", "the CPU builds the data set in process memory", build)

    def attach():
        drv = uvm.UvmDriver(system, proc, device_bytes=sizes["device_bytes"], seed=seed)
        for pgmap in driver_pgmaps(system, drv):
            trace.watch_pagemap_ops(pgmap.ops, track="gpu0/migrate")
        # the pointer-chased heap stays in system memory: the device maps it remotely (zero-copy)
        heap_len = (state["heap_bytes"] + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        drv.advise(state["heap"], heap_len, uvm.SET_PREFERRED_LOCATION, device=uvm.CPU)
        state["gpu"] = drv
        return {"detail": f"device memory {mib(sizes['device_bytes'])} (device-private, memremap_pages, "
                          f"2 MiB root chunks); mirrors the whole address space with an mmu interval notifier; "
                          f"the heap prefers the CPU (cudaMemAdvise SetPreferredLocation)"}

    step("attach", "the UVM driver mirrors the process's address space (HMM)", attach)
    gpu = state["gpu"]

    def on_device(addr, count):
        """How many of the ``count`` pages at ``addr`` the device maps in its own memory."""
        d = gpu.device(0)
        ent = d.pt.lookup((addr >> 12) + np.arange(count, dtype=np.int64))
        return int(np.count_nonzero((ent != 0) & d.hw.owns(ent >> np.uint64(12))))

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
                          f"{r.faults + t.faults} page faults serviced by hmm_range_fault "
                          f"(system pages mapped remotely, zero-copy; 'device faults' below)",
                "serviced": r.faults + t.faults}

    step("pointer chase", "device jobs follow the CPU's pointers in place (no copy)", chase)

    def prefetch():
        with trace.span("prefetch", trace.CAT_MIGRATE, track="gpu0/migrate", npages=2 * npages):
            moved = gpu.prefetch(state["hot"], 2 * nbytes)
        local = on_device(state["hot"], 2 * npages)
        result["checks"]["hot data on device"] = local == 2 * npages
        return {"detail": f"x, y: {moved:,} pages prefetched to device memory (cudaMemPrefetchAsync: "
                          f"migrate_vma) and mapped; {local:,} now device-local", "pages": moved}

    step("migrate hot data", "hot data migrates to the device (prefetch: migrate_vma_*)", prefetch)

    a = np.float32(2.5)

    def axpy():
        r = gpu.jobs.axpy(a, state["hot"], state["hot"] + nbytes, n)
        r2 = gpu.jobs.reduce_sum(state["hot"], nbytes)
        expect = int(state["x0"].view(np.uint32).astype(np.uint64).sum(dtype=np.uint64))
        result["checks"]["reduce over device pages"] = r2.value == expect
        return {"detail": f"y = {a}*x + y over {n:,} floats and a reduce over x, on device-local "
                          f"pages ({r.faults + r2.faults} page faults: the prefetch mapped them)",
                "serviced": r.faults + r2.faults}

    step("device jobs", "axpy and reduce run on the device-resident pages", axpy)
    state["middle"] = snap("hot data on the device")

    def cpu_work():
        data = np.arange(nbytes // 8, dtype=np.int64)
        proc.write(state["other"], data)
        back = proc.read(state["other"], nbytes).view(np.int64)
        result["checks"]["cpu work"] = bool((back == data).all())
        still = on_device(state["hot"], 2 * npages)
        return {"detail": f"the CPU writes and reads {mib(nbytes)} of other data; "
                          f"{still:,} hot pages stay on the device meanwhile"}

    step("cpu meanwhile", "the CPU keeps working on other data", cpu_work)

    def touch():
        y = proc.read(state["hot"] + nbytes, nbytes).view(np.float32)
        expect = a * state["x0"] + state["y0"]
        ok = bool(np.allclose(y, expect, rtol=1e-5, atol=1e-5))
        result["checks"]["axpy result"] = ok
        back = npages - on_device(state["hot"] + nbytes, npages)
        return {"detail": f"the CPU reads y: {back:,} pages migrate back on CPU fault "
                          f"(migrate_to_ram); result {'ok' if ok else 'WRONG'}"}

    step("cpu touches results", "results migrate back when the CPU touches them", touch)

    def evict():
        before = device_pages(gpu)
        with trace.span("close", trace.CAT_EVICT, track="gpu0/migrate", npages=before):
            gpu.close()
        x = proc.read(state["hot"], nbytes).view(np.float32)
        left = device_pages(gpu)
        ok = bool(np.array_equal(x, state["x0"])) and left == 0
        result["checks"]["evicted data intact"] = ok
        return {"detail": f"the driver closes and gives its memory back: {before:,} device pages evicted "
                          f"to system memory (migrate_device_range); x {'intact' if ok else 'WRONG'}"}

    step("evict", "the device's memory is evicted back to the system", evict)

    state["after"] = snap("at the end")
    result["rss_memcg"] = [state["before"], state["middle"], state["after"]]
    result["counters"] = trace.collect_counters(system, devices=[gpu])
    result["fault_buffer_entries"] = gpu.device(0).hw.fault_buffer.capacity
    result["notifier_events"] = trace.notifier_event_counts(proc.mm)
    result["ok"] = all(result["checks"].values())
    proc.exit()
    return result


def device_pages(drv):
    """Pages of the driver's device memory in use (its figures: device_bytes less what is free)."""
    from ..constants import PAGE_SIZE
    s = drv.stats()
    return (s["device_bytes"] - s["device_free_bytes"]) // PAGE_SIZE


def driver_pgmaps(system, drv):
    """The dev_pagemaps that hold the driver's device memory (the pgmaps it hotplugged)."""
    return [p for p in system.phys.pgmaps if getattr(p, "owner", None) is drv]


def fault_figures(before, after, serviced):
    """Where a step's device faults went, from the device's fault_stats before and after it.

    Every lane that misses writes one fault record, unless the fault buffer is full (an
    overflow: the lane faults again when it is replayed); records of a page already seen in the
    same batch are duplicates; the rest are the faults the driver serviced.  So
    ``lanes = records + overflows`` and ``records = duplicates + serviced``.
    """
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    records = d.get("num_read_faults", 0) + d.get("num_write_faults", 0) + d.get("num_atomic_faults", 0)
    return {"lanes": records + d.get("num_buffer_overflows", 0), "records": records,
            "overflows": d.get("num_buffer_overflows", 0), "duplicates": d.get("num_duplicate_faults", 0),
            "serviced": int(serviced), "batches": d.get("num_fault_batches", 0),
            "replays": d.get("num_replays", 0)}


def cmd_demo(opt):
    backend = check_backend(opt.backend)
    check_demo_fits(opt.mib, backend)
    if opt.trace:
        check_writable(opt.trace, "the trace")
    con = console(json_on_stdout=opt.json)
    from rich.live import Live
    from rich.table import Table

    def table(steps):
        t = Table(title="hmmgpu demo: the main job", title_justify="left", expand=False,
                  caption="time: the emulation's wall clock; modelled: the UVM driver's emulated clock (its cost "
                          "model, H100 profile)", caption_justify="left")
        t.add_column("step", style="bold")
        t.add_column("time", justify="right")
        t.add_column("modelled", justify="right")
        t.add_column("what happened")
        for s in steps:
            m = s.get("modelled_s")
            t.add_row(s["step"], f"{s['seconds'] * 1e3:,.1f} ms", "-" if m is None else f"{m * 1e3:,.3f} ms",
                      s.get("detail", ""))
        return t

    shown = []
    with recording(opt.trace) as tr:
        with Live(table(shown), console=con, refresh_per_second=8, transient=False) as live:
            def on_step(s):
                shown.append(s)
                live.update(table(shown))
            res = run_demo(opt.mib, backend=backend, on_step=on_step)
        con.print()
    if tr is not None:
        res["trace"] = trace_written(tr, opt.trace, "hmmgpu demo")
    print_demo_summary(con, res)
    if tr is not None:
        print_trace_summary(con, tr, opt.trace)
    if opt.json:
        emit_json(res)
    return 0 if res["ok"] else 1


def print_demo_summary(con, res):
    from rich.table import Table
    label = res["label"]
    con.print(f"backend: [bold]{res['backend']}[/] -- {label}")
    t = Table(title="memory accounting (pages; memcg in bytes)", title_justify="left")
    for c in ("when", "rss anon", "rss file", "rss shmem", "memcg 'demo'", "memcg peak", "in device memory"):
        t.add_column(c, justify="right" if c != "when" else "left")
    for s in res["rss_memcg"]:
        r = s["rss_pages"]
        t.add_row(s["tag"], f"{r.get('anon', 0):,}", f"{r.get('file', 0):,}", f"{r.get('shmem', 0):,}",
                  fmt_bytes(s["memcg_bytes"]), fmt_bytes(s["memcg_peak_bytes"]),
                  f"{s.get('device_pages', 0):,} pages")
    con.print(t)
    print_faults(con, res["steps"], res.get("fault_buffer_entries"))
    print_counters(con, res["counters"], res.get("notifier_events"))
    checks = ", ".join(f"{k}: {'ok' if v else '[red]FAILED[/]'}" for k, v in res["checks"].items())
    con.print(f"checks: {checks}")


def print_faults(con, steps, entries=None):
    """The device faults of each step, so that the counters below add up."""
    from rich.table import Table
    rows = [s for s in steps if s.get("faults", {}).get("lanes")]
    if not rows:
        return
    t = Table(title="device faults, step by step", title_justify="left",
              caption=f"lanes = records + overflows (a lane that finds the fault buffer"
                      f"{f' ({entries:,} entries)' if entries else ''} full faults again on replay); "
                      "records = duplicates + serviced (a duplicate names a page already in its batch); the "
                      "driver migrates the serviced pages or maps them where they are (hmm_range_fault)",
              caption_justify="left")
    for c in ("step", "lanes that faulted", "fault records", "overflows", "duplicates", "serviced",
              "batches", "replays"):
        t.add_column(c, justify="left" if c == "step" else "right")
    tot = {}
    for s in rows:
        f = s["faults"]
        for k, v in f.items():
            tot[k] = tot.get(k, 0) + v
        t.add_row(s["step"], *(f"{f[k]:,}" for k in ("lanes", "records", "overflows", "duplicates", "serviced",
                                                       "batches", "replays")))
    t.add_row("[bold]total[/]", *(f"{tot[k]:,}" for k in ("lanes", "records", "overflows", "duplicates",
                                                            "serviced", "batches", "replays")))
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


