"""Observability: counters with NVIDIA UVM's names and an event trace in Chrome's format.

Two things stand for what a UVM developer reads on a real machine:

* **counters**, like ``/proc/driver/nvidia-uvm/gpus/UVM-GPU-.../fault_stats``
  (``num_read_faults``, ``num_write_faults``, ``num_duplicate_faults``,
  ``num_fault_batches``, ``num_replays``, ``num_pages_in``, ``num_pages_out``,
  ...).  The layers keep their own counters; :func:`read_counters` reads those of
  any device kind through one interface (an ``EmulatedDevice``, a dmirror device, a
  UvmDriver, a DMA engine), and :func:`collect_counters` gathers them for a whole
  System, finding every driver that hotplugged device memory by itself.
* **an event trace**: a timeline of faults, fault-batch services, migrations,
  mmu-notifier invalidations, evictions and device job slices, written as
  Chrome trace JSON (``hmmgpu ... --trace FILE.json``) that Perfetto
  (https://ui.perfetto.dev) and ``chrome://tracing`` open.

The tracer is global and costs one attribute test when it is off, so any
layer may call it on a hot path::

    from hmmgpu import trace
    trace.event("migrate", "migrate", ts_us, dur_us, track="gpu0", npages=n)
    with trace.span("service", "fault", track="gpu0", batch=len(faults)):
        ...
    if trace.enabled:                 # skip building expensive arguments
        trace.instant("fault", "fault", track="gpu0", vaddr=hex(a))

Timestamps are microseconds on :func:`now_us`'s clock (``time.perf_counter``,
zero when tracing was enabled).  A layer that measured device time with CUDA
events passes its own ``ts_us``/``dur_us`` on that clock.

mmu-notifier invalidations come from ``hmmgpu.mm``, which keeps a bounded
record per address space (``mm.notifiers.events``).  :func:`watch_notifiers`
turns each new record into a trace event as it happens, without changing mm's
code: it wraps that one ``NotifierSubscriptions`` object's ``_record`` method.
"""
import json
import threading
import time

# The event categories the layers use (Perfetto shows one colour per name).
CAT_FAULT = "fault"            # a device lane's translation miss; a batch service
CAT_MIGRATE = "migrate"        # migrate_vma / DMA copies, either direction
CAT_INVALIDATE = "invalidate"  # mmu notifier invalidations, device PT shootdowns
CAT_EVICT = "evict"            # device memory given back under pressure
CAT_JOB = "job"                # a slice of a device job between replays
CAT_CPU = "cpu"                # CPU-side phases (the demo's steps, a benchmark's timed region)

DEFAULT_LIMIT = 1_000_000

enabled = False                # module attribute: callers may test ``trace.enabled``
_tracer = None


def now_us():
    """The trace clock in microseconds (0 when tracing was enabled; monotonic)."""
    t = _tracer
    base = t.t0_ns if t is not None else 0
    return (time.perf_counter_ns() - base) / 1000.0


class Tracer:
    """A bounded in-memory list of events, exportable as Chrome trace JSON."""

    def __init__(self, limit=DEFAULT_LIMIT):
        self.t0_ns = time.perf_counter_ns()
        self.wall_t0 = time.time()
        self.limit = int(limit)
        self.events = []           # (ph, name, cat, ts_us, dur_us, track, args)
        self.dropped = 0
        self.lock = threading.Lock()

    def add(self, ph, name, cat, ts_us, dur_us, track, args):
        with self.lock:
            if len(self.events) >= self.limit:
                self.dropped += 1
                return
            self.events.append((ph, name, cat, ts_us, dur_us, track, args))

    def __len__(self):
        return len(self.events)

    def to_chrome(self, metadata=None):
        """The trace as a Chrome trace object: ``{"traceEvents": [...], ...}``.

        A track ``"gpu0/faults"`` becomes process ``gpu0``, thread ``gpu0/faults``;
        both get ``process_name``/``thread_name`` metadata so Perfetto labels them.
        """
        with self.lock:
            events = list(self.events)
        pids, tids, out = {}, {}, []
        for ph, name, cat, ts, dur, track, args in events:
            track = track or "host"
            proc = track.split("/", 1)[0]
            if proc not in pids:
                pids[proc] = len(pids) + 1
                out.append({"ph": "M", "name": "process_name", "pid": pids[proc], "tid": 0,
                            "ts": 0, "args": {"name": proc}})
            pid = pids[proc]
            if track not in tids:
                tids[track] = len(tids) + 1
                out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[track],
                            "ts": 0, "args": {"name": track}})
            e = {"name": name, "cat": cat, "ph": ph, "ts": round(float(ts), 3), "pid": pid,
                 "tid": tids[track], "args": _jsonable(args)}
            if ph == "X":
                e["dur"] = round(max(float(dur), 0.0), 3)
            elif ph == "i":
                e["s"] = "t"
            out.append(e)
        other = {"tool": "hmmgpu", "clock": "perf_counter, us since tracing was enabled",
                 "wall_time_at_zero": self.wall_t0, "dropped_events": self.dropped}
        other.update(metadata or {})
        return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": _jsonable(other)}

    def write(self, path, metadata=None):
        """Write Chrome trace JSON to ``path``; returns the number of events written."""
        doc = self.to_chrome(metadata)
        with open(path, "w") as f:
            json.dump(doc, f)
        return len(doc["traceEvents"])

    def summary(self):
        """{(cat, name): (count, total_dur_us)}: what the CLI prints after a traced run."""
        out = {}
        with self.lock:
            for ph, name, cat, ts, dur, track, args in self.events:
                n, d = out.get((cat, name), (0, 0.0))
                out[(cat, name)] = (n + 1, d + (dur or 0.0))
        return out


def _jsonable(obj):
    """Make args JSON-safe: NumPy scalars to Python numbers, anything else odd to str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except Exception:
            pass
    return str(obj)


# -- the global switch --------------------------------------------------------------------

def enable(limit=DEFAULT_LIMIT):
    """Start recording (a fresh trace); returns the Tracer."""
    global _tracer, enabled
    _tracer = Tracer(limit)
    enabled = True
    return _tracer


def disable():
    """Stop recording; returns the Tracer that was recording (or None)."""
    global _tracer, enabled
    t, _tracer, enabled = _tracer, None, False
    return t


def current():
    """The recording Tracer, or None."""
    return _tracer


class tracing:
    """``with trace.tracing("out.json") as t:`` records inside the block and writes at the end.

    ``path=None`` records without writing (read ``t.events``).  The previous tracer,
    if any, is restored afterwards.
    """

    def __init__(self, path=None, limit=DEFAULT_LIMIT, metadata=None):
        self.path, self.limit, self.metadata = path, limit, metadata
        self.tracer = None
        self._prev = None

    def __enter__(self):
        self._prev = _tracer
        self.tracer = enable(self.limit)
        return self.tracer

    def __exit__(self, *exc):
        global _tracer, enabled
        _tracer = self._prev
        enabled = _tracer is not None
        if self.path is not None:
            self.tracer.write(self.path, self.metadata)
        return False


# -- recording: every function is a no-op while tracing is off -----------------------------

def event(name, cat, ts_us=None, dur_us=None, track="host", **args):
    """A complete event (``dur_us`` given) or an instant one (``dur_us`` None)."""
    t = _tracer
    if t is None:
        return
    if ts_us is None:
        ts_us = now_us()
    if dur_us is None:
        t.add("i", name, cat, ts_us, 0.0, track, args)
    else:
        t.add("X", name, cat, ts_us, dur_us, track, args)


def instant(name, cat, track="host", **args):
    """A point in time (a fault, a replay)."""
    t = _tracer
    if t is None:
        return
    t.add("i", name, cat, now_us(), 0.0, track, args)


def counter(name, track="host", **values):
    """A counter sample (Perfetto draws it as a graph), e.g. ``counter("resident", gpu_pages=n)``."""
    t = _tracer
    if t is None:
        return
    t.add("C", name, "counter", now_us(), 0.0, track, values)


class span:
    """``with trace.span(name, cat, track=..., **args):`` records the block as one event.

    Arguments learnt inside the block can be added with ``s.args[key] = value``.
    """

    __slots__ = ("name", "cat", "track", "args", "t0")

    def __init__(self, name, cat, track="host", **args):
        self.name, self.cat, self.track, self.args = name, cat, track, args
        self.t0 = None

    def __enter__(self):
        if _tracer is not None:
            self.t0 = now_us()
        return self

    def __exit__(self, exc_type, exc, tb):
        t = _tracer
        if t is not None and self.t0 is not None:
            if exc_type is not None:
                self.args["error"] = exc_type.__name__
            t.add("X", self.name, self.cat, self.t0, now_us() - self.t0, self.track, self.args)
        return False


# -- mmu notifier invalidations, read from mm -------------------------------------------------

def watch_notifiers(mm, track=None):
    """Trace every mmu-notifier invalidation of address space ``mm`` from now on.

    ``hmmgpu.mm.notifier`` records ``(event, start, end, owner)`` in
    ``mm.notifiers.events`` as each invalidation starts; this wraps that recorder
    on this one object so each record also becomes an instant trace event.
    Idempotent; returns ``mm``.
    """
    subs = getattr(mm, "notifiers", None)
    if subs is None or getattr(subs, "_hmmgpu_traced", False):
        return mm
    record = subs._record
    try:
        from .mm.notifier import EVENT_NAMES
    except Exception:  # pragma: no cover - mm always imports
        EVENT_NAMES = {}
    owner_pid = getattr(getattr(mm, "owner", None), "pid", None)
    where = track or (f"cpu/pid {owner_pid}" if owner_pid is not None else "cpu")

    def traced_record(range):
        record(range)
        if _tracer is not None:
            _tracer.add("i", "invalidate " + EVENT_NAMES.get(range.event, str(range.event)),
                        CAT_INVALIDATE, now_us(), 0.0, where,
                        {"start": hex(range.start), "end": hex(min(range.end, (1 << 64) - 1)),
                         "npages": (min(range.end, 1 << 64) - range.start) >> 12,
                         "owner": None if range.owner is None else repr(range.owner)})

    subs._record = traced_record
    subs._hmmgpu_traced = True
    return mm


def watch_pagemap_ops(ops, track="device/pagemap"):
    """Trace a driver's dev_pagemap ops: ``migrate_to_ram`` (CPU faults on device-private
    pages) as ``migrate`` spans and ``folio_free`` / ``page_free`` as ``evict``-category
    ``page_free`` instants.

    Wraps the two methods on this one ops object (the pgmap keeps a reference to the same
    object, so the kernel side calls the wrappers).  Idempotent; returns ``ops``.
    """
    if ops is None or getattr(ops, "_hmmgpu_traced", False):
        return ops
    to_ram = getattr(ops, "migrate_to_ram", None)
    free = getattr(ops, "page_free", None)
    folio_free = getattr(ops, "folio_free", None)
    if to_ram is not None:
        def migrate_to_ram(vmf):
            if _tracer is None:
                return to_ram(vmf)
            n = int(getattr(getattr(vmf, "addresses", None), "size", 1) or 1)
            with span("migrate_to_ram", CAT_MIGRATE, track=track, npages=n,
                      address=hex(int(getattr(vmf, "address", 0) or 0))):
                return to_ram(vmf)
        ops.migrate_to_ram = migrate_to_ram
    if free is not None:
        def page_free(pfns):
            if _tracer is not None:
                _tracer.add("i", "page_free", CAT_EVICT, now_us(), 0.0, track,
                            {"npages": int(getattr(pfns, "size", 1))})
            return free(pfns)
        ops.page_free = page_free
    if folio_free is not None:
        def traced_folio_free(heads, order):
            if _tracer is not None:
                _tracer.add("i", "page_free", CAT_EVICT, now_us(), 0.0, track,
                            {"npages": int(getattr(heads, "size", 1)) << int(order), "order": int(order)})
            return folio_free(heads, order)
        ops.folio_free = traced_folio_free
    ops._hmmgpu_traced = True
    return ops


def notifier_event_counts(mm):
    """{MMU_NOTIFY_* name: count} of the invalidations ``mm`` recorded (bounded history)."""
    from .mm.notifier import EVENT_NAMES
    counts = {}
    for ev, *_ in list(getattr(mm.notifiers, "events", ())):
        name = EVENT_NAMES.get(ev, str(ev))
        counts[name] = counts.get(name, 0) + 1
    return counts


# -- counters ---------------------------------------------------------------------------------

# UVM fault_stats names (hmmgpu.device.faults.FAULT_COUNTERS) and the migration/eviction ones a
# UVM-like device keeps; read_counters looks for these as attributes when an object has no
# ``counters`` mapping.
KNOWN_COUNTERS = ("num_read_faults", "num_write_faults", "num_atomic_faults", "num_prefetch_faults",
                  "num_duplicate_faults", "num_fatal_faults", "num_fault_batches", "num_replays",
                  "num_buffer_overflows", "num_throttles", "num_pages_in", "num_pages_out",
                  "num_evictions", "num_invalidations", "num_jobs", "num_remote_maps",
                  "pages_copied", "bytes_copied", "batches",
                  "calloc", "cfree")        # struct dmirror_device: device pages allocated, freed


def _as_int_dict(d):
    out = {}
    for k, v in dict(d).items():
        if isinstance(v, dict):
            for k2, v2 in _as_int_dict(v).items():
                out[f"{k}.{k2}"] = v2
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        try:
            out[str(k)] = int(v) if f.is_integer() else f      # a time in seconds stays a float
        except (TypeError, ValueError):
            out[str(k)] = f
    return out


def read_counters(obj):
    """The counters an object keeps, as a flat {name: number} dict ({} if none).

    Looks, in order, for ``obj.stats`` / ``obj.counters`` / ``obj.fault_stats`` (a mapping,
    or a method returning one), then attributes named in ``KNOWN_COUNTERS``.
    Nothing is computed or made up here.
    """
    if obj is None:
        return {}
    for attr in ("stats", "counters", "fault_stats"):
        c = getattr(obj, attr, None)
        if callable(c):
            try:
                c = c()
            except TypeError:
                c = None
        if isinstance(c, dict) or (c is not None and hasattr(c, "items")):
            out = _as_int_dict(c)
            if out:
                return out
    out = {}
    for name in KNOWN_COUNTERS:
        v = getattr(obj, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
        elif hasattr(v, "item") and not callable(v):
            out[name] = v.item()
    return out


def source_name(obj, i=0):
    """How a counter source is shown: its ``name``, else its kind and id (``DMirrorDevice#0``)."""
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return f"{type(obj).__name__}#{getattr(obj, 'id', i)}"


def device_drivers(system):
    """Every driver object that owns device memory hotplugged into ``system`` (each live
    dev_pagemap's owner, once, in hotplug order): dmirror devices and the like."""
    owners = []
    for pgmap in list(getattr(system.phys, "pgmaps", ()) or ()):
        owner = getattr(pgmap, "owner", None)
        if owner is not None and getattr(pgmap, "live", False) and not any(owner is o for o in owners):
            owners.append(owner)
    return owners


def collect_counters(system=None, devices=(), **named):
    """Counters of everything given: {source name: {counter: value}}.

    ``devices``: any device kind (EmulatedDevice, dmirror device, UvmDriver, ...), read with
    :func:`read_counters`, with their DMA engines and fault buffers when they have them;
    ``named``: any other object by the name to show.  From ``system`` it adds every driver
    that owns device memory there (:func:`device_drivers`: a dmirror device's ``calloc`` and
    ``cfree``) unless given already, and the physical-memory and memcg figures mm keeps.
    """
    out = {}
    given = list(devices)
    if system is not None:
        given += [d for d in device_drivers(system) if not any(d is g for g in given)]
    for i, dev in enumerate(given):
        c = read_counters(dev)
        for sub in ("dma", "fault_buffer", "faults", "engine"):
            part = getattr(dev, sub, None)
            if part is not None and part is not dev and not isinstance(part, (int, float, str)):
                for k, v in read_counters(part).items():
                    c.setdefault(f"{sub}.{k}", v)
        if c:
            out[source_name(dev, i)] = c
    for name, obj in named.items():
        c = read_counters(obj)
        if c:
            out[name] = c
    if system is not None:
        phys = getattr(system, "phys", None)
        if phys is not None:
            s = {"nr_ram_pages": int(getattr(phys, "nr_ram", 0))}
            nr_free = getattr(phys, "nr_free", None)
            if callable(nr_free):
                try:
                    s["nr_free_ram_pages"] = int(nr_free())
                except Exception:
                    pass
            out["system"] = s
        for cg in getattr(system, "memcgs", ()) or ():
            out[f"memcg {cg.name}"] = {"pages": int(cg.pages), "max_pages": int(cg.max_pages),
                                      "oom_kills": int(cg.oom_kills)}
    return out
