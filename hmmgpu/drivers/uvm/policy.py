"""What every replaceable policy shares: named knobs and the hooks (uvm_perf_module.c's role).

nvidia-uvm plugs its heuristics (prefetch, thrashing, access counters) into the fault path
through uvm_perf_module callbacks.  Here each heuristic is a Python class, and a researcher swaps
one by handing the driver another object of the same family: ``perf_prefetch.PrefetchPolicy``
(choose what to prefetch), ``eviction.EvictionPolicy`` (choose a victim),
``perf_thrashing.ThrashingPolicy`` (on a migration, on thrashing), and
``access_counters.AccessCounterPolicy`` (on an access-counter notification).  Every policy may also
watch each fault batch through ``on_fault_batch``.

A knob is declared with ``Knob`` under the name of nvidia-uvm's module parameter, with its
default and valid range; ``SomePolicy(uvm_perf_prefetch_threshold=75)`` overrides one, and an
unknown name or an out-of-range value is an error (nvidia-uvm would print a warning and use the
default; a typo in an experiment should not pass silently).
"""


class Knob:
    """A module parameter: default, inclusive range, and where nvidia-uvm defines it."""

    def __init__(self, default, lo=None, hi=None, doc=""):
        self.default, self.lo, self.hi, self.doc = default, lo, hi, doc

    def check(self, name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ValueError(f"{name}={value} is outside its valid range [{self.lo}, {self.hi}]")
        return value


class Policy:
    """Base of every policy: ``KNOBS`` (name -> Knob) become attributes; ``knobs()`` lists them."""
    name = "policy"
    KNOBS = {}

    def __init__(self, **knobs):
        unknown = sorted(set(knobs) - set(self.KNOBS))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no knob {', '.join(unknown)}; "
                            f"its knobs: {', '.join(sorted(self.KNOBS)) or 'none'}")
        for name, knob in self.KNOBS.items():
            setattr(self, name, knob.check(name, knobs.get(name, knob.default)))

    def knobs(self):
        """{module parameter name: value} of this policy's knobs."""
        return {name: getattr(self, name) for name in self.KNOBS}

    def on_fault_batch(self, faults, now_ns):
        """Called with every fault batch the driver services (a device FaultBatch), before any
        decision on it; the default does nothing."""

    def __repr__(self):
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs().items())
        return f"{type(self).__name__}({knobs})"
