"""Device jobs: results, faults, replay of only the faulted lanes, overflow, fatal faults,
user jobs, and invalidation racing a running job."""
import errno
import threading

import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice, JobFault, UserJob, Zeros
from hmmgpu.device.faults import ACCESS_ATOMIC, ACCESS_READ, ACCESS_WRITE
from hmmgpu.device.pagetable import PTE_ATOMIC, PTE_WRITE
from hmmgpu.device.testing import ToyDriver

BASE_PFN = 1 << 20
PAGE = 4096


def setup(backend, ram=512, frames=512, window=1024, migrate="odd", **kw):
    host = backend.host_arena(ram)
    dev = EmulatedDevice(backend, frames, BASE_PFN, host, **kw)
    drv = ToyDriver(dev, window, migrate=migrate)
    dev.service = drv.service
    return dev, drv


def rand_bytes(rng, npages):
    return rng.integers(0, 256, npages * PAGE, dtype=np.uint8)


def test_bulk_jobs_results(backend):
    rng = np.random.default_rng(7)
    dev, drv = setup(backend)
    n = 20
    xb = rand_bytes(rng, n)
    x = drv.region(n, xb, rng)
    y = drv.region(n, rand_bytes(rng, n), rng)
    z = drv.region(n, None, rng)
    # half the pages start mapped (remote), the rest fault in and odd ones migrate
    for a in (x, y, z):
        v = drv.vpns(a, n)
        drv.map(v[rng.random(n) < 0.5]).wait()
    off, nbytes = 48, (n - 2) * PAGE + 160            # unaligned to pages, ragged last lane
    r = dev.jobs.copy(z + off, x + off, nbytes)
    assert np.array_equal(drv.data(z, n)[off:off + nbytes], xb[off:off + nbytes])
    assert r.rounds[0] == -(-nbytes // PAGE)
    r = dev.jobs.reduce_sum(x + off, nbytes)
    assert r.value == int(xb[off:off + nbytes].view(np.uint32).astype(np.uint64).sum())
    dev.jobs.memset(y + 16, 0x5A, 3 * PAGE)
    yb = drv.data(y, n)
    assert (yb[16:16 + 3 * PAGE] == 0x5A).all()
    xf = drv.data(x, n).view(np.float32).copy()
    xf[~np.isfinite(xf)] = 1.0
    dev.write_pages(drv.backing[drv.vpns(x, n) - drv.vpn0], xf.view(np.uint8))
    yf = drv.data(y, n).view(np.float32).copy()
    yf[~np.isfinite(yf)] = 2.0
    dev.write_pages(drv.backing[drv.vpns(y, n) - drv.vpn0], yf.view(np.uint8))
    dev.jobs.axpy(np.float32(0.5), x, y, n * 1024)
    assert np.array_equal(drv.data(y, n).view(np.float32), np.float32(0.5) * xf + yf)


def test_replays_only_faulted_lanes_and_no_side_effects(backend):
    """A user job: lane i atomically adds x[i] into a counter.  Lanes whose x page is missing
    fault; only they are replayed, and the counter ends exactly at sum(x): no lane added twice,
    no faulted lane left a partial effect."""
    rng = np.random.default_rng(11)
    dev, drv = setup(backend, migrate="none", fault_buffer_entries=1 << 14)
    n = 16 * 1024                                   # 16 pages of uint32
    xs = rng.integers(0, 1000, n).astype(np.uint32)
    x = drv.region(16, xs.view(np.uint8), rng)
    ctr = drv.region(1, np.zeros(PAGE, np.uint8))
    mapped = np.zeros(16, bool)
    mapped[[0, 2, 3, 5, 8, 13]] = True
    drv.map(drv.vpns(x, 16)[mapped]).wait()
    drv.map(drv.vpns(ctr, 1)).wait()
    r = dev.jobs.run(COUNT_JOB, n, [x, ctr])
    # 10 pages x 1024 lanes fault; a pass services 20 batches of 256 records, then replays
    # those lanes only (and those whose page the pass covered), each faulted lane once
    assert r.rounds[0] == n and sum(r.rounds[1:]) == 10 * 1024
    if backend.name == "numpy":
        # records in lane order: the first pass's 5120 cover 5 pages, two passes
        assert r.rounds == [n, 5120, 5120] and dev.counters["num_replays"] == 2
    # (a GPU, like the CUDA shim, writes records in warp-scheduling order: 5120 of them may
    # cover all 10 pages, and one pass replays every faulted lane)
    assert int(drv.data(ctr, 1)[:4].view(np.uint32)[0]) == int(xs.sum(dtype=np.uint64))
    assert dev.counters["num_read_faults"] > 0


COUNT_JOB = UserJob(
    "count_job",
    cuda_source=r"""
__device__ void count_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u32 v = hmm_load<hmm_u32>(L, a[0] + 4 * lane);
    hmm_atomic_add<unsigned int>(L, a[1], v);
}
HMM_DEFINE_JOB(count_job, count_lane)
""",
    numpy_lane=lambda ctx, lanes, a: ctx.atomic_add(
        np.uint64(a[1]), ctx.load(np.uint64(a[0]) + np.uint64(4) * lanes.astype(np.uint64), np.uint32)))


STAMP_JOB = UserJob(
    "stamp_job",
    cuda_source=r"""
__device__ void stamp_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_store<hmm_u32>(L, a[0] + (4 * lane) % a[1], (hmm_u32)a[2]);
}
HMM_DEFINE_JOB(stamp_job, stamp_lane)
""",
    numpy_lane=lambda ctx, lanes, a: ctx.store(
        np.uint64(a[0]) + (np.uint64(4) * lanes.astype(np.uint64)) % np.uint64(a[1]),
        np.full(lanes.size, a[2], np.uint32)))


def test_duplicate_faults_are_merged(backend):
    """Many lanes gather from the same few missing pages: the driver sees each page once."""
    rng = np.random.default_rng(5)
    n = 4096
    dev, drv = setup(backend, migrate="none", fault_buffer_entries=n)
    src_vals = rng.integers(0, 1 << 32, 4 * 1024, dtype=np.uint64).astype(np.uint32)
    src = drv.region(4, src_vals.view(np.uint8), rng)
    idx_vals = rng.integers(0, src_vals.size, n).astype(np.int64)
    idx = drv.region(8, idx_vals.view(np.uint8), rng)
    dst = drv.region(4, None, rng)
    drv.map(drv.vpns(idx, 8)).wait()
    drv.map(drv.vpns(dst, 4)).wait()
    r = dev.jobs.gather(dst, src, idx, n)
    got = drv.data(dst, 4).view(np.uint32)
    assert np.array_equal(got, src_vals[idx_vals])
    serviced = np.concatenate([v for v, _ in drv.serviced])
    assert np.array_equal(np.sort(serviced), drv.vpns(src, 4))      # each page once
    c = dev.counters
    assert c["num_read_faults"] == n                   # every lane recorded its miss once
    assert c["num_duplicate_faults"] == n - 4
    assert c["num_fault_batches"] == -(-n // 256) and r.rounds == [n, n]


def test_fault_buffer_overflow(backend):
    """A 4-entry buffer and 64 lanes faulting on 64 pages in one slice: the lanes that found it
    full are replayed too, and re-fault until every page is in; each overflow is a record a real
    ring of 4 entries could not have held."""
    rng = np.random.default_rng(9)
    dev, drv = setup(backend, fault_buffer_entries=4, fault_batch_size=2)
    data = rand_bytes(rng, 64)
    a = drv.region(64, data, rng)
    b = drv.region(64, None, rng)
    drv.map(drv.vpns(b, 64)).wait()
    sizes = []
    orig = drv.service
    dev.service = lambda f: (sizes.append(len(f)), orig(f))[1]
    r = dev.jobs.copy(b, a, 64 * PAGE)
    assert np.array_equal(drv.data(b, 64), data)
    assert max(sizes) <= 4 and sum(sizes) == 64       # a pass takes what the ring held
    assert dev.counters["num_buffer_overflows"] == sum(60 - 4 * k for k in range(15))
    assert r.rounds == [64] + [64 - 4 * k for k in range(16)]


def test_write_and_atomic_faults_upgrade(backend):
    dev, drv = setup(backend, migrate="none")
    a = drv.region(2, np.zeros(2 * PAGE, np.uint8))
    drv.map(drv.vpns(a, 2), flags=0).wait()           # read-only, no atomics
    dev.jobs.reduce_sum(a, 2 * PAGE)
    assert dev.counters["num_read_faults"] == 0
    dev.jobs.memset(a, 3, PAGE)
    assert dev.counters["num_write_faults"] == 1
    accesses = [acc for _, acc in drv.serviced]
    assert accesses[-1].tolist() == [ACCESS_WRITE]
    drv.map(drv.vpns(a, 2), flags=PTE_WRITE).wait()    # writable but not atomic
    dev.jobs.run(COUNT_JOB, 1, [a, a + PAGE])
    assert dev.counters["num_atomic_faults"] == 1
    assert drv.serviced[-1][1].tolist() == [ACCESS_ATOMIC]
    assert int(drv.data(a, 2)[PAGE:PAGE + 4].view(np.uint32)[0]) == 0x03030303


def test_fatal_fault_cancels_with_address(backend):
    dev, drv = setup(backend)
    a = drv.region(4, None)
    drv.prot_none[drv.vpns(a, 4)[2] - drv.vpn0] = True
    with pytest.raises(JobFault) as ei:
        dev.jobs.memset(a, 1, 4 * PAGE)
    assert ei.value.errno == errno.EFAULT
    assert ei.value.address == a + 2 * PAGE and f"0x{a + 2 * PAGE:x}" in str(ei.value)
    assert dev.counters["num_fatal_faults"] == 1
    # errno chosen by the driver; and no handler at all
    dev.service = lambda f: np.full(len(f), errno.EPERM)
    with pytest.raises(JobFault) as ei:
        dev.jobs.memset(a + 2 * PAGE, 1, 16)
    assert ei.value.errno == errno.EPERM
    dev.service = None
    with pytest.raises(JobFault, match="write fault at 0x"):
        dev.jobs.memset(drv.base + 1000 * PAGE, 1, 16)
    # the device is still usable: the fault buffer was left empty
    dev.service = drv.service
    assert dev.jobs.memset(a, 1, 2 * PAGE).replays >= 0


def test_unserviced_fault_is_reported_not_spun(backend):
    dev, drv = setup(backend)
    a = drv.region(1, None)
    dev.service = lambda f: None                        # claims success, maps nothing
    with pytest.raises(JobFault, match="without mapping"):
        dev.jobs.memset(a, 1, 16)


def _lists(rng, drv, nlanes, length, npages):
    """Linked lists in 'process memory': nodes {next, value} at random 16-byte slots."""
    slots = rng.permutation(npages * PAGE // 16)[: nlanes * length]
    mem = np.zeros(npages * PAGE // 8, np.uint64)
    base = drv.region(npages, None, rng)
    addr = base + slots.astype(np.uint64) * np.uint64(16)
    addr = addr.reshape(nlanes, length)
    vals = rng.integers(0, 1 << 40, (nlanes, length)).astype(np.uint64)
    nxt = np.concatenate((addr[:, 1:], np.zeros((nlanes, 1), np.uint64)), axis=1)
    w = ((addr - np.uint64(base)) // np.uint64(8)).astype(np.int64)
    mem[w] = nxt
    mem[w + 1] = vals
    pf = drv.backing[drv.vpns(base, npages) - drv.vpn0]
    drv.dev.write_pages(pf, mem.view(np.uint8))
    return base, addr[:, 0], vals.sum(axis=1, dtype=np.uint64)


def _tree(rng, drv, nkeys, npages):
    """A binary search tree of random keys, nodes {left, right, key, value} at 32-byte slots."""
    keys = rng.choice(1 << 40, nkeys, replace=False).astype(np.uint64)
    slots = rng.permutation(npages * PAGE // 32)[:nkeys]
    base = drv.region(npages, None, rng)
    addr = np.uint64(base) + slots.astype(np.uint64) * np.uint64(32)
    mem = np.zeros(npages * PAGE // 8, np.uint64)
    # insert in random order: children computed with a vectorised pass per level
    order = keys.copy()
    left = np.zeros(nkeys, np.uint64)
    right = np.zeros(nkeys, np.uint64)
    # build a balanced BST from the sorted keys (no per-node Python loop): node i of the sorted
    # order has children at the middles of its halves
    srt = np.argsort(order)
    lo, hi = np.zeros(1, np.int64), np.full(1, nkeys, np.int64)
    parent_of = {}
    root = (lo + hi) // 2
    levels = []
    cur_lo, cur_hi = lo, hi
    while cur_lo.size:
        mid = (cur_lo + cur_hi) // 2
        levels.append((cur_lo, mid, cur_hi))
        nl, nh = np.concatenate((cur_lo, mid + 1)), np.concatenate((mid, cur_hi))
        keep = nl < nh
        cur_lo, cur_hi = nl[keep], nh[keep]
    for lo_, mid, hi_ in levels:
        lm = (lo_ + mid) // 2
        has_l = lo_ < mid
        rm = (mid + 1 + hi_) // 2
        has_r = mid + 1 < hi_
        n_id = srt[mid]
        left[n_id[has_l]] = addr[srt[lm[has_l]]]
        right[n_id[has_r]] = addr[srt[rm[has_r]]]
    vals = rng.integers(0, 1 << 50, nkeys).astype(np.uint64)
    w = ((addr - np.uint64(base)) // np.uint64(8)).astype(np.int64)
    mem[w], mem[w + 1], mem[w + 2], mem[w + 3] = left, right, keys, vals
    del parent_of
    drv.dev.write_pages(drv.backing[drv.vpns(base, npages) - drv.vpn0], mem.view(np.uint8))
    return base, addr[srt[root[0]]], keys, vals


def test_list_chase_and_tree_search_resume_after_faults(backend):
    rng = np.random.default_rng(13)
    dev, drv = setup(backend)
    base, heads, sums = _lists(rng, drv, 64, 50, 16)
    drv.map(drv.vpns(base, 16)[::2]).wait()           # half the pages: lanes fault mid-walk
    r = dev.jobs.list_chase(heads)
    s, steps = r.value
    assert np.array_equal(s, sums) and (steps == 50).all()
    assert r.replays >= 1                              # lanes resumed mid-list
    tbase, root, keys, vals = _tree(rng, drv, 3000, 32)
    probe = np.concatenate((keys[rng.permutation(keys.size)[:500]], np.array([1 << 45], np.uint64)))
    r = dev.jobs.tree_search(root, probe)
    found, depth = r.value
    want = np.full(probe.size, np.iinfo(np.uint64).max, np.uint64)
    pos = {int(k): i for i, k in enumerate(keys[:0])}
    del pos
    sk = np.argsort(keys)
    hit = np.searchsorted(keys[sk], probe)
    ok = (hit < keys.size) & (keys[sk][np.minimum(hit, keys.size - 1)] == probe)
    want[ok] = vals[sk][hit[ok]]
    assert np.array_equal(found, want)
    assert depth.max() <= 12 and depth.min() >= 1


def test_invalidation_racing_a_running_job(backend):
    """A long job stamps pages; another thread invalidates them mid-job and, once invalidate()
    returned, writes a generation tag into the old frames.  The job must never write them
    again: the tags must survive, and the lanes replayed after the fault land in new frames."""
    dev, drv = setup(backend, migrate="none", slice_lanes=512)
    npages = 8
    a = drv.region(npages, None)
    v = drv.vpns(a, npages)
    drv.map(v).wait()
    old = drv.backing[v - drv.vpn0].copy()
    started = threading.Event()
    done = threading.Event()
    orig_launch = dev.jobs.ex.launch

    def launch(*args, **kw):
        f = orig_launch(*args, **kw)
        started.set()
        return f
    dev.jobs.ex.launch = launch

    def invalidator():
        started.wait(10)
        dev.pt.invalidate(v)                          # returns when no lane can use old entries
        # move the pages: fresh frames, and the old ones get generation tag 0xEE
        drv.backing[v - drv.vpn0] = drv.alloc_ram(npages)
        dev.write_pages(old, np.full((npages, PAGE), 0xEE, np.uint8))
        done.set()

    t = threading.Thread(target=invalidator)
    t.start()
    nlanes = npages * 1024 * 64                       # 64 passes over the pages
    r = dev.jobs.run(STAMP_JOB, nlanes, [a, npages * PAGE, 0x11223344])
    t.join(10)
    assert done.is_set()
    assert (dev.read_pages(old) == 0xEE).all(), "a lane wrote a page after its invalidation returned"
    new = drv.backing[v - drv.vpn0]
    words = dev.read_pages(new).view(np.uint32)
    assert np.isin(words, [0, 0x11223344]).all()      # fresh frames: zero, or stamped after the move
    assert r.replays == 0 or (words == 0x11223344).any()
    assert dev.pt.stats["pt_invalidations"] == 1


def test_numpy_lane_context_api():
    """The fallback lane context: load/store/atomic_add/probe vectorised over lanes."""
    from hmmgpu.device.backend import get_backend
    dev, drv = setup(get_backend("numpy"), migrate="none")
    a = drv.region(2, np.arange(2 * PAGE // 4, dtype=np.uint32).view(np.uint8))
    drv.map(drv.vpns(a, 1)).wait()
    seen = {}

    def lane(ctx, lanes, args):
        x = ctx.load(np.uint64(a) + np.uint64(4096) * (lanes % 2).astype(np.uint64), np.uint32)
        seen.setdefault("probe" if ctx.probe_pass else "commit", []).append(lanes.copy())
        ctx.atomic_add(np.uint64(a + 8), x)
    r = dev.jobs.run(UserJob("np_lane", numpy_lane=lane), 4)
    assert r.rounds == [4, 2]
    assert int(drv.data(a, 1)[8:12].view(np.uint32)[0]) == 2 + 2 * 1024


def test_coalesce_semantics():
    """One entry per page over a whole pass: the strongest access, its earliest lane, the batch
    of that record; every other record is a duplicate."""
    from hmmgpu.device.faults import coalesce

    def rec(page, acc, lane):
        return [page * PAGE + 8, lane, acc, 1]
    R = np.array([rec(5, ACCESS_READ, 0), rec(3, ACCESS_READ, 1), rec(5, ACCESS_WRITE, 2),   # batch 0
                  rec(5, ACCESS_READ, 3), rec(3, ACCESS_WRITE, 4), rec(9, ACCESS_READ, 5),   # batch 1
                  rec(3, ACCESS_WRITE, 6), rec(9, ACCESS_ATOMIC, 7)], np.uint64)             # batch 2
    d, dups = coalesce(R, 3)
    assert d.vpn.tolist() == [3, 5, 9]                                  # sorted by address
    assert d.access.tolist() == [ACCESS_WRITE, ACCESS_WRITE, ACCESS_ATOMIC]
    assert d.lane.tolist() == [4, 2, 7] and d.batch.tolist() == [1, 0, 2]
    assert (d.vaddr & np.uint64(4095)).tolist() == [8, 8, 8]
    assert dups == 5 and d.nbatches == 3 and d.nrecords == 8
    big = np.zeros((1 << 16, 4), np.uint64)
    big[:, 0] = (np.arange(1 << 16) % 1000) * PAGE
    b, n = coalesce(big, 256)
    assert len(b) == 1000 and n == (1 << 16) - 1000 and b.nbatches == 256


def test_jobs_in_two_contexts_translate_through_their_own_tables(backend):
    """The same virtual addresses in two address spaces of one device: each context's job reads
    and writes its own pages and faults to its own service; the default space is untouched."""
    rng = np.random.default_rng(3)
    host = backend.host_arena(512)
    dev = EmulatedDevice(backend, 512, BASE_PFN, host)
    ca, cb = dev.create_context(), dev.create_context()
    da = ToyDriver(dev, 64, migrate="odd", space=ca)
    db = ToyDriver(dev, 64, migrate="none", space=cb, ram_start=200)
    db.next_dev = BASE_PFN + 256                       # the two drivers share the device's frames
    ca.service, cb.service = da.service, db.service
    n = 8
    xa, xb = rand_bytes(rng, n), rand_bytes(rng, n)
    va, vb = da.region(n, xa, rng), db.region(n, xb, rng)
    assert va == vb                                    # same addresses, different spaces
    ya, yb = da.region(n, None, rng), db.region(n, None, rng)
    ra = ca.jobs.copy(ya, va, n * PAGE)
    rb = cb.jobs.copy(yb, vb, n * PAGE)
    assert np.array_equal(da.data(ya, n), xa) and np.array_equal(db.data(yb, n), xb)
    assert ra.faults == 2 * n and rb.faults == 2 * n and da.calls >= 1 and db.calls >= 1
    assert ra.job_id != rb.job_id and dev.jobs.next_job_id == 3      # one queue per device
    assert not dev.pt.lookup(da.vpns(va, n)).any()
    with pytest.raises(JobFault) as ei:                # the default space has no service
        dev.jobs.reduce_sum(va, PAGE)
    assert ei.value.errno == errno.EFAULT
    # an invalidation in one context: its next job faults again, the other's does not
    ca.pt.invalidate(da.vpns(va, n))
    assert ca.jobs.reduce_sum(va, n * PAGE).faults == n
    assert cb.jobs.reduce_sum(vb, n * PAGE).faults == 0


def _policy_run(backend, policy):
    """reduce_sum over 30 unmapped pages starting 502 pages into the window (across a 2 MiB
    boundary), batches of 4, passes of 3 batches: who got called with what, and the rounds."""
    dev, drv = setup(backend, ram=600, window=600, migrate="none", fault_batch_size=4,
                     max_batches_per_service=3, replay_policy=policy)
    drv.region(502)
    rng = np.random.default_rng(1)
    data = rand_bytes(rng, 30)
    a = drv.region(30, data, rng)
    calls = []
    dev.service = lambda f: (calls.append((f.vpn.copy(), getattr(f, "nbatches", None))), drv.service(f))[1]
    r = dev.jobs.reduce_sum(a, 30 * PAGE)
    assert r.value == int(data.view(np.uint32).sum(dtype=np.uint64))
    return r, calls, dev.counters


def test_replay_policies(backend):
    """BATCH_FLUSH (default): one call per pass of up to 3 batches, one replay each; BATCH: a
    call and a replay per batch; BLOCK: per 2 MiB block of each batch; ONCE: every record
    serviced (a call per pass) before one replay.  Only serviced lanes are replayed."""
    r, calls, c = _policy_run(backend, "batch_flush")
    assert r.rounds == [30, 12, 12, 6] and c["num_replays"] == 3
    assert [v.size for v, _ in calls] == [12, 12, 6] and [nb for _, nb in calls] == [3, 3, 2]
    assert all((np.diff(v) > 0).all() for v, _ in calls)          # sorted by address
    assert c["num_fault_batches"] == 8 and c["num_read_faults"] == 30
    r, calls, c = _policy_run(backend, "batch")
    assert r.rounds == [30, 12, 12, 6] and c["num_replays"] == 8
    assert [v.size for v, _ in calls] == [4, 4, 4, 4, 4, 4, 4, 2]
    r, calls, c = _policy_run(backend, "block")
    assert r.rounds == [30, 12, 12, 6] and c["num_replays"] == len(calls)
    assert all(np.unique(v // 512).size == 1 for v, _ in calls)
    if backend.name == "numpy":                   # lanes record in lane order: one batch straddles
        assert len(calls) == 9
    r, calls, c = _policy_run(backend, "once")
    assert r.rounds == [30, 30] and c["num_replays"] == 1 and len(calls) == 3


def test_replay_policy_is_checked(backend):
    with pytest.raises(ValueError, match="replay policy"):
        setup(backend, replay_policy="sometimes")


def test_ring_fetched_before_it_could_overflow(backend):
    """A round of 64 lanes in slices of 16 raises 64 records into a ring of 32: the host fetches
    between slices, so a real ring of that size would never overflow and none is counted; a
    slice that alone can raise more than the ring holds does overflow (test_fault_buffer_overflow)."""
    rng = np.random.default_rng(4)
    dev, drv = setup(backend, migrate="none", fault_buffer_entries=32, slice_lanes=16)
    data = rand_bytes(rng, 64)
    a = drv.region(64, data, rng)
    fetches = dev.fault_buffer.fetches
    r = dev.jobs.reduce_sum(a, 64 * PAGE)
    assert r.value == int(data.view(np.uint32).sum(dtype=np.uint64))
    assert dev.counters["num_buffer_overflows"] == 0 and r.rounds == [64, 64]
    assert dev.fault_buffer.fetches - fetches == 2 * (3 + 1)  # before slices 2-4, at the end; 2 rounds
    assert dev.counters["num_read_faults"] == 64


def test_a_cold_job_takes_passes_of_twenty_batches(backend):
    """n faulting pages take 1 + ceil(n / (256 * 20)) rounds and launch at most 2n lanes: the
    lanes whose faults wait for a later pass are not relaunched."""
    n = 6000 if backend.name == "numpy" else 600
    dev, drv = setup(backend, ram=n + 8, window=n + 8, migrate="none",
                     **({} if backend.name == "numpy" else {"fault_batch_size": 32}))
    a = drv.region(n, None)
    before = dev.jobs.lanes_launched
    r = dev.jobs.memset(a, 7, n * PAGE)
    per_pass = 20 * dev.fault_buffer.batch_size
    assert len(r.rounds) == 1 + -(-n // per_pass) and r.rounds[1] == min(n, per_pass)
    assert dev.jobs.lanes_launched - before == 2 * n == sum(r.rounds)
    assert (drv.data(a, n) == 7).all()


ACC_JOB = UserJob(
    "acc_job",
    cuda_source=r"""
__device__ void acc_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 s = 0;
    for (hmm_u64 k = 0; k < 4; k++) s += hmm_load<hmm_u64>(L, a[0] + 4096 * (lane + 8 * k));
    ((hmm_u64*)a[1])[lane] += s + 1;
}
HMM_DEFINE_JOB(acc_job, acc_lane)
""",
    numpy_lane=lambda ctx, lanes, a: a[1].__setitem__(lanes, a[1][lanes] + sum(
        ctx.load(np.uint64(a[0]) + np.uint64(4096) * (lanes + 8 * k).astype(np.uint64), np.uint64)
        for k in range(4)) + np.uint64(1)))


def test_scratch_is_committed_once_per_lane(backend):
    """Lane i sums pages i, i+8, i+16, i+24 into its scratch element; the pages come in over
    four fault rounds (a lane stops at its first missing page and starts over on replay), yet
    every element ends at exactly sum + 1 -- the probe pass and the faulted passes leave nothing."""
    dev, drv = setup(backend, migrate="none")
    vals = np.arange(1, 33, dtype=np.uint64) * np.uint64(1000)
    pages = np.zeros((32, PAGE // 8), np.uint64)
    pages[:, 0] = vals
    x = drv.region(32, pages.view(np.uint8))
    drv.map(drv.vpns(x, 32)[[0, 2, 4, 6, 9]]).wait()
    r = dev.jobs.run(ACC_JOB, 8, [x, Zeros(8)])
    want = vals.reshape(4, 8).sum(axis=0) + np.uint64(1)
    assert np.array_equal(r.outputs[0], want)
    assert r.replays == 4
    # and with no fault at all: still once
    r = dev.jobs.run(ACC_JOB, 8, [x, np.full(8, 5, np.uint64)])
    assert r.replays == 0 and np.array_equal(r.outputs[0], want + np.uint64(5))


@pytest.mark.gpu
def test_cuda_fault_round_costs(backend):
    """On the CuPy path a fault round costs at most 3 kernel launches (the slice, the service's
    page-table links and leaves) and 1 host synchronisation (the fault ring's read), plus one
    synchronisation per job for its outputs."""
    if backend.name != "cupy":
        pytest.skip("counts the CuPy backend's launches")
    n = 96
    dev, drv = setup(backend, ram=n + 8, window=n + 8, migrate="none", fault_batch_size=8,
                     max_batches_per_service=2)
    a = drv.region(n, None)
    from hmmgpu import trace
    c0 = dict(backend.counters)
    t = trace.enable()
    try:
        r = dev.jobs.memset(a, 3, n * PAGE)
    finally:
        trace.disable()
    launches = backend.counters["kernel_launches"] - c0["kernel_launches"]
    syncs = backend.counters["host_syncs"] - c0["host_syncs"]
    assert len(r.rounds) == 1 + n // 16
    assert launches <= 3 * len(r.rounds) and syncs <= len(r.rounds) + 1, (launches, syncs, r.rounds)
    assert dev.stats()["kernel_launches"] == backend.counters["kernel_launches"]
    # the trace samples the counters after each service: a round apart, +1 sync, <= 3 launches
    samples = [e[6] for e in t.events if e[0] == "C" and e[1] == "cuda calls"]
    assert len(samples) == len(r.rounds) - 1
    for x, y in zip(samples, samples[1:]):
        assert y["host_syncs"] - x["host_syncs"] == 1 and y["kernel_launches"] - x["kernel_launches"] <= 3
    assert (drv.data(a, n) == 3).all()


def test_page_jobs_over_runs_of_frames_either_way(backend):
    """Whole-page memset and reduce over frames that run up, run down and scatter (the NumPy
    twins read runs as slices): same bytes and sums as page-by-page."""
    rng = np.random.default_rng(21)
    dev, drv = setup(backend, migrate="none")
    n = 48
    a = drv.region(n, None)
    i0 = (a >> 12) - drv.vpn0
    pf = drv.backing[i0:i0 + n].copy()
    pf[10:30] = pf[10:30][::-1]                        # a descending run
    pf[36:] = rng.permutation(pf[36:])                 # scattered
    drv.backing[i0:i0 + n] = pf
    data = rand_bytes(rng, n)
    dev.write_pages(pf, data)
    r = dev.jobs.reduce_sum(a, n * PAGE)
    assert r.value == int(data.view(np.uint32).sum(dtype=np.uint64))
    per_page = data.view(np.uint32).reshape(n, 1024).astype(np.uint64).sum(axis=1)
    assert np.array_equal(r.outputs[0], per_page)
    dev.jobs.memset(a + 4 * PAGE, 0xA5, (n - 8) * PAGE)
    got = drv.data(a, n).reshape(n, PAGE)
    assert (got[4:n - 4] == 0xA5).all() and np.array_equal(got[:4], data.reshape(n, PAGE)[:4])
    assert np.array_equal(got[n - 4:], data.reshape(n, PAGE)[n - 4:])


def test_records_of_pages_a_pass_serviced_are_dropped(backend):
    """64 lanes gather from 2 missing pages, passes of one batch of 4 records: the first pass
    services both pages, and the 60 records still in the cache for them are duplicates -- their
    lanes replay with the others instead of waiting for passes of their own."""
    rng = np.random.default_rng(8)
    n = 64
    dev, drv = setup(backend, migrate="none", fault_batch_size=4, max_batches_per_service=1)
    src_vals = rng.integers(0, 1 << 32, 2 * 1024, dtype=np.uint64).astype(np.uint32)
    src = drv.region(2, src_vals.view(np.uint8), rng)
    idx_vals = (np.arange(n) % 2 * 1024 + np.arange(n)).astype(np.int64)   # alternating pages
    idx = drv.region(1, np.concatenate((idx_vals, np.zeros(512 - n, np.int64))).view(np.uint8), rng)
    dst = drv.region(1, None, rng)
    drv.map(np.concatenate((drv.vpns(idx, 1), drv.vpns(dst, 1)))).wait()
    r = dev.jobs.gather(dst, src, idx, n)
    assert np.array_equal(drv.data(dst, 1).view(np.uint32)[:n], src_vals[idx_vals])
    c = dev.counters
    assert r.faults == 2 and c["num_read_faults"] == n and c["num_duplicate_faults"] == n - 2
    if backend.name == "numpy":        # lanes record in lane order: the first batch has both pages
        assert r.rounds == [n, n] and c["num_fault_batches"] == 1 and c["num_replays"] == 1
    else:                              # a GPU records in no promised order
        assert r.rounds[0] == n and sum(r.rounds[1:]) == n


def _thp_setup(backend, leaves):
    """A toy driver whose first ``leaves`` * 2 MiB of window sit on aligned 512-frame runs, even
    leaves in RAM and odd ones in device memory (as migrated THPs), with random data."""
    rng = np.random.default_rng(31)
    dev, drv = setup(backend, ram=512 * (leaves + 1) + 64, frames=512 * leaves, window=512 * leaves + 64,
                     migrate="none")
    drv.next_ram = 512                                 # aligned RAM frames from here on
    data = rand_bytes(rng, 512 * leaves)
    a = drv.region(512 * leaves, data)
    for j in range(1, leaves, 2):
        i = np.arange(512 * j, 512 * (j + 1))
        new = drv.alloc_dev(512)
        new += (BASE_PFN + 512 * j) - new[0]           # aligned device frames too
        dev.copy_pages(new, drv.backing[i]).wait()
        drv.backing[i] = new
    return dev, drv, a, data


def test_jobs_walk_2mib_leaves(backend):
    """Bulk and lane jobs through 2 MiB leaves (RAM and device frames) give what they give
    through 4 KiB leaves, take no fault, and the walker sets ACCESSED/DIRTY on the one entry."""
    from hmmgpu.device.pagetable import PTE_ACCESSED, PTE_DIRTY, PTE_HUGE
    results = []
    rng = np.random.default_rng(5)
    floats = rng.standard_normal(2 * 8 * 1024).astype(np.float32)
    nodes = np.arange(40, dtype=np.uint64) * np.uint64(50 * PAGE + 48)      # one-node lists
    idx_vals = (np.arange(512) * 4099) % (2048 * 1024)
    for huge in (False, True):
        dev, drv, a, data = _thp_setup(backend, 4)
        data[1000 * PAGE:1008 * PAGE] = floats.view(np.uint8)[:8 * PAGE]    # axpy's x ...
        data[1100 * PAGE:1108 * PAGE] = floats.view(np.uint8)[8 * PAGE:]   # ... and y
        w = data.view(np.uint64)
        w[(nodes // np.uint64(8)).astype(np.int64)] = 0                     # next = 0
        x, y = (data[o * PAGE:(o + 8) * PAGE].view(np.float32).copy() for o in (1000, 1100))
        dev.write_pages(drv.backing[:2048], data)
        v = drv.vpns(a, 2048)
        if huge:
            dev.pt.map_huge(v[::512], drv.backing[v[::512] - drv.vpn0], PTE_WRITE | PTE_ATOMIC).wait()
        else:
            drv.map(v).wait()
        out = [dev.jobs.reduce_sum(a + 490 * PAGE + 16, 30 * PAGE).value]      # leaves 0 and 1
        e = dev.pt.lookup(v).reshape(4, 512)
        if huge:                                       # a read of some pages: every page ACCESSED
            assert (e & np.uint64(PTE_HUGE)).all()
            ad = e & np.uint64(PTE_ACCESSED | PTE_DIRTY)
            assert (ad[:2] == PTE_ACCESSED).all() and not ad[2:].any()
        out.append(dev.jobs.list_chase(np.uint64(a) + nodes).value)
        out.append(dev.jobs.list_chase(np.uint64(a) + nodes[:3]).value)    # the NumPy scalar path
        dev.jobs.copy(a + 1536 * PAGE + 48, a + 100 * PAGE + 16, 3 * PAGE)  # RAM leaf -> device leaf
        dev.jobs.memset(a + 600 * PAGE, 0x3C, 2 * PAGE)
        dev.jobs.axpy(np.float32(0.25), a + 1000 * PAGE, a + 1100 * PAGE, 8 * 1024)
        idx = drv.region(1, idx_vals.astype(np.int64).view(np.uint8))
        drv.map(drv.vpns(idx, 1)).wait()
        dev.jobs.gather(a + 1800 * PAGE, a, idx, 512)
        out.append(drv.data(a, 2048))
        out.append(dev.counters["num_read_faults"] + dev.counters["num_write_faults"])
        if huge:                                       # written leaves: DIRTY, on every page
            dirty = (dev.pt.lookup(v).reshape(4, 512) & np.uint64(PTE_DIRTY)) != 0
            assert dirty[1:].all() and not dirty[0].any()
        results.append(out)
    small, big = results
    assert big[-1] == small[-1] == 0                   # no fault either way
    for p, q in zip(small, big):
        assert np.array_equal(np.asarray(p), np.asarray(q))
    assert big[0] == int(data[490 * PAGE + 16:520 * PAGE + 16].view(np.uint32).sum(dtype=np.uint64))
    assert np.array_equal(big[1][0], w[(nodes // np.uint64(8)).astype(np.int64) + 1]) and (big[1][1] == 1).all()
    got = big[3]
    assert np.array_equal(got[1536 * PAGE + 48:1539 * PAGE + 48], data[100 * PAGE + 16:103 * PAGE + 16])
    assert (got[600 * PAGE:602 * PAGE] == 0x3C).all()
    want_y = np.float32(0.25) * x + y
    assert np.array_equal(got[1100 * PAGE:1108 * PAGE].view(np.float32), want_y)
    assert np.array_equal(got[1800 * PAGE:1800 * PAGE + 2048].view(np.uint32), got.view(np.uint32)[idx_vals])


def test_numpy_page_runs_take_a_2mib_leaf_whole(monkeypatch):
    """The NumPy twins' whole-page fast path sees a 2 MiB leaf's pages as one run of 512
    consecutive frames (one slice of the arena), whatever memory it is in."""
    import hmmgpu.fallback.jobs as fj
    from hmmgpu.device.backend import get_backend
    dev, drv, a, data = _thp_setup(get_backend("numpy"), 4)
    v = drv.vpns(a, 2048)
    dev.pt.map_huge(v[::512], drv.backing[v[::512] - drv.vpn0]).wait()
    seen = []
    real = fj.runs_of

    def spy(idx, min_run=fj.MIN_RUN_PAGES):
        runs, rest = real(idx, min_run)
        seen.append(([ln for _, ln, _ in runs], rest.size))
        return runs, rest
    monkeypatch.setattr(fj, "runs_of", spy)
    r = dev.jobs.reduce_sum(a, 2048 * PAGE)
    assert r.value == int(data.view(np.uint32).sum(dtype=np.uint64))
    assert seen == [([512, 512], 0), ([512, 512], 0)]   # per memory: one slice per leaf, nothing gathered
    seen.clear()
    dev.jobs.memset(a + 256 * PAGE, 7, 1024 * PAGE)     # half of leaf 0, leaf 1, half of leaf 2
    assert sorted(seen) == [([256, 256], 0), ([512], 0)]
    assert (drv.data(a, 2048)[256 * PAGE:1280 * PAGE] == 7).all()
