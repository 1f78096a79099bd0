"""What every command shares: where output goes, the checks made before any work starts, formats.

Human output (tables) goes to stdout, so ``hmmgpu demo > out.txt`` keeps it; with ``--json``
the JSON takes stdout and the tables move to stderr.  Progress bars always go to stderr.  A
user error is one line on stderr and exit status 2, found before anything is allocated or run.
"""
import contextlib
import json
import os
import sys

EMULATED_LABEL = "emulated (numpy fallback)"
CUDA_EXTRAS_HINT = "pip install 'hmmgpu[cuda12]' (or '[cuda13]'; from a checkout: pip install -e '.[cuda12]')"
PLOT_HINT = "pip install 'hmmgpu[plot]' (or pip install matplotlib)"


class UserError(Exception):
    """A mistake in how the command was called: printed as one line, exit status 2."""


def console(json_on_stdout=False):
    """The console for tables: stdout, or stderr when ``--json`` owns stdout."""
    from rich.console import Console
    stderr = bool(json_on_stdout)
    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):   # logs, pipes: room for the tables
        con = Console(stderr=stderr, highlight=False, width=max(con.width, 200))
    return con


def progress_console():
    """Progress bars: stderr, and only on a terminal (a log file gets no bar frames)."""
    from rich.console import Console
    con = Console(stderr=True, highlight=False)
    return con if con.is_terminal else None


def emit_json(obj):
    from .. import trace
    sys.stdout.write(json.dumps(trace._jsonable(obj), indent=1) + "\n")
    sys.stdout.flush()


def mib(nbytes):
    return f"{nbytes / (1 << 20):,.1f} MiB"


def fmt_bytes(n):
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


# -- checks made before any work ------------------------------------------------------------------

def check_backend(requested, usable=True):
    """The backend a command will use: ``--backend``, else $HMMGPU_BACKEND, else auto.

    Raises UserError naming the problem (an unknown name; with ``usable``, CuPy missing or
    without a GPU, with the install hint) before anything is built; returns the backend's name
    (the requested name when ``usable`` is False).
    """
    from ..device.backend import BACKENDS, env_backend, get_backend
    name, where = requested, "--backend"
    if name is None:
        name, where = env_backend(), "HMMGPU_BACKEND"
    if name is None:
        name = "auto"
    if name not in BACKENDS:
        raise UserError(f"{where}={name!r} is not a backend: choose {', '.join(BACKENDS)}"
                        + (" (or unset it)" if where == "HMMGPU_BACKEND" else ""))
    if not usable:
        return name
    try:
        return get_backend(name).name
    except Exception as e:
        hint = f"; {CUDA_EXTRAS_HINT}" if name == "cupy" else ""
        raise UserError(f"{where}={name}: {e}{hint}") from None


def check_writable(path, what):
    """Fail now, not after the run, if ``path`` cannot be written."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    if os.path.isdir(path):
        raise UserError(f"cannot write {what} to {path}: it is a directory")
    if not os.path.isdir(d):
        raise UserError(f"cannot write {what} to {path}: directory {d} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {what} to {path}: permission denied")
    if not os.path.exists(path) and not os.access(d, os.W_OK):
        raise UserError(f"cannot write {what} to {path}: directory {d} is not writable")


def available_ram_bytes():
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_free_bytes():
    """Free memory of the current CUDA device (None without one)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:
        return None


def wrap(text, width=92):
    """A help paragraph, re-flowed."""
    import textwrap
    return textwrap.fill(" ".join(text.split()), width)


@contextlib.contextmanager
def recording(path):
    """``--trace PATH``: the trace recorder while the body runs (None without a path); tracing
    stops when the body ends, however it ends."""
    from .. import trace
    tr = trace.enable() if path else None
    try:
        yield tr
    finally:
        if tr is not None:
            trace.disable()


def trace_written(tracer, path, command):
    """Write what ``tracer`` holds to ``path``; the entry the command's --json gives it."""
    return {"path": path, "events": tracer.write(path, {"command": command})}


def print_trace_summary(con, tracer, path):
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
