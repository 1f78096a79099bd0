"""The driver's counters, with the names a UVM developer reads on a real machine.

``fault_stats`` names are those of /proc/driver/nvidia-uvm/gpus/UVM-GPU-.../fault_stats
(uvm_gpu.h's replayable fault statistics); ``thrashing`` those of the thrashing_stats file
(uvm_perf_thrashing.c); the transfer counters are UvmCounterName's (uvm_types.h), with bytes_xfer_dtd for copies
from a peer device (UVM reports those as migrations, UvmEventTypeMigration); the rest count
the events of UVM's tools interface (UvmEventTypeEviction, UvmEventTypeReadDuplicate,
UvmEventTypeReadDuplicateInvalidate, UvmEventTypeMapRemote, UvmEventTypeThrottlingStart) and the
access-counter notifications serviced.
"""

FAULT_STATS = (
    "num_read_faults", "num_write_faults", "num_atomic_faults", "num_prefetch_faults",
    "num_duplicate_faults", "num_fault_batches", "num_replays", "num_replays_ack_all",
    "num_pages_in", "num_pages_out",
)
THRASHING_STATS = ("num_thrashing", "num_throttle", "num_pin_local", "num_pin_remote")
TRANSFER_COUNTERS = ("bytes_xfer_htd", "bytes_xfer_dth", "bytes_xfer_dtd", "prefetch_bytes_xfer_htd",
                     "prefetch_bytes_xfer_dth", "cpu_page_fault_count", "gpu_page_fault_count")
EVENT_COUNTERS = (
    "num_evictions",                    # root chunks evicted (UvmEventTypeEviction)
    "num_pages_evicted",                # pages moved out by those evictions
    "num_prefetched_pages",             # pages migrated because the prefetcher chose them
    "num_map_remote",                   # pages mapped remotely instead of migrated (UvmEventTypeMapRemote)
    "num_read_duplicates",              # pages given a second, read-only copy (UvmEventTypeReadDuplicate)
    "num_read_duplicate_invalidates",   # duplicated pages collapsed by a write (UvmEventTypeReadDuplicateInvalidate)
    "num_access_counter_notifications",
    "num_access_counter_migrations",    # pages migrated because of access-counter notifications
)
COUNTER_NAMES = FAULT_STATS + THRASHING_STATS + TRANSFER_COUNTERS + EVENT_COUNTERS


def new_counters():
    """A dict with every counter at zero, in COUNTER_NAMES order."""
    return dict.fromkeys(COUNTER_NAMES, 0)


def add(counters, **deltas):
    """Add to named counters; a name UVM does not have is an error (a typo would otherwise count
    into a key nobody reads)."""
    for name, delta in deltas.items():
        if name not in counters:
            raise KeyError(f"no counter named {name!r}")
        counters[name] += int(delta)
    return counters
