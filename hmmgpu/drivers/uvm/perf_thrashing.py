"""Thrashing detection and mitigation: uvm_perf_thrashing.c.

A page thrashes when processors keep taking it from each other.  UVM watches every migration
caused by a fault, an access counter or a prefetch (and every permission revocation): a block
gets per-page tracking once two different processors migrate into it within one lapse; then each
event on a page within ``uvm_perf_thrashing_lapse_usec`` (500 us) of the previous one counts,
and at ``uvm_perf_thrashing_threshold`` (3) events the page is thrashing.  Its faults then get a
hint (``get_hint``): within a throttling period of ``uvm_perf_thrashing_nap`` lapses one
processor is let through and the others are *throttled* (a GPU's fault is left for a later
replay, the CPU sleeps until the period ends); after ``uvm_perf_thrashing_pin_threshold`` (10)
throttling periods the page is *pinned*: it stays where it is and the other processors map it
remotely, until ``uvm_perf_thrashing_pin`` lapses (300) have passed.  A block where nothing
thrashed for ``uvm_perf_thrashing_epoch`` lapses (2000) forgets its history, at most
``uvm_perf_thrashing_max_resets`` (4) times.  With a preferred location, or processors that
reach each other's memory over a fast link, pinning comes at once; the decision table is
get_hint_for_migration_thrashing's.  While the lapse keeps its default, UVM adapts it by voting
(adjust_thrashing_lapse, ``uvm_perf_lapse_vote_threshold`` 32), reproduced here with its
arithmetic as compiled: an 8-bit signed vote counter, and a decrease branch whose condition
(-stat <= -threshold) equals the increase branch's, so the lapse only grows while below its cap.

Time stamps are the emulated clock's nanoseconds; per-page ones are stored truncated to 64 ns, as
UVM's bit fields keep them, and compared with the untruncated time.  -1 marks "never" where UVM
uses 0.  State is struct-of-arrays: per VA block row, and per page in a pool of
512-page rows handed to blocks that show potential thrashing (UVM allocates block->pages lazily
too).  Every call takes a batch: rows with (rows x 512) page masks for events, or (row, page)
pairs for hints, and is one vectorised pass (the lapse vote is a scan over the batch, re-run only
when the lapse changes).
"""
import numpy as np

from .policy import Knob, Policy
from .va_block import (PAGES_PER_UVM_VA_BLOCK, UVM_ID_CPU, UVM_ID_INVALID, UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER,
                       UVM_MAKE_RESIDENT_CAUSE_EVICTION, UVM_MAKE_RESIDENT_CAUSE_PREFETCH,
                       UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT, Topology, group_sorted)

PAGES = PAGES_PER_UVM_VA_BLOCK
NEVER = -1

# Module parameters of uvm_perf_thrashing.c, with nvidia-uvm's defaults.
uvm_perf_thrashing_enable = 1
uvm_perf_thrashing_threshold = 3          # consecutive thrashing events that start mitigation (1-7)
uvm_perf_thrashing_pin_threshold = 10     # throttling periods before pinning (1-255)
uvm_perf_thrashing_lapse_usec = 500       # two events on a page closer than this are thrashing
uvm_perf_lapse_vote_threshold = 32        # lapse-adjustment votes before the lapse changes
uvm_perf_thrashing_nap = 1                # throttling period, in lapses (1-100)
uvm_perf_thrashing_epoch = 2000           # quiet time after which a block's history resets, in lapses
uvm_perf_thrashing_pin = 300              # how long a page stays pinned, in lapses (0: forever)
uvm_perf_thrashing_max_resets = 4         # history resets allowed per block

UVM_PERF_THRASHING_LAPSE_USEC_DEFAULT = 500
UVM_PERF_THRASHING_LAPSE_USEC_MAX = UVM_PERF_THRASHING_LAPSE_USEC_DEFAULT * 1000
UVM_PERF_THRASHING_LAPSE_USEC_MIN = UVM_PERF_THRASHING_LAPSE_USEC_DEFAULT // 100
PAGE_THRASHING_NUM_EVENTS_MAX = (1 << 3) - 1          # a 3-bit field
PAGE_THRASHING_THROTTLING_COUNT_MAX = (1 << 8) - 1    # an 8-bit field
TIMER_GRANULARITY_NS = 20000                          # thrashing_unpin_pages unpins this early

# uvm_perf_thrashing_hint_type_t
UVM_PERF_THRASHING_HINT_TYPE_NONE = 0
UVM_PERF_THRASHING_HINT_TYPE_PIN = 1
UVM_PERF_THRASHING_HINT_TYPE_THROTTLE = 2

_TRACKED_CAUSES = (UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT, UVM_MAKE_RESIDENT_CAUSE_ACCESS_COUNTER,
                   UVM_MAKE_RESIDENT_CAUSE_PREFETCH)


def _stamp(t):
    """page_thrashing_set_time_stamp: 64 ns resolution."""
    return np.asarray(t, np.int64) & ~np.int64(63)


class ThrashingHints:
    """get_hint's answer per (row, page) pair: ``type`` (UVM_PERF_THRASHING_HINT_TYPE_*),
    ``residency`` where a PIN wants the page (-1 otherwise), ``end_ns`` when a THROTTLE ends."""

    def __init__(self, n):
        self.type = np.zeros(n, np.int8)
        self.residency = np.full(n, UVM_ID_INVALID, np.int64)
        self.end_ns = np.full(n, NEVER, np.int64)

    @property
    def pin(self):
        return self.type == UVM_PERF_THRASHING_HINT_TYPE_PIN

    @property
    def throttle(self):
        return self.type == UVM_PERF_THRASHING_HINT_TYPE_THROTTLE

    def __len__(self):
        return int(self.type.size)


class ThrashingPolicy(Policy):
    """Hooks: ``on_migration`` / ``on_revocation`` (events that may be thrashing), ``get_hint``
    (what to do about a fault on a page: nothing, throttle, pin), ``thrashing_pages`` (for the
    prefetcher), ``expire_pins`` (pins whose time is up) and ``reset`` (pages unmapped)."""
    name = "thrashing"

    def on_migration(self, rows, mask, dst, now_ns, cause=UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT,
                     read_duplicate=False):
        pass

    def on_revocation(self, rows, mask, proc, now_ns):
        pass

    def get_hint(self, rows, pages, requester, now_ns, closest=None, preferred=None, resident=None):
        return ThrashingHints(np.asarray(pages).size)

    def thrashing_pages(self, rows):
        return np.zeros((np.asarray(rows).size, PAGES), bool)

    def pinned_pages(self, rows):
        return np.zeros((np.asarray(rows).size, PAGES), bool)

    def expire_pins(self, now_ns):
        return np.zeros(0, np.int64), np.zeros((0, PAGES), bool)

    def reset(self, rows, mask):
        pass

    def counters(self):
        """thrashing_stats totals: none without detection."""
        return {}


class NoThrashingMitigation(ThrashingPolicy):
    """Never detect thrashing (uvm_perf_thrashing_enable=0)."""
    name = "none"


class UvmThrashing(ThrashingPolicy):
    """uvm_perf_thrashing.c's detection, throttling and pinning (the default).

    ``topology`` (va_block.Topology) says who reaches whose memory; the default is a PCIe machine
    with ``nprocs`` processors (the CPU and nprocs - 1 GPUs).
    """
    name = "uvm"
    KNOBS = {
        "uvm_perf_thrashing_enable": Knob(uvm_perf_thrashing_enable, 0, 1, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_threshold": Knob(uvm_perf_thrashing_threshold, 1, PAGE_THRASHING_NUM_EVENTS_MAX,
                                             "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_pin_threshold": Knob(uvm_perf_thrashing_pin_threshold, 1,
                                                 PAGE_THRASHING_THROTTLING_COUNT_MAX, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_lapse_usec": Knob(uvm_perf_thrashing_lapse_usec, 1, None, "uvm_perf_thrashing.c"),
        "uvm_perf_lapse_vote_threshold": Knob(uvm_perf_lapse_vote_threshold, 1, None, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_nap": Knob(uvm_perf_thrashing_nap, 1, 100, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_epoch": Knob(uvm_perf_thrashing_epoch, 1, None, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_pin": Knob(uvm_perf_thrashing_pin, 0, None, "uvm_perf_thrashing.c"),
        "uvm_perf_thrashing_max_resets": Knob(uvm_perf_thrashing_max_resets, 0, None, "uvm_perf_thrashing.c"),
    }

    def __init__(self, nprocs=2, topology=None, **knobs):
        super().__init__(**knobs)
        self.topology = topology if topology is not None else Topology(nprocs)
        self.nprocs = self.topology.nprocs
        # va_space_thrashing_info_init_params (no emulation overrides: the clock is modelled time)
        self.lapse_ns = self.uvm_perf_thrashing_lapse_usec * 1000
        self.nap_ns = self.lapse_ns * self.uvm_perf_thrashing_nap
        self.epoch_ns = self.lapse_ns * self.uvm_perf_thrashing_epoch
        self.pin_ns = self.lapse_ns * self.uvm_perf_thrashing_pin
        self.lapse_stat = 0                                   # NvS8
        # per block row (block_thrashing_info_t)
        self._bcap = 0
        self._grow_blocks(64)
        # page pool (page_thrashing_info_t), one 512-page row per tracked block
        self._pcap = 0
        self._free_prows = []
        self._grow_pool(16)
        self.stats = {k: np.zeros(self.nprocs, np.int64)
                      for k in ("num_thrashing", "num_throttle", "num_pin_local", "num_pin_remote")}

    # -- storage ------------------------------------------------------------------------------------
    def _grow_blocks(self, need):
        if need <= self._bcap:
            return
        cap, old = max(need, 2 * self._bcap), self._bcap

        def g(name, fill, dtype):
            new = np.full(cap, fill, dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)
        g("b_prow", -1, np.int64)                   # block->pages (a pool row), -1 while NULL
        g("b_num_thrashing", 0, np.int64)
        g("b_reset_count", 0, np.int64)
        g("b_last_processor", UVM_ID_INVALID, np.int64)
        g("b_last_ts", NEVER, np.int64)
        g("b_last_thrashing_ts", NEVER, np.int64)
        g("b_throttling_count", 0, np.int64)
        g("b_pinned_count", 0, np.int64)
        self._bcap = cap

    def _grow_pool(self, need):
        if need <= self._pcap:
            return
        cap, old = max(need, 2 * self._pcap), self._pcap

        def g(name, fill, dtype):
            new = np.full((cap, PAGES), fill, dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)
        g("p_last_ts", NEVER, np.int64)
        g("p_migration_events", False, bool)
        g("p_revocation_events", False, bool)
        g("p_events", 0, np.int64)
        g("p_pinned", False, bool)
        g("p_throttling_end", NEVER, np.int64)
        g("p_throttling_count", 0, np.int64)
        g("p_processors", 0, np.int64)
        g("p_throttled", 0, np.int64)
        g("p_pinned_residency", UVM_ID_INVALID, np.int64)
        g("p_do_not_throttle", UVM_ID_INVALID, np.int64)
        g("p_pin_deadline", NEVER, np.int64)
        g("p_thrashing", False, bool)                # block_thrashing->thrashing_pages
        self._free_prows.extend(range(cap - 1, old - 1, -1))
        self._pcap = cap

    def _alloc_prows(self, n):
        if n > len(self._free_prows):
            self._grow_pool(self._pcap + n)
        out = np.array([self._free_prows.pop() for _ in range(n)], np.int64)
        for name in ("p_last_ts", "p_throttling_end", "p_pin_deadline"):
            getattr(self, name)[out] = NEVER
        for name in ("p_migration_events", "p_revocation_events", "p_pinned", "p_thrashing"):
            getattr(self, name)[out] = False
        for name in ("p_events", "p_throttling_count", "p_processors", "p_throttled"):
            getattr(self, name)[out] = 0
        self.p_pinned_residency[out] = UVM_ID_INVALID
        self.p_do_not_throttle[out] = UVM_ID_INVALID
        return out

    # -- page state changes ------------------------------------------------------------------------
    def _reset_pages(self, prow, pg):
        """thrashing_reset_page for (pool row, page) pairs that are thrashing: end throttling,
        unpin, forget the history."""
        if prow.size == 0:
            return
        rows_of = self._prow_owner[prow]
        self.p_throttled[prow, pg] = 0
        self.p_throttling_end[prow, pg] = NEVER
        pinned = self.p_pinned[prow, pg]
        np.subtract.at(self.b_pinned_count, rows_of[pinned], 1)
        self.p_pinned[prow, pg] = False
        self.p_pinned_residency[prow, pg] = UVM_ID_INVALID
        self.p_pin_deadline[prow, pg] = NEVER
        self.p_last_ts[prow, pg] = NEVER
        self.p_migration_events[prow, pg] = False
        self.p_revocation_events[prow, pg] = False
        self.p_events[prow, pg] = 0
        self.p_processors[prow, pg] = 0
        was = self.p_thrashing[prow, pg]
        np.subtract.at(self.b_num_thrashing, rows_of[was], 1)
        self.p_thrashing[prow, pg] = False

    @property
    def _prow_owner(self):
        owner = np.full(self._pcap, -1, np.int64)
        have = np.flatnonzero(self.b_prow[:self._bcap] >= 0)
        owner[self.b_prow[have]] = have
        return owner

    def reset(self, rows, mask):
        """thrashing_reset_pages_in_region: forget the thrashing pages among the masked ones (a
        migration the heuristics do not own, an munmap)."""
        if not self.uvm_perf_thrashing_enable:
            return
        rows = np.asarray(rows, np.int64)
        self._grow_blocks(int(rows.max()) + 1 if rows.size else 0)
        prow = self.b_prow[rows]
        have = prow >= 0
        sel = np.asarray(mask, bool)[have] & self.p_thrashing[prow[have]]
        i, pg = np.nonzero(sel)
        self._reset_pages(prow[have][i], pg)

    # -- events ---------------------------------------------------------------------------------------
    def on_migration(self, rows, mask, dst, now_ns, cause=UVM_MAKE_RESIDENT_CAUSE_REPLAYABLE_FAULT,
                     read_duplicate=False):
        """thrashing_event_cb for UVM_PERF_EVENT_MIGRATION: ``mask`` (rows x 512) pages of each
        block moved to ``dst``.  Rows must be unique (one event per block)."""
        if not self.uvm_perf_thrashing_enable or cause == UVM_MAKE_RESIDENT_CAUSE_EVICTION:
            return
        if cause not in _TRACKED_CAUSES or read_duplicate:
            # migrations by user request or advice take precedence over the heuristics
            self.reset(rows, mask)
            return
        rows = np.asarray(rows, np.int64)
        mask = np.asarray(mask, bool)
        self._grow_blocks(int(rows.max()) + 1 if rows.size else 0)
        if cause != UVM_MAKE_RESIDENT_CAUSE_PREFETCH:
            # is_migration_pinned_pages_update: pinned pages moving to their pinned residency
            prow = self.b_prow[rows]
            have = prow >= 0
            skip = np.zeros(rows.size, bool)
            if have.any():
                pinned_all = np.all(~mask[have] | self.p_pinned[prow[have]], axis=1) & mask[have].any(axis=1)
                skip[have] = pinned_all
            rows, mask = rows[~skip], mask[~skip]
        self._event(rows, mask, int(dst), int(now_ns), revocation=False)

    def on_revocation(self, rows, mask, proc, now_ns):
        """thrashing_event_cb for UVM_PERF_EVENT_REVOCATION: ``proc`` lost its permissions on the
        masked pages (a read-duplicate collapse, system-wide atomics)."""
        if not self.uvm_perf_thrashing_enable:
            return
        rows = np.asarray(rows, np.int64)
        self._grow_blocks(int(rows.max()) + 1 if rows.size else 0)
        self._event(rows, np.asarray(mask, bool), int(proc), int(now_ns), revocation=True)

    def _event(self, rows, mask, proc, now, revocation):
        if rows.size == 0:
            return
        if np.unique(rows).size != rows.size:
            raise ValueError("one thrashing event per block per call")
        now = int(now)
        lapse = self.lapse_ns
        # Per-page tracking only once two processors migrated into the block within a lapse.
        need = ((self.b_prow[rows] < 0) & (self.b_last_ts[rows] != NEVER) & (self.b_last_processor[rows] != proc)
                & (now - self.b_last_ts[rows] <= lapse))
        if need.any():
            self.b_prow[rows[need]] = self._alloc_prows(int(need.sum()))
        tracked = self.b_prow[rows] >= 0
        trows = rows[tracked]
        prow_of = self.b_prow[trows]
        i, pg = np.nonzero(mask[tracked])
        prow, brow = prow_of[i], trows[i]
        self.p_processors[prow, pg] |= np.int64(1) << proc
        last = self.p_last_ts[prow, pg]
        self.p_last_ts[prow, pg] = _stamp(now)
        seen = last != NEVER
        close = seen & (now - last <= lapse)
        ev = np.minimum(self.p_events[prow, pg] + close, PAGE_THRASHING_NUM_EVENTS_MAX)
        self.p_events[prow, pg] = ev
        thr = self.uvm_perf_thrashing_threshold
        detected = close & (ev == thr)            # again at every event while saturated at 7
        self.stats["num_thrashing"][proc] += int(detected.sum())
        newly = detected & ~self.p_thrashing[prow, pg]
        self.p_thrashing[prow[newly], pg[newly]] = True
        np.add.at(self.b_num_thrashing, brow[newly], 1)
        hot = close & (ev >= thr)
        self.b_last_thrashing_ts[np.unique(brow[hot])] = now
        flag = self.p_revocation_events if revocation else self.p_migration_events
        flag[prow[close], pg[close]] = True
        cool = seen & ~close & (ev >= thr) & ~self.p_pinned[prow, pg]
        self._reset_pages(prow[cool], pg[cool])
        self.b_last_ts[rows] = now
        self.b_last_processor[rows] = proc

    # -- hints ---------------------------------------------------------------------------------------
    def _epoch_resets(self, rows, now):
        """Blocks quiet for an epoch forget their per-page history (at most max_resets times)."""
        u = group_sorted(rows)[0]
        due = u[(self.b_prow[u] >= 0) & (self.b_last_thrashing_ts[u] != NEVER)
                & (now - self.b_last_thrashing_ts[u] > self.epoch_ns) & (self.b_pinned_count[u] == 0)
                & (self.b_reset_count[u] < self.uvm_perf_thrashing_max_resets)]
        if due.size == 0:
            return due
        self.b_reset_count[due] += 1
        prow = self.b_prow[due]
        self.p_throttled[prow] = 0
        self.p_throttling_end[prow] = NEVER
        self._free_prows.extend(prow.tolist())
        self.b_prow[due] = -1
        self.b_num_thrashing[due] = 0
        self.b_last_processor[due] = UVM_ID_INVALID
        self.b_last_ts[due] = NEVER
        self.b_last_thrashing_ts[due] = NEVER
        return due

    def _vote_lapse(self, deltas):
        """adjust_thrashing_lapse over a sequence of faults: the lapse each fault is judged by."""
        n = deltas.size
        used = np.full(n, self.lapse_ns, np.int64)
        if self.uvm_perf_thrashing_lapse_usec != UVM_PERF_THRASHING_LAPSE_USEC_DEFAULT or n == 0:
            return used
        V = self.uvm_perf_lapse_vote_threshold
        hi, lo = UVM_PERF_THRASHING_LAPSE_USEC_MAX * 1000, UVM_PERF_THRASHING_LAPSE_USEC_MIN * 1000
        pos = 0
        while pos < n:
            lapse = self.lapse_ns
            votes = np.where(deltas[pos:] < lapse, -1, 1)
            raw = self.lapse_stat + np.cumsum(votes)
            stat = ((raw + 128) % 256) - 128          # NvS8 wraps
            # both branches test stat >= V (the decrease one as -stat <= -V)
            grow = (stat >= V) & (lapse < hi)
            shrink = (stat >= V) & (lapse >= hi) & (lapse > lo)
            hit = np.flatnonzero(grow | shrink)
            if hit.size == 0:
                used[pos:] = lapse
                self.lapse_stat = int(stat[-1])
                return used
            k = int(hit[0])
            used[pos:pos + k] = lapse
            if grow[k]:
                self.lapse_ns = lapse + min(lapse // 8, UVM_PERF_THRASHING_LAPSE_USEC_MAX // 10 * 1000)
            else:
                self.lapse_ns = lapse - max(lapse // 8, lo)
            self.lapse_stat = int(np.trunc(stat[k] / 2))
            used[pos + k] = self.lapse_ns
            pos += k + 1
        return used

    def get_hint(self, rows, pages, requester, now_ns, closest=None, preferred=None, resident=None):
        """uvm_perf_thrashing_get_hint for faults of ``requester`` on (row, page) pairs, in service
        order (unique pairs).  Per pair: ``closest`` the closest resident processor (-1: none, taken
        as the CPU, as HMM does), ``preferred`` the preferred location (-1: none), ``resident`` the
        bitmask of processors holding the page (default: the closest one).  Throttles and pins are
        recorded; returns ThrashingHints."""
        rows = np.asarray(rows, np.int64)
        pages = np.asarray(pages, np.int64)
        n = rows.size
        hints = ThrashingHints(n)
        if not self.uvm_perf_thrashing_enable or n == 0:
            return hints
        self._grow_blocks(int(rows.max()) + 1)
        now = int(now_ns)
        req = int(requester)
        self._epoch_resets(rows, now)
        prow = self.b_prow[rows]
        live = np.flatnonzero(prow >= 0)
        live = live[self.p_events[prow[live], pages[live]] >= self.uvm_perf_thrashing_threshold]
        pr, pg = prow[live], pages[live]
        bit = np.int64(1) << req
        # A throttled requester stays throttled until its period ends (unless it is let through).
        throttled = (self.p_throttled[pr, pg] & bit) != 0
        still = throttled & (now < self.p_throttling_end[pr, pg]) & (self.p_do_not_throttle[pr, pg] != req)
        hints.type[live[still]] = UVM_PERF_THRASHING_HINT_TYPE_THROTTLE
        ends = throttled & ~still
        if ends.any():
            e_pr, e_pg = pr[ends], pg[ends]
            self.p_throttled[e_pr, e_pg] &= ~bit
            empty = self.p_throttled[e_pr, e_pg] == 0
            self.p_throttling_end[e_pr[empty], e_pg[empty]] = NEVER
        go = ~still
        live, pr, pg = live[go], pr[go], pg[go]
        lapse_used = self._vote_lapse(now - self.p_last_ts[pr, pg])
        over = (now - self.p_last_ts[pr, pg] > lapse_used) & ~self.p_pinned[pr, pg]
        live, pr, pg = live[~over], pr[~over], pg[~over]
        self.p_processors[pr, pg] |= bit
        # thrashing_throttle_update
        end = self.p_throttling_end[pr, pg]
        dnt = self.p_do_not_throttle[pr, pg]
        new_period = now > end
        self.p_throttling_end[pr[new_period], pg[new_period]] = _stamp(now + self.nap_ns)
        dnt = np.where(new_period, np.where(dnt == req, UVM_ID_INVALID, req), np.where(dnt == UVM_ID_INVALID, req, dnt))
        self.p_do_not_throttle[pr, pg] = dnt
        pinned = self.p_pinned[pr, pg]
        revoke = pinned & self.p_revocation_events[pr, pg] & (dnt != req)
        htype = np.where(revoke, UVM_PERF_THRASHING_HINT_TYPE_THROTTLE, UVM_PERF_THRASHING_HINT_TYPE_NONE)
        hres = np.full(live.size, UVM_ID_INVALID, np.int64)
        m = ~revoke
        t, r = self._migration_hint(pr[m], pg[m], req, dnt[m], pinned[m],
                                    None if closest is None else np.asarray(closest, np.int64)[live[m]],
                                    None if preferred is None else np.asarray(preferred, np.int64)[live[m]])
        htype[m], hres[m] = t, r
        hints.type[live], hints.residency[live] = htype, hres
        pin = htype == UVM_PERF_THRASHING_HINT_TYPE_PIN
        if resident is not None:
            held = np.asarray(resident, np.int64)[live[pin]]
        else:
            cl = np.full(rows.size, UVM_ID_CPU, np.int64) if closest is None else np.asarray(closest, np.int64)
            held = np.int64(1) << np.maximum(cl[live[pin]], 0)
        self._apply_pins(rows, live[pin], pr[pin], pg[pin], hres[pin], held, req, now)
        # thrashing_throttle_processor, for every throttle hint (the early ones included)
        thr = np.flatnonzero(hints.type == UVM_PERF_THRASHING_HINT_TYPE_THROTTLE)
        if thr.size:
            t_pr, t_pg = self.b_prow[rows[thr]], pages[thr]
            first = (self.p_throttled[t_pr, t_pg] & bit) == 0
            self.p_throttled[t_pr, t_pg] |= bit
            inc = first & ~self.p_pinned[t_pr, t_pg]
            self.p_throttling_count[t_pr[inc], t_pg[inc]] = np.minimum(
                self.p_throttling_count[t_pr[inc], t_pg[inc]] + 1, PAGE_THRASHING_THROTTLING_COUNT_MAX)
            np.add.at(self.b_throttling_count, rows[thr][first], 1)
            self.stats["num_throttle"][req] += int(thr.size)
            hints.end_ns[thr] = self.p_throttling_end[t_pr, t_pg]
        return hints

    def _migration_hint(self, pr, pg, req, dnt, pinned, closest, preferred):
        """get_hint_for_migration_thrashing, vectorised: the decision table of uvm_perf_thrashing.c."""
        n = pr.size
        topo = self.topology
        procs = self.p_processors[pr, pg]
        pref = np.full(n, UVM_ID_INVALID, np.int64) if preferred is None else preferred
        close = np.full(n, UVM_ID_INVALID, np.int64) if closest is None else closest
        close = np.where(close < 0, UVM_ID_CPU, close)      # HMM: not recorded means on the CPU
        pinned_res = self.p_pinned_residency[pr, pg]
        tcount = self.p_throttling_count[pr, pg]
        pin_thr = self.uvm_perf_thrashing_pin_threshold
        NONE, PIN, THROTTLE = (UVM_PERF_THRASHING_HINT_TYPE_NONE, UVM_PERF_THRASHING_HINT_TYPE_PIN,
                               UVM_PERF_THRASHING_HINT_TYPE_THROTTLE)
        htype = np.full(n, NONE, np.int8)
        hres = np.full(n, UVM_ID_INVALID, np.int64)
        undecided = np.ones(n, bool)

        def decide(cond, t, res=None):
            nonlocal undecided
            c = cond & undecided
            htype[c] = t
            if res is not None:
                hres[c] = np.broadcast_to(res, (n,))[c]
            undecided &= ~cond

        pref_thrashing = (pref >= 0) & ((procs >> np.maximum(pref, 0)) & 1 == 1)
        # 1. every thrashing processor can reach the preferred location: pin there
        decide(topo.can_all_access(procs, pref), PIN, pref)
        # 2. fast access (NVLink with native atomics) to where the page is
        fast = ~pref_thrashing & topo.fast_access(procs, close)
        cpu_side = fast & (close == UVM_ID_CPU) & topo.can_all_access(procs, np.full(n, req))
        decide(cpu_side & (req != UVM_ID_CPU), PIN, req)
        decide(cpu_side, NONE)
        decide(fast, PIN, close)
        # 3. the requester is the preferred location
        is_pref = pref == req
        decide(is_pref & pinned & ((pinned_res == pref) | (dnt == pref)), PIN, pref)
        decide(is_pref & pinned, THROTTLE)
        decide(is_pref & (dnt != pref), THROTTLE)
        decide(is_pref & (tcount >= pin_thr), PIN, pref)
        decide(is_pref, NONE)
        # 4. the page is pinned already
        if np.any(pinned & undecided):
            reach_req = topo.can_all_access(procs, np.full(n, req))
            common = np.full(n, (1 << self.nprocs) - 1, np.int64)
            for p in range(self.nprocs):
                common = np.where((procs >> p) & 1 == 1, common & topo.can_access[p], common)
            common_res = np.where(common == 0, req, topo.closest_in(common, req))
            decide(pinned & (dnt == req), PIN, np.where(reach_req, req, common_res))
            acc = np.asarray(topo.accessible_from, np.int64)[np.maximum(pinned_res, 0)]
            decide(pinned & (pinned_res >= 0) & ((acc >> req) & 1 == 1), PIN, pinned_res)
            decide(pinned, THROTTLE)
        # 5. not pinned: throttle all but the one let through; pin after enough periods
        decide(dnt != req, THROTTLE)
        decide(tcount >= pin_thr, PIN, req)
        return htype, hres

    def _apply_pins(self, rows, idx, pr, pg, res, held, req, now):
        """thrashing_pin_page for the PIN hints (uvm_processor_has_memory is true of every
        processor); ``held`` is the bitmask of processors where each page is resident."""
        if idx.size == 0:
            return
        first = ~self.p_pinned[pr, pg]
        moved = (held >> res) & 1 == 0
        # thrashing_throttling_reset_page: each throttled processor's throttling ends, and the
        # period with the last of them; with none throttled the period runs on, so a processor
        # faulting within it is not let through and maps the pinned page remotely
        clear = (first | moved) & (self.p_throttled[pr, pg] != 0)
        self.p_throttled[pr[clear], pg[clear]] = 0
        self.p_throttling_end[pr[clear], pg[clear]] = NEVER
        f_pr, f_pg = pr[first], pg[first]
        if self.pin_ns > 0:
            self.p_pin_deadline[f_pr, f_pg] = now + self.pin_ns
        self.p_throttling_count[f_pr, f_pg] = 0
        self.p_pinned[f_pr, f_pg] = True
        np.add.at(self.b_pinned_count, rows[idx][first], 1)
        self.p_pinned_residency[pr, pg] = res
        local = res == req
        self.stats["num_pin_local"][req] += int(local.sum())
        self.stats["num_pin_remote"][req] += int((~local).sum())

    # -- queries and timers -------------------------------------------------------------------------
    def _pool_masks(self, rows, arr):
        rows = np.asarray(rows, np.int64)
        out = np.zeros((rows.size, PAGES), bool)
        if not self.uvm_perf_thrashing_enable or rows.size == 0:
            return out
        self._grow_blocks(int(rows.max()) + 1)
        prow = self.b_prow[rows]
        have = prow >= 0
        out[have] = arr[prow[have]]
        return out

    def thrashing_pages(self, rows):
        """uvm_perf_thrashing_get_thrashing_pages: (rows x 512) pages detected as thrashing."""
        return self._pool_masks(rows, self.p_thrashing)

    def pinned_pages(self, rows):
        return self._pool_masks(rows, self.p_pinned)

    def pinned_residency(self, rows):
        rows = np.asarray(rows, np.int64)
        out = np.full((rows.size, PAGES), UVM_ID_INVALID, np.int64)
        prow = self.b_prow[rows] if rows.size else rows
        have = prow >= 0
        out[have] = np.where(self.p_pinned[prow[have]], self.p_pinned_residency[prow[have]], UVM_ID_INVALID)
        return out

    def expire_pins(self, now_ns):
        """thrashing_unpin_pages: pins whose deadline is within TIMER_GRANULARITY_NS of now are
        dropped and their history reset.  Returns (rows, masks) of the pages unpinned, whose
        remote mappings the driver unmaps (the next access faults and migrates)."""
        if self.pin_ns == 0:
            return np.zeros(0, np.int64), np.zeros((0, PAGES), bool)
        due = self.p_pinned & (self.p_pin_deadline <= int(now_ns) + TIMER_GRANULARITY_NS)
        prows = np.flatnonzero(due.any(axis=1))
        if prows.size == 0:
            return np.zeros(0, np.int64), np.zeros((0, PAGES), bool)
        masks = due[prows]
        owner = self._prow_owner[prows]
        i, pg = np.nonzero(masks)
        self._reset_pages(prows[i], pg)
        return owner, masks

    def counters(self):
        """thrashing_stats totals (procfs): num_thrashing, num_throttle, num_pin_local, num_pin_remote."""
        return {k: int(v.sum()) for k, v in self.stats.items()}


POLICIES = {cls.name: cls for cls in (UvmThrashing, NoThrashingMitigation)}
