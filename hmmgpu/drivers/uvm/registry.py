"""Policies by name: what a command line passes to a driver (``--eviction lfu``).

``POLICY_NAMES`` maps each policy family to {name: class}; ``make_policies(spec)`` turns a dict
of names or policy objects into the four objects a driver uses, nvidia-uvm's defaults filling the
families it does not name.
"""
import inspect

from . import access_counters, eviction, perf_prefetch, perf_thrashing
from .policy import Policy

FAMILIES = ("prefetch", "eviction", "thrashing", "access_counters")
POLICY_NAMES = {
    "prefetch": dict(perf_prefetch.POLICIES),
    "eviction": dict(eviction.POLICIES),
    "thrashing": dict(perf_thrashing.POLICIES),
    "access_counters": dict(access_counters.POLICIES),
}
DEFAULT_NAMES = {"prefetch": "density", "eviction": "lru", "thrashing": "uvm", "access_counters": "uvm"}
_BASES = {"prefetch": perf_prefetch.PrefetchPolicy, "eviction": eviction.EvictionPolicy,
          "thrashing": perf_thrashing.ThrashingPolicy, "access_counters": access_counters.AccessCounterPolicy}


def make_policy(family, spec=None, seed=0, nprocs=2):
    """One policy of ``family`` from a name (None: nvidia-uvm's default) or an object of the
    family (returned as it is).  The random eviction policy is seeded with ``seed``; a thrashing
    policy made here tracks ``nprocs`` processors (the CPU and nprocs - 1 devices), and one given
    must track at least that many."""
    if family not in POLICY_NAMES:
        raise ValueError(f"no policy family {family!r}; families: {', '.join(FAMILIES)}")
    if isinstance(spec, Policy):
        if not isinstance(spec, _BASES[family]):
            raise TypeError(f"a {family} policy must be a {_BASES[family].__name__}, not {type(spec).__name__}")
        if getattr(spec, "nprocs", nprocs) < nprocs:
            raise ValueError(f"the {family} policy {type(spec).__name__} tracks {spec.nprocs} processors; "
                             f"this driver has {nprocs} (the CPU and {nprocs - 1} devices)")
        return spec
    name = DEFAULT_NAMES[family] if spec is None or spec == "default" else spec
    if not isinstance(name, str) or name not in POLICY_NAMES[family]:
        raise ValueError(f"no {family} policy named {spec!r}; choose one of "
                         f"{', '.join(sorted(POLICY_NAMES[family]))}")
    cls = POLICY_NAMES[family][name]
    if "seed" in cls.KNOBS:
        return cls(seed=seed)
    return cls(nprocs=nprocs) if "nprocs" in inspect.signature(cls).parameters else cls()


def make_policies(spec=None, seed=0, nprocs=2):
    """{family: policy} for every family from ``spec`` ({family: name or policy}; missing
    families, or spec None, take nvidia-uvm's defaults) for a driver of ``nprocs`` processors."""
    spec = {} if spec is None else dict(spec)
    unknown = sorted(set(spec) - set(FAMILIES))
    if unknown:
        raise ValueError(f"no policy family {', '.join(map(repr, unknown))}; families: {', '.join(FAMILIES)}")
    return {f: make_policy(f, spec.get(f), seed, nprocs) for f in FAMILIES}
