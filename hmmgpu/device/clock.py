"""Device time: an emulated clock, a wall clock, and the cost model that advances the first.

A real GPU and its driver spend time on every fault batch, copy, remote access, replay and kernel
launch; the emulated device does the same work at NumPy or CuPy speed, which says nothing about
the hardware.  So every device operation also advances an ``EmulatedClock`` by what a
``CostModel`` says the hardware would have taken, and policies (prefetch, eviction, thrashing
lapses, access counters) decide on that clock, which makes their decisions deterministic and the
same on both backends.  A ``WallClock`` has the same interface over real time (SimPy's shape: a
virtual-time environment and a real-time one behind one interface), so a report can show
modelled time beside wall time.  Times are integer nanoseconds (``now_ns``; ``now`` in seconds).

The model's numbers come from a *profile*, a JSON file (package data ``device/profiles/*.json``
or any path; see ``load_profile``).  The default, ``h100``, was measured on an H100 on PCIe
Gen5: pinned H2D 54.7 GB/s, D2H 55.0 GB/s, one memcpyAsync per scattered 4 KiB page 8.3 us (so a
memcpyAsync call costs 8.3 us - 4 KiB/54.7 GB/s = 8.225 us before its bytes), a gather kernel
over mapped host memory 50 GB/s, zero-copy reads of host memory 50.7 GB/s, a kernel launch 7.5 us.
Copies are priced as the DMA engine performs them (``kernels/dma.py``): runs of at least 64
pages become one memcpyAsync each, the scattered rest one gather kernel.

Two latencies of the driver itself were not measured directly; they are derived from CUDA managed
memory measured on that H100 (``calibration`` in the profile) by ``derive_service_latencies``:

* ``block_service_us``, the driver's work per 2 MiB VA block it migrates (residency update,
  chunk allocation, page-table commands).  cudaMemPrefetchAsync of 1 GiB (B = 2^30 bytes,
  M = 512 blocks) of CPU-resident pages ran at 46.2 GB/s.  The driver moves the whole range in
  one DMA batch: CPU pages are scattered frames, so one gather kernel.  Then
  B/46.2 = launch + B/50 + M * block_service, i.e. 23.241 ms = 7.5 us + 21.475 ms + 512 * b,
  b = 3.435 us.
* ``fault_batch_us``, the latency of fetching and servicing one batch of faults (interrupt,
  fetch, sort and dedupe, the service decisions, the fault-buffer pointer updates).  A kernel
  touching each 4 KiB page of 1 GiB of CPU-resident memory once ran at 5.7 GB/s.  Lanes fault in
  address order, one fault per page, fetched 256 to a batch (uvm_perf_fault_batch_count), so
  1024 batches of half a VA block each.  The density prefetcher adds nothing on this pattern
  (the first half of a block is exactly 50%, not above the 51% threshold; the second half
  completes it), so each batch migrates its 256 pages with one gather kernel and ends with one
  replay (the BATCH_FLUSH replay policy): B/5.7 = launch + 1024 * (f + block_service + launch +
  2^20/50 + replay), i.e. 188.376 ms = 7.5 us + 1024 * (f + 3.435 + 7.5 + 20.972 + 7.5) us,
  f = 144.547 us.  ``replay_us`` itself is nominal (taken equal to a kernel launch).

The tests replay both calibration runs step by step through the real prefetcher and VA-block
residency and check the model within 20% of the measured figures, for scattered and for
contiguous CPU frames.
"""
import json
import math
import os
import time

import numpy as np

PAGE_SIZE = 4096
VA_BLOCK_SIZE = 2 << 20
DEFAULT_PROFILE = "h100"
DMA_MIN_RUN = 64                # kernels/dma.py DEFAULT_MIN_RUN: shorter runs ride in the gather kernel

# The numeric fields of a profile: name -> (unit, what it is).
PROFILE_FIELDS = {
    "h2d_gbps": ("GB/s", "pinned host-to-device memcpy bandwidth"),
    "d2h_gbps": ("GB/s", "pinned device-to-host memcpy bandwidth"),
    "memcpy_page_us": ("us", "one cudaMemcpyAsync of one scattered 4 KiB page"),
    "gather_gbps": ("GB/s", "gather/scatter kernel over mapped host memory"),
    "zero_copy_gbps": ("GB/s", "a device reading host memory in place (remote mapping)"),
    "kernel_launch_us": ("us", "launch of a kernel, host to completion"),
    "replay_us": ("us", "a fault replay"),
    "d2d_gbps": ("GB/s", "device-local copy"),
    "peer_gbps": ("GB/s", "device-to-device copy between two devices"),
    "block_service_us": ("us", "driver work per 2 MiB VA block migrated"),
    "fault_batch_us": ("us", "fetching and servicing one batch of faults"),
}
DERIVED_FIELDS = ("block_service_us", "fault_batch_us")
CALIBRATION_FIELDS = ("on_demand_gbps", "prefetch_gbps")
TEXT_FIELDS = ("name", "description")
DIRECTIONS = ("h2d", "d2h", "d2d", "peer")

CALIBRATION_BYTES = 1 << 30         # the calibration runs move 1 GiB
CALIBRATION_BATCH = 256             # uvm_perf_fault_batch_count's default


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


def _positive(where, key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ProfileError(f"{where}: field '{key}' must be a positive number, got {value!r}")
    return float(value)


def derive_service_latencies(fields, on_demand_gbps, prefetch_gbps):
    """(block_service_us, fault_batch_us) from the two calibration figures (see the module docstring).

    ``fields`` holds the measured numbers (h2d_gbps, gather_gbps, kernel_launch_us, replay_us).
    Raises ProfileError when the figures admit no positive latency (a prefetch faster than the
    gather kernel itself, or an on-demand run faster than its own copies).
    """
    B = CALIBRATION_BYTES
    nblocks = B // VA_BLOCK_SIZE
    nbatches = B // PAGE_SIZE // CALIBRATION_BATCH
    launch = fields["kernel_launch_us"] * 1e3
    gather = fields["gather_gbps"]
    block_ns = (B / prefetch_gbps - launch - B / gather) / nblocks
    if block_ns <= 0:
        raise ProfileError(f"calibration prefetch_gbps {prefetch_gbps} is not below what the gather kernel "
                           f"alone allows ({B / (B / gather + launch):.1f} GB/s)")
    batch_bytes = CALIBRATION_BATCH * PAGE_SIZE
    per_batch = (B / on_demand_gbps - launch) / nbatches
    fault_ns = per_batch - block_ns - launch - batch_bytes / gather - fields["replay_us"] * 1e3
    if fault_ns <= 0:
        raise ProfileError(f"calibration on_demand_gbps {on_demand_gbps} leaves no time for the fault batches")
    return round(block_ns / 1e3, 3), round(fault_ns / 1e3, 3)


class Profile:
    """A validated cost-model profile: the numbers of PROFILE_FIELDS as attributes (floats)."""

    def __init__(self, data, source="<dict>"):
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: a profile is a JSON object, got {type(data).__name__}")
        known = set(PROFILE_FIELDS) | set(TEXT_FIELDS) | {"calibration", "provenance"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; "
                               f"known: {', '.join(sorted(known))}")
        self.source = source
        self.name = data.get("name", os.path.splitext(os.path.basename(source))[0])
        self.description = data.get("description", "")
        for key in TEXT_FIELDS:
            if key in data and not isinstance(data[key], str):
                raise ProfileError(f"{source}: field '{key}' must be a string, got {data[key]!r}")
        cal = data.get("calibration")
        if cal is not None:
            if not isinstance(cal, dict):
                raise ProfileError(f"{source}: field 'calibration' must be an object, got {cal!r}")
            extra = sorted(set(cal) - set(CALIBRATION_FIELDS))
            if extra:
                raise ProfileError(f"{source}: unknown calibration field(s) {', '.join(map(repr, extra))}")
            cal = {k: _positive(source, f"calibration.{k}", cal.get(k)) for k in CALIBRATION_FIELDS}
        self.calibration = cal
        prov = data.get("provenance", {})
        if not isinstance(prov, dict) or not all(isinstance(v, str) for v in prov.values()):
            raise ProfileError(f"{source}: field 'provenance' must map field names to strings")
        self.provenance = dict(prov)
        values = {}
        for key in PROFILE_FIELDS:
            if key in data:
                values[key] = _positive(source, key, data[key])
            elif key in DERIVED_FIELDS and cal is not None:
                continue
            else:
                raise ProfileError(f"{source}: missing field '{key}' ({PROFILE_FIELDS[key][1]}, "
                                   f"{PROFILE_FIELDS[key][0]})")
        if any(k not in values for k in DERIVED_FIELDS):
            block_us, fault_us = derive_service_latencies(values, cal["on_demand_gbps"], cal["prefetch_gbps"])
            values.setdefault("block_service_us", block_us)
            values.setdefault("fault_batch_us", fault_us)
        for key, value in values.items():
            setattr(self, key, value)

    def as_dict(self):
        out = {"name": self.name, "description": self.description}
        out.update({k: getattr(self, k) for k in PROFILE_FIELDS})
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out

    def __repr__(self):
        return f"Profile({self.name!r} from {self.source})"


def profile_path(name):
    """The package-data file of a named profile (``device/profiles/NAME.json``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", f"{name}.json")


def available_profiles():
    d = os.path.dirname(profile_path(DEFAULT_PROFILE))
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))


def load_profile(spec=DEFAULT_PROFILE):
    """A Profile from a name of the package's profiles, a path to a JSON file, a dict, or a Profile."""
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, dict):
        return Profile(spec)
    spec = os.fspath(spec)
    path = spec if (os.sep in spec or spec.endswith(".json")) else profile_path(spec)
    if not os.path.exists(path):
        raise ProfileError(f"no profile {spec!r}: {path} does not exist "
                           f"(package profiles: {', '.join(available_profiles())})")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e})") from None
    return Profile(data, source=path)


class CostModel:
    """What each device operation costs on the profiled hardware, in integer nanoseconds.

    Bandwidths are GB/s (10^9 bytes), so bytes / gbps is nanoseconds.
    """

    def __init__(self, profile=DEFAULT_PROFILE):
        self.profile = load_profile(profile)
        p = self.profile
        self._bw = {"h2d": p.h2d_gbps, "d2h": p.d2h_gbps, "d2d": p.d2d_gbps, "peer": p.peer_gbps}
        # The host-side cost of one cudaMemcpyAsync call: the measured per-page figure less its bytes.
        self.memcpy_call_ns = p.memcpy_page_us * 1e3 - PAGE_SIZE / p.h2d_gbps

    def _bandwidth(self, direction):
        try:
            return self._bw[direction]
        except KeyError:
            raise ValueError(f"copy direction {direction!r} is not one of {', '.join(DIRECTIONS)}") from None

    def launch_ns(self, n=1):
        return int(round(n * self.profile.kernel_launch_us * 1e3))

    def replay_ns(self, n=1):
        return int(round(n * self.profile.replay_us * 1e3))

    def fault_batch_ns(self, n=1):
        return int(round(n * self.profile.fault_batch_us * 1e3))

    def block_service_ns(self, n=1):
        return int(round(n * self.profile.block_service_us * 1e3))

    def memcpy_ns(self, direction, nbytes, calls=1):
        """``calls`` cudaMemcpyAsync calls moving ``nbytes`` in all."""
        if calls == 0:
            return 0
        return int(round(calls * self.memcpy_call_ns + nbytes / self._bandwidth(direction)))

    def memcpy_per_page_ns(self, direction, npages):
        """One cudaMemcpyAsync per 4 KiB page (the baseline a gather kernel replaces)."""
        return self.memcpy_ns(direction, npages * PAGE_SIZE, calls=npages)

    def gather_ns(self, direction, nbytes):
        """One gather/scatter kernel moving ``nbytes`` of scattered pages.

        Host memory is reached through its mapping (gather_gbps); between device frames the
        kernel runs at the device-local or peer bandwidth.
        """
        if nbytes == 0:
            return 0
        bw = self.profile.gather_gbps if direction in ("h2d", "d2h") else self._bandwidth(direction)
        return self.launch_ns() + int(round(nbytes / bw))

    def dma_ns(self, direction, run_lengths, min_run=DMA_MIN_RUN):
        """One DMA batch as the copy engine performs it: ``run_lengths`` are the batch's runs of
        consecutive pages (see device/dma.py coalesce_runs); runs of ``min_run`` pages or more are
        one memcpyAsync each, the other pages one gather kernel."""
        runs = np.asarray(run_lengths, dtype=np.int64)
        long = runs[runs >= min_run]
        long_pages = int(long.sum())
        short_pages = int(runs.sum()) - long_pages
        return (self.memcpy_ns(direction, long_pages * PAGE_SIZE, calls=int(long.size))
                + self.gather_ns(direction, short_pages * PAGE_SIZE))

    def remote_ns(self, nbytes, peer=False):
        """A device job reading ``nbytes`` in place: of host memory (zero-copy), or of a peer
        device's memory over the peer link (``peer``)."""
        return int(round(nbytes / (self.profile.peer_gbps if peer else self.profile.zero_copy_gbps)))


class Clock:
    """The interface both clocks share: ``now_ns``/``now``, ``advance(ns, what)``, ``advance_to``.

    ``spent`` maps what time was charged for (fault_batch, copy_h2d, replay, launch, nap, ...) to
    nanoseconds, so a report can break modelled time down.
    """
    kind = None

    def __init__(self):
        self.spent = {}
        self.start_ns = self.now_ns

    @property
    def now_ns(self):
        raise NotImplementedError

    @property
    def now(self):
        """Seconds since the clock was made."""
        return (self.now_ns - self.start_ns) / 1e9

    def advance(self, ns, what="other"):
        raise NotImplementedError

    def advance_to(self, t_ns, what="nap"):
        raise NotImplementedError

    def _charge(self, ns, what):
        ns = int(ns)
        if ns < 0:
            raise ValueError(f"a clock cannot go back: advance({ns}) for {what}")
        self.spent[what] = self.spent.get(what, 0) + ns
        return ns

    def __repr__(self):
        return f"{type(self).__name__}(now={self.now:.6f} s)"


class EmulatedClock(Clock):
    """Virtual time: it moves only when an operation charges it (SimPy's Environment)."""
    kind = "emulated"

    def __init__(self, model=None, start_ns=0):
        self.model = model if isinstance(model, CostModel) else CostModel(model or DEFAULT_PROFILE)
        self._now = int(start_ns)
        super().__init__()

    @property
    def now_ns(self):
        return self._now

    def advance(self, ns, what="other"):
        self._now += self._charge(ns, what)
        return self._now

    def advance_to(self, t_ns, what="nap"):
        """Move on to ``t_ns`` if it is later (a processor napping until a deadline)."""
        t_ns = int(t_ns)
        if t_ns > self._now:
            self.advance(t_ns - self._now, what)
        return self._now


class WallClock(Clock):
    """Real time (time.perf_counter_ns) behind the same interface (SimPy's RealtimeEnvironment).

    The work itself takes the time, so ``advance`` only records the charge; ``advance_to`` sleeps
    until the deadline as a real processor would.
    """
    kind = "wall"

    def __init__(self):
        self._t0 = time.perf_counter_ns()
        super().__init__()

    @property
    def now_ns(self):
        return time.perf_counter_ns() - self._t0

    def advance(self, ns, what="other"):
        self._charge(ns, what)
        return self.now_ns

    def advance_to(self, t_ns, what="nap"):
        delay = int(t_ns) - self.now_ns
        if delay > 0:
            self._charge(delay, what)
            time.sleep(delay / 1e9)
        return self.now_ns
