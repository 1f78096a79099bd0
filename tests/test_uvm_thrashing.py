"""Thrashing detection and mitigation (drivers/uvm/perf_thrashing.py), with UVM's semantics."""
import numpy as np
import pytest

from hmmgpu.drivers.uvm import perf_thrashing as pt
from hmmgpu.drivers.uvm.perf_thrashing import NoThrashingMitigation, UvmThrashing
from hmmgpu.drivers.uvm.va_block import (UVM_ID_CPU, UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE,
                                         UVM_MAKE_RESIDENT_CAUSE_PREFETCH, Topology, uvm_gpu_id)

CPU, GPU = UVM_ID_CPU, uvm_gpu_id(0)
PIN_HINT, THROTTLE_HINT = pt.UVM_PERF_THRASHING_HINT_TYPE_PIN, pt.UVM_PERF_THRASHING_HINT_TYPE_THROTTLE
US = 1000
PAGE = 7


def page_mask(*pages):
    m = np.zeros((1, 512), bool)
    m[0, list(pages)] = True
    return m


def bounce(t, times, start=1 * US, step=100 * US, first=GPU):
    """Migrate page PAGE of block 0 back and forth ``times`` times, ``step`` apart; returns the time
    of the last migration and the processor that has the page."""
    now, proc = start, first
    for _ in range(times):
        t.on_migration([0], page_mask(PAGE), proc, now)
        last = now
        now += step
        proc = CPU if proc == GPU else GPU
    return last, (GPU if proc == CPU else CPU)


def test_knobs_are_nvidia_uvms():
    k = UvmThrashing().knobs()
    assert k == {"uvm_perf_thrashing_enable": 1, "uvm_perf_thrashing_threshold": 3,
                 "uvm_perf_thrashing_pin_threshold": 10, "uvm_perf_thrashing_lapse_usec": 500,
                 "uvm_perf_lapse_vote_threshold": 32, "uvm_perf_thrashing_nap": 1, "uvm_perf_thrashing_epoch": 2000,
                 "uvm_perf_thrashing_pin": 300, "uvm_perf_thrashing_max_resets": 4}
    t = UvmThrashing()
    # nap, epoch and pin are multiples of the lapse
    assert (t.lapse_ns, t.nap_ns, t.epoch_ns, t.pin_ns) == (500 * US, 500 * US, 1000 * 1000 * US, 150 * 1000 * US)
    with pytest.raises(ValueError, match=r"uvm_perf_thrashing_threshold=8 is outside its valid range \[1, 7\]"):
        UvmThrashing(uvm_perf_thrashing_threshold=8)


def test_three_bounces_within_the_lapse_are_thrashing():
    t = UvmThrashing()
    # the first two migrations create the per-page tracking; each further one within 500 us counts
    bounce(t, 4)
    assert not t.thrashing_pages([0]).any()
    assert t.p_events[t.b_prow[0], PAGE] == 2
    t.on_migration([0], page_mask(PAGE), CPU, 401 * US)
    assert t.thrashing_pages([0])[0].tolist() == [p == PAGE for p in range(512)]
    assert t.counters()["num_thrashing"] == 1


def test_bounces_further_apart_than_the_lapse_are_not_thrashing():
    t = UvmThrashing()
    bounce(t, 8, step=501 * US)
    assert not t.thrashing_pages([0]).any()
    # the same processor migrating again does not make the block interesting either
    t2 = UvmThrashing()
    for i in range(6):
        t2.on_migration([0], page_mask(PAGE), GPU, (1 + 10 * i) * US)
    assert t2.b_prow[0] < 0 and not t2.thrashing_pages([0]).any()


def test_migrations_the_heuristics_do_not_own_reset_the_history():
    t = UvmThrashing()
    last, _ = bounce(t, 5)
    assert t.thrashing_pages([0])[0, PAGE]
    t.on_migration([0], page_mask(PAGE), GPU, last + 10 * US, cause=UVM_MAKE_RESIDENT_CAUSE_API_MIGRATE)
    assert not t.thrashing_pages([0]).any()
    last, _ = bounce(t, 5, start=last + 20 * US)
    t.on_migration([0], page_mask(PAGE), GPU, last + 10 * US, read_duplicate=True)
    assert not t.thrashing_pages([0]).any()


def test_a_page_bounced_three_times_in_the_lapse_gets_pinned_at_the_preferred_location():
    t = UvmThrashing()
    last, _ = bounce(t, 5)                     # 3 thrashing events
    hint = t.get_hint([0], [PAGE], GPU, last + 50 * US, preferred=[CPU])
    # every thrashing processor reaches system memory: pin there, the GPU maps it remotely
    assert hint.type.tolist() == [PIN_HINT] and hint.residency.tolist() == [CPU]
    assert t.pinned_pages([0])[0, PAGE] and t.pinned_residency([0])[0, PAGE] == CPU
    assert t.counters()["num_pin_remote"] == 1


def test_without_a_preferred_location_the_other_processor_is_throttled_then_the_page_pinned():
    t = UvmThrashing(uvm_perf_thrashing_pin_threshold=3)
    now, holder = bounce(t, 5)
    now += 20 * US
    pins = throttles = 0
    for _ in range(200):
        proc = CPU if holder == GPU else GPU
        h = t.get_hint([0], [PAGE], proc, now)
        if h.type[0] == PIN_HINT:
            pins += 1
            break
        if h.type[0] == THROTTLE_HINT:
            throttles += 1
            assert h.end_ns[0] + 64 > now             # naps until the period ends (stored to 64 ns)
        else:
            t.on_migration([0], page_mask(PAGE), proc, now)
            holder = proc
        now += 50 * US
    assert pins == 1 and throttles >= 3
    # pinned on the processor let through, which is the requester
    assert t.pinned_residency([0])[0, PAGE] == proc
    c = t.counters()
    assert c["num_throttle"] == throttles and c["num_pin_local"] == 1


def test_a_throttled_processor_stays_throttled_until_the_nap_ends():
    t = UvmThrashing()
    last, holder = bounce(t, 5)
    other = CPU if holder == GPU else GPU
    now = last + 10 * US
    h = t.get_hint([0], [PAGE], holder, now)          # opens a throttling period for ``holder``
    assert h.type[0] == 0
    h = t.get_hint([0], [PAGE], other, now + 10 * US)
    assert h.type[0] == THROTTLE_HINT and h.end_ns[0] == pt._stamp(now + t.nap_ns)
    h = t.get_hint([0], [PAGE], other, now + 100 * US)
    assert h.type[0] == THROTTLE_HINT
    assert t.p_throttling_count[t.b_prow[0], PAGE] == 1      # one period, however many retries


def test_fast_links_pin_at_once():
    # an NVLink-C2C-like machine: the GPU reaches system memory fast with native atomics
    topo = Topology(2, accessible_from=[0b11, 0b11], fast_link=[0b10, 0b01])
    t = UvmThrashing(topology=topo)
    last, _ = bounce(t, 5)
    h = t.get_hint([0], [PAGE], GPU, last + 10 * US, closest=[CPU])
    assert h.type[0] == PIN_HINT and h.residency[0] == GPU


def test_pins_expire_after_uvm_perf_thrashing_pin_lapses():
    t = UvmThrashing()
    last, _ = bounce(t, 5)
    t.get_hint([0], [PAGE], GPU, last + 50 * US, preferred=[CPU])
    rows, masks = t.expire_pins(last + 50 * US + t.pin_ns - 30 * US)
    assert rows.size == 0
    rows, masks = t.expire_pins(last + 50 * US + t.pin_ns - 10 * US)      # within the timer granularity
    assert rows.tolist() == [0] and np.flatnonzero(masks[0]).tolist() == [PAGE]
    assert not t.pinned_pages([0]).any() and not t.thrashing_pages([0]).any()
    assert t.b_pinned_count[0] == 0


def test_a_quiet_block_forgets_after_an_epoch_at_most_max_resets_times():
    t = UvmThrashing(uvm_perf_thrashing_max_resets=1)
    last, _ = bounce(t, 5)
    quiet = last + t.epoch_ns + 1000
    h = t.get_hint([0], [PAGE], GPU, quiet)
    assert h.type[0] == 0 and t.b_prow[0] < 0 and not t.thrashing_pages([0]).any()
    last, _ = bounce(t, 5, start=quiet + 10 * US)
    h = t.get_hint([0], [PAGE], GPU, last + t.epoch_ns + 1000)
    assert t.b_prow[0] >= 0                        # no resets left: the history stays


def test_prefetch_migrations_count_and_eviction_migrations_do_not():
    t = UvmThrashing()
    now = US
    for i in range(5):
        t.on_migration([0], page_mask(PAGE), GPU if i % 2 == 0 else CPU, now,
                       cause=UVM_MAKE_RESIDENT_CAUSE_PREFETCH)
        now += 100 * US
    assert t.thrashing_pages([0])[0, PAGE]
    t2 = UvmThrashing()
    for i in range(5):
        t2.on_migration([0], page_mask(PAGE), GPU if i % 2 == 0 else CPU, (1 + 100 * i) * US,
                        cause=pt.UVM_MAKE_RESIDENT_CAUSE_EVICTION)
    assert t2.b_prow[0] < 0


def test_many_pages_and_blocks_in_one_call():
    t = UvmThrashing()
    rows = np.arange(20)
    m = np.zeros((20, 512), bool)
    m[:, ::3] = True
    now = US
    for i in range(5):
        t.on_migration(rows, m, GPU if i % 2 == 0 else CPU, now)
        now += 100 * US
    assert (t.thrashing_pages(rows) == m).all()
    r, p = np.nonzero(m)
    h = t.get_hint(r, p, GPU, now, preferred=np.full(r.size, CPU))
    assert (h.type == PIN_HINT).all() and (h.residency == CPU).all()
    assert t.b_pinned_count[:20].tolist() == [m[0].sum()] * 20


def test_revocations_count_as_thrashing_events():
    t = UvmThrashing()
    bounce(t, 2)
    for i in range(3):
        t.on_revocation([0], page_mask(PAGE), CPU if i % 2 else GPU, (200 + 100 * i) * US)
    assert t.thrashing_pages([0])[0, PAGE] and t.p_revocation_events[t.b_prow[0], PAGE]


def test_lapse_votes_grow_the_lapse_as_the_driver_does():
    t = UvmThrashing()
    t.lapse_stat = 31
    # a fault judged against a long gap votes +1; at 32 votes the lapse grows by an eighth
    used = t._vote_lapse(np.array([600 * US, 600 * US]))
    assert used.tolist() == [562500, 562500] and t.lapse_ns == 562500 and t.lapse_stat == 17
    # votes for a shorter lapse only count down (the decrease branch never fires below the cap),
    # and the 8-bit counter wraps from -128 to 127, which grows the lapse again
    t.lapse_stat = -127
    used = t._vote_lapse(np.array([1 * US, 1 * US]))
    assert t.lapse_stat == 63 and used[1] == 632812
    # a lapse set by hand is never adjusted
    t2 = UvmThrashing(uvm_perf_thrashing_lapse_usec=400)
    t2.lapse_stat = 40
    assert t2._vote_lapse(np.array([1, 10 ** 9])).tolist() == [400 * US] * 2 and t2.lapse_stat == 40


def test_disabled_mitigations():
    for t in (UvmThrashing(uvm_perf_thrashing_enable=0), NoThrashingMitigation()):
        last, _ = bounce(t, 6)
        assert not t.thrashing_pages([0]).any()
        assert t.get_hint([0], [PAGE], GPU, last + 10 * US).type.tolist() == [0]


def test_a_pin_without_throttled_processors_keeps_the_throttling_period():
    """Two GPUs writing one page in turn, 170 us apart, as a driver services them: a fault
    migrates the page unless the hint pins it elsewhere (then the GPU maps it remotely and stops
    faulting); a throttled GPU naps to the period's end first.  thrashing_pin_page resets the
    throttling period only through the processors it throttled, so once the page is pinned on
    one GPU, the other, faulting within that period, maps it remotely and both stop faulting.
    (When the pin cleared the period unconditionally, every fault started a new period, was let
    through and pinned the page locally: it migrated on every write, forever.)"""
    g = (uvm_gpu_id(0), uvm_gpu_id(1))
    t = UvmThrashing(nprocs=3, uvm_perf_thrashing_pin_threshold=2)
    now, holder, remote, faults = 1 * US, None, None, []
    for i in range(60):
        req = g[i % 2]
        if req not in (holder, remote):
            faults.append(i)
            h = t.get_hint([0], [PAGE], req, now, closest=[-1 if holder is None else holder])
            if h.type[0] == PIN_HINT and h.residency[0] != req:
                remote = req
            else:
                if h.type[0] == THROTTLE_HINT:
                    now = max(now, int(h.end_ns[0]))
                t.on_migration([0], page_mask(PAGE), req, now)
                holder, remote = req, None
        now += 170 * US
    assert remote is not None and t.pinned_residency([0])[0, PAGE] == holder
    assert faults[-1] < 30 and t.counters()["num_pin_remote"] == 1
