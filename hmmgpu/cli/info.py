"""``hmmgpu info``: which backend runs here and why, versions, GPUs, the emulated devices."""
import sys

import numpy as np

from ._common import CUDA_EXTRAS_HINT, EMULATED_LABEL, check_backend, console, emit_json, fmt_bytes, wrap

HELP = "backend in use and why, CUDA/driver versions, GPUs, emulated devices"
DESCRIPTION = ("Which backend runs here and why (hmmgpu.backend_info()), CuPy/CUDA/driver versions, each "
               "GPU's name, memory and PCIe link (via pynvml when installed) and the emulated devices.")


def add_parser(sub, common):
    sp = sub.add_parser("info", help=HELP, description=wrap(DESCRIPTION))
    common(sp)
    sp.set_defaults(func=cmd_info)
    return sp


def gather_info(backend=None):
    """Facts for ``hmmgpu info`` as a dict (never raises for a missing optional piece)."""
    import hmmgpu
    from ..device.backend import backend_info, get_backend
    bi = backend_info()
    chosen = backend or bi["env"] or "auto"
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
                from ..kernels.backend import cuda_info
                gpus.append(cuda_info(g))
            except Exception as e:
                gpus.append({"gpu": g, "error": f"{type(e).__name__}: {e}"})
        out["gpus"] = gpus
        try:                        # what compiles the kernels (auto needs it to pick cupy)
            from ..kernels.module import nvrtc_version
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
    try:
        from ..drivers import uvm
        out["uvm_knobs"] = uvm.default_knobs()
        out["uvm_policy_names"] = {f: sorted(names) for f, names in uvm.registry.POLICY_NAMES.items()}
    except Exception as e:
        out["uvm_knobs_error"] = f"{type(e).__name__}: {e}"
    return out


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def _emulated_devices(backend_name):
    """What an emulated machine is made of by default (nothing is allocated to find out)."""
    from ..constants import PAGE_SIZE
    from ..system import DEFAULT_RAM_BYTES
    rows = []
    host_kind = ("pinned, mapped host memory (a GPU kernel reads it over PCIe, zero-copy)"
                 if backend_name == "cupy" else "a NumPy array")
    rows.append({"device": "system RAM", "memory": DEFAULT_RAM_BYTES,
                 "where": host_kind, "note": "hmmgpu.System(ram_bytes=...)"})
    try:
        from ..drivers import dmirror
        rows.append({"device": "dmirror (lib/test_hmm.c)",
                     "memory": dmirror.DEVMEM_CHUNK_PAGES * PAGE_SIZE,
                     "where": "GPU memory" if backend_name == "cupy" else "a NumPy array",
                     "note": "per chunk (memremap_pages); private or coherent; grows on demand"})
    except Exception as e:
        rows.append({"device": "dmirror", "memory": None, "where": "-",
                     "note": f"not available: {type(e).__name__}: {e}"})
    try:
        from ..device import faults as _f
        from ..device import pagetable as _pt
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
    check_backend(opt.backend, usable=False)      # info reports why a backend cannot run
    info = gather_info(opt.backend)
    if opt.json:
        emit_json(info)
        return 0
    from rich.markup import escape
    from rich.table import Table
    con = console()
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
                                           + CUDA_EXTRAS_HINT))
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
                      fmt_bytes(d.get("memory_total")), fmt_bytes(d.get("memory_free")), pcie,
                      str(d.get("driver", d.get("nvml", "-"))))
        con.print(g)
    else:
        con.print("GPUs: none visible to CUDA here")
    e = Table(title="emulated devices", title_justify="left")
    for c in ("device", "memory", "backed by", "note"):
        e.add_column(c)
    for d in info["emulated_devices"]:
        e.add_row(d["device"], fmt_bytes(d["memory"]) if d["memory"] else "-", d["where"], d["note"])
    con.print(e)
    if info.get("uvm_knobs"):
        k = Table(title="UVM driver policies (knobs are nvidia-uvm module parameters, with its defaults)",
                  title_justify="left")
        for c in ("policy", "knob", "default"):
            k.add_column(c)
        for family, knobs in info["uvm_knobs"].items():
            rows = [(n, str(v)) for n, v in knobs.items() if n != "policy"] or [("-", "-")]
            for i, (name, value) in enumerate(rows):
                k.add_row(f"{family}: {knobs['policy']}" if i == 0 else "", name, value)
        con.print(k)
        names = info.get("uvm_policy_names") or {}
        if names:
            con.print("policies by name (hmmgpu run --policy FAMILY=NAME): " + "; ".join(
                f"{f}: {', '.join(n)}" for f, n in names.items()))
    return 0


def _cuda_ver(v):
    if not v:
        return "-"
    v = int(v)
    return f"{v // 1000}.{(v % 1000) // 10}"
