"""The UVM-class driver: NVIDIA's nvidia-uvm rebuilt on the HMM core, one module per part.

=================  ==============================  ============================================
module             nvidia-uvm file                 what it holds
=================  ==============================  ============================================
pmm.py             uvm_pmm_gpu.c                   device memory in 2 MiB root chunks, split to
                                                   64 KiB and 4 KiB; eviction lists
eviction.py        uvm_pmm_gpu.c                   which root chunk to evict (LRU, LFU, FIFO,
                   (pick_root_chunk_to_evict)      random)
va_block.py        uvm_va_block.c                  2 MiB VA blocks: per-page residency and
                                                   mappings per processor, read duplication
perf_prefetch.py   uvm_perf_prefetch.c             the density (tree) prefetcher and alternatives
perf_thrashing.py  uvm_perf_thrashing.c            thrashing detection, throttling and pinning
access_counters.py uvm_gpu_access_counters.c       remote-access counters and their migrations
counters.py        procfs fault_stats, tools       the counters, with UVM's names
policy.py          uvm_perf_module.c               the hooks a replacement policy implements
registry.py        (module parameters)             policies by name (POLICY_NAMES, make_policies)
driver.py          uvm_gpu_replayable_faults.c,    UvmDriver: the fault path, oversubscription,
                   uvm_va_block.c, uvm_hmm.c       the policies and the clock on the HMM core
=================  ==============================  ============================================

Every knob is a module constant named as nvidia-uvm's module parameter, with its default; a
policy object takes the same names as keyword arguments.  Policies decide on the emulated clock
(hmmgpu/device/clock.py), so their decisions are deterministic and the same on both backends.
"""
from . import access_counters, counters, eviction, perf_prefetch, perf_thrashing, pmm, va_block
from .access_counters import AccessCounterPolicy, AccessCounterUnit, Notifications, UvmAccessCounters
from .eviction import EvictionPolicy, Fifo, Lfu, RandomEviction, UvmLru
from .perf_prefetch import (DensityPrefetcher, NoPrefetch, PrefetchContext, PrefetchPolicy, SequentialPrefetch,
                            WholeBlockPrefetch)
from .perf_thrashing import NoThrashingMitigation, ThrashingHints, ThrashingPolicy, UvmThrashing
from .pmm import EvictionFailed, Pmm, PmmError
from .policy import Knob, Policy
from .registry import FAMILIES, POLICY_NAMES, make_policies, make_policy
from .va_block import UVM_ID_CPU, Topology, VaBlocks, uvm_gpu_id
from .driver import (ADVICE, CPU, SET_ACCESSED_BY, SET_PREFERRED_LOCATION, SET_READ_MOSTLY,  # noqa: I001
                     UNSET_ACCESSED_BY, UNSET_PREFERRED_LOCATION, UNSET_READ_MOSTLY, UvmDriver, UvmGpu)
# (last: the driver builds on every module above)

__all__ = ["UvmDriver", "UvmGpu", "CPU", "ADVICE", "SET_READ_MOSTLY", "UNSET_READ_MOSTLY", "SET_PREFERRED_LOCATION",
           "UNSET_PREFERRED_LOCATION", "SET_ACCESSED_BY", "UNSET_ACCESSED_BY", "POLICY_NAMES", "FAMILIES", "make_policies", "make_policy", "EvictionFailed", "Pmm",
           "PmmError", "VaBlocks", "Topology", "UVM_ID_CPU", "uvm_gpu_id", "Policy", "Knob",
           "EvictionPolicy", "UvmLru", "Lfu", "Fifo", "RandomEviction", "PrefetchPolicy", "PrefetchContext",
           "DensityPrefetcher", "NoPrefetch", "SequentialPrefetch", "WholeBlockPrefetch", "ThrashingPolicy",
           "ThrashingHints", "UvmThrashing", "NoThrashingMitigation", "AccessCounterPolicy",
           "AccessCounterUnit", "Notifications", "UvmAccessCounters", "access_counters", "counters", "eviction",
           "perf_prefetch", "perf_thrashing", "pmm", "va_block"]


def default_policies(nprocs=2):
    """The policy objects a driver uses unless given others: nvidia-uvm's own."""
    return {"prefetch": DensityPrefetcher(), "eviction": UvmLru(), "thrashing": UvmThrashing(nprocs=nprocs),
            "access_counters": UvmAccessCounters()}


def default_knobs():
    """{policy family: {nvidia-uvm module parameter: default}} (what ``hmmgpu info`` lists)."""
    return {family: {"policy": type(p).__name__, **p.knobs()} for family, p in default_policies().items()}
