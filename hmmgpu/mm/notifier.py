"""mmu notifiers: include/linux/mmu_notifier.h and mm/mmu_notifier.c.

Every change to a CPU page table is bracketed by
``mmu_notifier_invalidate_range_start`` / ``_end`` with an event saying why.
Two kinds of subscribers hear it:

* interval notifiers (``mmu_interval_notifier_insert``), the modern API HMM
  drivers use, with the sequence protocol of mm/mmu_notifier.c: the mm-wide
  ``invalidate_seq`` is odd while any invalidation is in flight; a driver takes
  ``seq = mmu_interval_read_begin(mni)`` (which waits out a running
  invalidation), works without locks, then under its own lock checks
  ``mmu_interval_read_retry(mni, seq)`` before installing device mappings; the
  invalidate callback calls ``mmu_interval_set_seq(mni, cur_seq)`` under that
  same lock, so a stale mapping can never be installed;
* full notifiers (``mmu_notifier_register``) with ``invalidate_range_start``,
  ``invalidate_range_end`` and ``release`` ops: the 2017 ``hmm_mirror`` sits here.
"""
import threading

MMU_NOTIFY_UNMAP = 0
MMU_NOTIFY_CLEAR = 1
MMU_NOTIFY_PROTECTION_VMA = 2
MMU_NOTIFY_PROTECTION_PAGE = 3
MMU_NOTIFY_SOFT_DIRTY = 4
MMU_NOTIFY_RELEASE = 5
MMU_NOTIFY_MIGRATE = 6
MMU_NOTIFY_EXCLUSIVE = 7

EVENT_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("MMU_NOTIFY_")}

MMU_NOTIFIER_RANGE_BLOCKABLE = 1 << 0


class MmuNotifierRange:
    """struct mmu_notifier_range: [start, end) of ``mm`` changing because of ``event``."""

    __slots__ = ("mm", "start", "end", "event", "owner", "flags")

    def __init__(self, mm, start, end, event, owner=None, flags=MMU_NOTIFIER_RANGE_BLOCKABLE):
        self.mm, self.start, self.end = mm, int(start), int(end)
        self.event, self.owner, self.flags = event, owner, flags

    def __repr__(self):
        return (f"MmuNotifierRange({EVENT_NAMES.get(self.event, self.event)}, "
                f"[0x{self.start:x}, 0x{self.end:x}), owner={self.owner!r})")


def mmu_notifier_range_blockable(range):
    """mmu_notifier_range_blockable(): may the callback sleep (take a mutex) for this range?"""
    return bool(range.flags & MMU_NOTIFIER_RANGE_BLOCKABLE)


class MmuIntervalNotifier:
    """struct mmu_interval_notifier: a driver's subscription to [start, last]."""

    def __init__(self):
        self.mm = None
        self.start = 0
        self.last = -1
        self.ops = None
        self.invalidate_seq = 0
        # per thread: the sequence mmu_interval_read_retry last found current (for the debug
        # check that a device mapping was installed under it; hmmgpu.hmm.debug)
        self.checked = {}


class MmuNotifier:
    """struct mmu_notifier: a full subscriber; ``ops`` has invalidate_range_start/_end, release."""

    def __init__(self, ops=None):
        self.ops = ops if ops is not None else self
        self.mm = None


class NotifierSubscriptions:
    """struct mmu_notifier_subscriptions of one mm."""

    def __init__(self):
        self.lock = threading.Lock()
        self.wq = threading.Condition(self.lock)
        self.invalidate_seq = 2          # even: no invalidation in flight
        self.active_invalidate_ranges = 0
        self.intervals = []              # live MmuIntervalNotifier
        self.deferred = []               # ("add"|"remove", mni) applied when the last invalidation ends
        self.full = []                   # MmuNotifier
        self.events = []                 # (event, start, end, owner): a trace, bounded, for observability
        self.trace_limit = 4096
        self.sleepers = 0                # threads waiting on ``wq``: only then does an end notify

    def wait_for(self, ready):
        """Sleep on ``wq`` (its lock held) until ``ready()``."""
        self.sleepers += 1
        try:
            self.wq.wait_for(ready)
        finally:
            self.sleepers -= 1

    def _record(self, range):
        if len(self.events) >= self.trace_limit:
            del self.events[: self.trace_limit // 2]
        self.events.append((range.event, range.start, range.end, range.owner))


def mmu_interval_notifier_insert(mni, mm, start, length, ops):
    """mmu_interval_notifier_insert(): subscribe ``mni`` to [start, start + length) of ``mm``.

    From now on every change to the CPU page tables of that range calls
    ``ops.invalidate(mni, range, cur_seq)`` before it happens; the callback takes the driver
    lock, calls ``mmu_interval_set_seq(mni, cur_seq)`` and tears down the device's mappings of
    ``range`` (returning only when the device can no longer use them), then returns True.
    Returns 0; ValueError for an empty or wrapping range.  Undo with
    ``mmu_interval_notifier_remove``.
    """
    subs = mm.notifiers
    if length <= 0 or start + length < start:
        raise ValueError(f"bad interval [0x{start:x}, +{length})")
    mni.mm, mni.start, mni.last, mni.ops = mm, int(start), int(start + length - 1), ops
    with subs.lock:
        if subs.active_invalidate_ranges:
            # An invalidation is running: the new subscription may miss part of it, so
            # read_begin must wait for it to end (seq equals the odd mm sequence).
            mni.invalidate_seq = subs.invalidate_seq
            subs.deferred.append(("add", mni))
        else:
            # Any odd value other than the mm's: read_begin will not wait, and a later
            # invalidation sets a new value so read_retry sees it.
            mni.invalidate_seq = subs.invalidate_seq - 1
            subs.intervals.append(mni)
    return 0


def mmu_interval_notifier_remove(mni):
    """mmu_interval_notifier_remove(): unsubscribe ``mni``; waits until no invalidation can
    still be calling its ops (so the driver may free what the callback uses afterwards)."""
    mm = mni.mm
    if mm is None:
        return
    subs = mm.notifiers
    with subs.lock:
        if subs.active_invalidate_ranges:
            subs.deferred.append(("remove", mni))
            seq = subs.invalidate_seq
            subs.wait_for(lambda: subs.invalidate_seq != seq)
        elif mni in subs.intervals:
            subs.intervals.remove(mni)
    mni.mm = None


def mmu_interval_read_begin(mni):
    """mmu_interval_read_begin(): the sequence to pass to ``mmu_interval_read_retry`` later.

    Waits while an invalidation of ``mni``'s range is running.  The driver then collects what
    it wants to map (``hmm_range_fault``) without its lock, takes its lock, and installs device
    mappings only if ``mmu_interval_read_retry(mni, seq)`` returns False.
    """
    subs = mni.mm.notifiers
    mni.checked.pop(threading.get_ident(), None)
    with subs.lock:
        seq = mni.invalidate_seq
        if seq == subs.invalidate_seq:       # an invalidation covering mni is running
            subs.wait_for(lambda: subs.invalidate_seq != seq)
    return seq


def mmu_interval_read_retry(mni, seq):
    """mmu_interval_read_retry(): True if an invalidation of ``mni`` began since
    ``mmu_interval_read_begin`` returned ``seq`` (start over); False means what was collected
    still holds and may be mapped.  Call it under the driver lock that the invalidate callback
    also takes, and keep the lock until the device mappings are installed."""
    retry = mni.invalidate_seq != seq
    if not retry:
        mni.checked[threading.get_ident()] = seq
    return retry


def mmu_interval_check_retry(mni, seq):
    """mmu_interval_check_retry(): a lockless early hint that ``seq`` is stale (hmm_range_fault
    uses it to give up early); only ``mmu_interval_read_retry`` under the lock is authoritative."""
    return mni.invalidate_seq != seq


def mmu_interval_set_seq(mni, cur_seq):
    """mmu_interval_set_seq(): the invalidate callback records the new sequence, under the
    driver lock, so that a concurrent ``mmu_interval_read_retry`` sees the change."""
    mni.invalidate_seq = cur_seq


def mmu_notifier_register(mn, mm):
    """mmu_notifier_register(): a full notifier for all of ``mm`` (ops invalidate_range_start,
    invalidate_range_end, release); the 2017 hmm_mirror sits on it.  Returns 0."""
    mn.mm = mm
    with mm.notifiers.lock:
        mm.notifiers.full.append(mn)
    return 0


def mmu_notifier_unregister(mn, mm):
    """mmu_notifier_unregister(): remove a full notifier."""
    with mm.notifiers.lock:
        if mn in mm.notifiers.full:
            mm.notifiers.full.remove(mn)
    mn.mm = None


def mmu_notifier_invalidate_range_start(range, full=True):
    """mmu_notifier_invalidate_range_start(): the CPU page tables of ``range`` are about to
    change: make the mm-wide sequence odd and call every interval notifier it covers (and the
    full notifiers' invalidate_range_start unless ``full`` is False)."""
    subs = range.mm.notifiers
    with subs.lock:
        subs._record(range)
        subs.active_invalidate_ranges += 1
        if subs.active_invalidate_ranges == 1:
            subs.invalidate_seq |= 1
        cur_seq = subs.invalidate_seq
        hits = [m for m in subs.intervals if m.start < range.end and range.start <= m.last]
        full = list(subs.full) if full else []
    # Callbacks run without the subscriptions lock (they take driver locks, may sleep).
    for mni in hits:
        mni.ops.invalidate(mni, range, cur_seq)
    for mn in full:
        f = getattr(mn.ops, "invalidate_range_start", None)
        if f:
            f(mn, range)


def mmu_notifier_invalidate_range_end(range, full=True):
    """mmu_notifier_invalidate_range_end(): the change is done; when the last one in flight
    ends, the sequence becomes even again and waiting read_begin calls go on."""
    subs = range.mm.notifiers
    with subs.lock:
        full = list(subs.full) if full else []
    for mn in full:
        f = getattr(mn.ops, "invalidate_range_end", None)
        if f:
            f(mn, range)
    with subs.lock:
        subs.active_invalidate_ranges -= 1
        if subs.active_invalidate_ranges == 0:
            subs.invalidate_seq += 1
            for op, mni in subs.deferred:
                if op == "add":
                    subs.intervals.append(mni)
                elif mni in subs.intervals:
                    subs.intervals.remove(mni)
            subs.deferred.clear()
            if subs.sleepers:
                subs.wq.notify_all()


class invalidation:
    """``with invalidation(mm, start, end, event):`` brackets a page-table change."""

    def __init__(self, mm, start, end, event, owner=None):
        self.range = MmuNotifierRange(mm, start, end, event, owner)

    def __enter__(self):
        mmu_notifier_invalidate_range_start(self.range)
        return self.range

    def __exit__(self, *exc):
        mmu_notifier_invalidate_range_end(self.range)
        return False


def mmu_notifier_release(mm):
    """exit_mmap(): tell every subscriber the address space is going away.

    Interval notifiers get an MMU_NOTIFY_RELEASE invalidation of the whole
    address space (mn_itree_release), full notifiers their ``release`` op.
    """
    everything = MmuNotifierRange(mm, 0, 1 << 64, MMU_NOTIFY_RELEASE)
    mmu_notifier_invalidate_range_start(everything, full=False)
    mmu_notifier_invalidate_range_end(everything, full=False)
    with mm.notifiers.lock:
        full = list(mm.notifiers.full)
    for mn in full:
        f = getattr(mn.ops, "release", None)
        if f:
            f(mn, mm)
