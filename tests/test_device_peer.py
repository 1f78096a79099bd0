"""Peer access between emulated devices (cudaDeviceEnablePeerAccess): device A maps device B's
frames in its page table, its jobs load, store and add atomically through those entries, its DMA
engine copies A <-> B; before enabling, after disabling, and once B is gone, B's frames are
refused (maps) or a fatal fault (jobs).  Every check reads the data back through B itself."""
import errno
import gc
import weakref

import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice, JobFault, UserJob
from hmmgpu.device.device import MAX_PEERS
from hmmgpu.device.pagetable import PTE_ATOMIC, PTE_HUGE, PTE_WRITE, pte_pfn

PAGE = 4096
RAM = 2048
BASE_A, BASE_B, BASE_C = 1 << 20, 2 << 20, 3 << 20
VA = 0x7F0000000000                 # the window every test maps
V0 = VA >> 12


def devices(backend, frames=1024):
    host = backend.host_arena(RAM)
    a = EmulatedDevice(backend, frames, BASE_A, host, name="A")
    b = EmulatedDevice(backend, frames, BASE_B, host, name="B")
    return host, a, b


def no_faults(faults):
    raise AssertionError(f"unexpected device faults at {faults.vaddr}")


def fill(dev, pfns, rng):
    data = rng.integers(0, 256, (len(pfns), PAGE), dtype=np.uint8)
    dev.write_pages(pfns, data)
    return data


def test_enable_rules(backend):
    from hmmgpu.device.backend import get_backend
    host, a, b = devices(backend)
    with pytest.raises(ValueError, match="itself"):
        a.enable_peer_access(a)
    assert a.peers == () and b.peers == ()
    a.enable_peer_access(b)
    a.enable_peer_access(b)                                  # idempotent
    assert a.peers == (b,) and b.peers == ()                 # one direction
    assert a.peer_ranges() == ((BASE_B, 1024),)
    other = get_backend("numpy")                             # another backend object
    alien = EmulatedDevice(other, 16, BASE_C, other.host_arena(RAM))
    with pytest.raises(ValueError, match="another backend"):
        a.enable_peer_access(alien)
    stranger = EmulatedDevice(backend, 16, BASE_C, backend.host_arena(RAM))
    with pytest.raises(ValueError, match="another system RAM"):
        a.enable_peer_access(stranger)
    overlapping = EmulatedDevice(backend, 16, BASE_B + 1000, host)
    with pytest.raises(ValueError, match="overlap"):
        a.enable_peer_access(overlapping)
    more = [EmulatedDevice(backend, 1, BASE_C + i, host) for i in range(MAX_PEERS)]
    for d in more[:MAX_PEERS - 1]:
        a.enable_peer_access(d)
    with pytest.raises(ValueError, match=f"already {MAX_PEERS} peers"):
        a.enable_peer_access(more[-1])
    assert len(a.peers) == MAX_PEERS
    a.disable_peer_access(b)
    assert b not in a.peers
    with pytest.raises(ValueError, match="not enabled"):
        a.disable_peer_access(b)


def test_can_address_and_map_follow_peer_access(backend):
    """A map of B's pfn is refused (naming the pfn) until A enables access to B, accepted then
    -- in the device's page table and in a context's -- and refused again after disabling; a
    third device's pfns stay refused throughout."""
    host, a, b = devices(backend)
    c = EmulatedDevice(backend, 512, BASE_C, host, name="C")
    ctx = a.create_context()
    pf = np.array([BASE_B + 7])
    probe = np.array([5, BASE_A + 3, BASE_B + 7, BASE_C + 1, RAM, BASE_B + 1024])
    assert a.can_address(probe).tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match=f"0x{BASE_B + 7:x}"):
        a.pt.map([V0], pf)
    with pytest.raises(ValueError, match="does not start 512 aligned"):
        a.pt.map_huge([V0], [BASE_B])
    a.enable_peer_access(b)
    assert a.can_address(probe).tolist() == [True, True, True, False, False, False]
    a.pt.map([V0], pf).wait()
    ctx.pt.map([V0 + 1], pf).wait()
    a.pt.map_huge([V0 + 512], [BASE_B + 512]).wait()
    assert pte_pfn(a.pt.lookup([V0]))[0] == BASE_B + 7
    assert pte_pfn(ctx.pt.lookup([V0 + 1]))[0] == BASE_B + 7
    e = int(a.pt.lookup([V0 + 512 + 9])[0])
    assert e & PTE_HUGE and e >> 12 == BASE_B + 512 + 9
    for bad in ([BASE_C + 1], [BASE_B + 1023, BASE_B + 1024]):      # another device; past B's end
        with pytest.raises(ValueError, match=f"0x{bad[-1]:x}"):
            a.pt.map(V0 + 2 + np.arange(len(bad)), bad)
    with pytest.raises(ValueError):                                  # 512 frames past B's end
        a.pt.map_huge([V0 + 1024], [BASE_B + 1024])
    a.disable_peer_access(b)
    assert not a.can_address(pf)[0]
    with pytest.raises(ValueError, match=f"0x{BASE_B + 7:x}"):
        a.pt.map([V0 + 3], pf)
    with pytest.raises(ValueError, match=f"0x{BASE_B + 7:x}"):
        ctx.pt.map([V0 + 3], pf)


def test_jobs_read_and_write_peer_frames(backend):
    """Bulk jobs on A over pages that sit in B's memory, A's and RAM, interleaved: the results
    are read back through B (its own frames, its own read path)."""
    rng = np.random.default_rng(11)
    host, a, b = devices(backend)
    a.enable_peer_access(b)
    n = 12
    # source: pages alternately in B, A and RAM; destination: all in B, scattered
    src_pf = np.array([[BASE_B + 40 + i, BASE_A + 60 + i, 100 + i][i % 3] for i in range(n)])
    dst_pf = BASE_B + rng.permutation(np.arange(200, 200 + n))
    src_data = np.empty((n, PAGE), np.uint8)
    for dev, lo in ((b, BASE_B), (a, BASE_A)):
        m = (src_pf >= lo) & (src_pf < lo + 1024)
        src_data[m] = fill(dev, src_pf[m], rng)
    m = src_pf < RAM
    src_data[m] = fill(a, src_pf[m], rng)
    src, dst = VA, VA + 64 * PAGE
    a.pt.map(V0 + np.arange(n), src_pf).wait()
    a.pt.map(V0 + 64 + np.arange(n), dst_pf).wait()
    off, nbytes = 32, (n - 1) * PAGE + 48                  # unaligned: two pages per lane
    a.jobs.copy(dst + off, src + off, nbytes, service=no_faults)
    got = b.read_pages(dst_pf).reshape(-1)
    assert np.array_equal(got[off:off + nbytes], src_data.reshape(-1)[off:off + nbytes])
    assert not got[:off].any()                             # nothing outside the range
    words = src_data.reshape(-1).view(np.uint32).astype(np.uint64)
    assert a.jobs.reduce_sum(src, n * PAGE, service=no_faults).value == int(words.sum())
    a.jobs.memset(dst, 0xA5, n * PAGE, service=no_faults)   # whole pages
    assert (b.read_pages(dst_pf) == 0xA5).all()
    # ACCESSED / DIRTY land in A's entries for B's frames as for any other
    e = a.pt.lookup(V0 + 64 + np.arange(n))
    assert ((e & np.uint64(0xC)) == np.uint64(0xC)).all()


@pytest.mark.parametrize("nlanes", [4, 48])     # the scalar pointer chase and the vector one
def test_pointer_chase_through_peer_frames(backend, nlanes):
    """Linked lists whose nodes sit on pages of B, A and RAM: every step translates through A's
    page table and loads from whichever memory the entry names."""
    rng = np.random.default_rng(nlanes)
    host, a, b = devices(backend)
    a.enable_peer_access(b)
    npages = 9
    pf = np.array([[BASE_B + 3 * i, BASE_A + 500 - i, 300 + 2 * i][i % 3] for i in range(npages)])
    a.pt.map(V0 + np.arange(npages), pf).wait()
    nodes = npages * PAGE // 16
    order = rng.permutation(nodes)
    mem = np.zeros((nodes, 2), np.uint64)                   # {next, value}
    vals = rng.integers(1, 1 << 40, nodes, dtype=np.uint64)
    mem[order[:-1], 0] = VA + 16 * order[1:].astype(np.uint64)
    mem[:, 1] = vals
    pages = mem.view(np.uint8).reshape(npages, PAGE)
    for dev, lo in ((b, BASE_B), (a, BASE_A), (a, 0)):
        m = (pf >= lo) & (pf < lo + (RAM if lo == 0 else 1024))
        dev.write_pages(pf[m], pages[m])
    starts = rng.choice(nodes, nlanes, replace=False)
    pos = np.empty(nodes, np.int64)
    pos[order] = np.arange(nodes)
    heads = VA + 16 * starts.astype(np.uint64)
    sums, steps = a.jobs.list_chase(heads, service=no_faults).value
    suffix = np.concatenate((np.cumsum(vals[order][::-1])[::-1], [0])).astype(np.uint64)
    assert np.array_equal(steps, nodes - pos[starts])
    assert np.array_equal(sums, suffix[pos[starts]])


PEER_ADD = UserJob(
    "peer_add",
    cuda_source=r"""
__device__ void peer_add_lane(hmm_lane& L, hmm_u64 lane, const hmm_u64* a) {
    hmm_u64 old = hmm_atomic_add<unsigned long long>(L, a[0] + 8 * (lane % a[1]), lane + 1);
    hmm_store<hmm_u64>(L, a[2] + 8 * lane, old);
}
HMM_DEFINE_JOB(peer_add, peer_add_lane)
""",
    numpy_lane=lambda ctx, lanes, a: ctx.store(
        np.uint64(a[2]) + np.uint64(8) * lanes.astype(np.uint64),
        ctx.atomic_add(np.uint64(a[0]) + np.uint64(8) * (lanes.astype(np.uint64) % np.uint64(a[1])),
                       lanes.astype(np.uint64) + np.uint64(1))))


def test_atomics_on_peer_frames(backend):
    """Lanes of A add atomically into counters on B's frames (and on A's own and on RAM, one
    page each), three or so lanes per counter: every counter ends at the exact sum, and the old
    values each lane got chain up as a serial order of the adds would have them."""
    host, a, b = devices(backend)
    a.enable_peer_access(b)
    ctr_pf = np.array([BASE_B + 9, BASE_A + 9, 9])
    out_pf = BASE_B + 16 + np.arange(8)
    a.pt.map(V0 + np.arange(3), ctr_pf, PTE_WRITE | PTE_ATOMIC).wait()
    a.pt.map(V0 + 8 + np.arange(8), out_pf, PTE_WRITE).wait()
    ncounters = 3 * 512                                     # one per word of the three pages
    nlanes = 4096
    a.jobs.run(PEER_ADD, nlanes, (VA, ncounters, VA + 8 * PAGE), service=no_faults)
    counters = np.concatenate([dev.read_pages([p]).view(np.uint64).reshape(-1)
                               for dev, p in ((b, ctr_pf[0]), (a, ctr_pf[1]), (a, ctr_pf[2]))])
    lanes = np.arange(nlanes, dtype=np.int64)
    ctr = lanes % ncounters
    want = np.zeros(ncounters, np.uint64)
    np.add.at(want, ctr, (lanes + 1).astype(np.uint64))
    assert np.array_equal(counters, want)
    old = b.read_pages(out_pf).view(np.uint64).reshape(-1)
    order = np.lexsort((old, ctr))                          # per counter, by the old value seen
    o, c, v = old[order], ctr[order], (lanes[order] + 1).astype(np.uint64)
    first = np.concatenate(([True], c[1:] != c[:-1]))
    assert (o[first] == 0).all()                            # someone saw the counter at zero
    assert np.array_equal(o[1:][~first[1:]], (o[:-1] + v[:-1])[~first[1:]])   # then each add's result
    # without PTE_ATOMIC on B's page the atomic faults, as for any page
    a.pt.protect([V0], clear=PTE_ATOMIC).wait()
    seen = []

    def service(faults):
        seen.append(faults.vpn.tolist())
        a.pt.set_bits(faults.vpn, PTE_ATOMIC)
    a.jobs.run(PEER_ADD, 4, (VA, ncounters, VA + 8 * PAGE), service=service)
    assert seen == [[V0]]


def test_copy_pages_between_peers(backend):
    """A's DMA engine copies B -> A, A -> B, B -> B and RAM <-> B, all in one mixed batch too:
    one DMA batch per (destination memory, source memory) pair; the data read back through the
    device that owns each frame."""
    rng = np.random.default_rng(3)
    host, a, b = devices(backend)
    b_src = BASE_B + np.arange(10, 18)
    data = fill(b, b_src, rng)
    with pytest.raises(ValueError, match=f"0x{BASE_B + 10:x}"):
        a.copy_pages(BASE_A + np.arange(8), b_src)
    with pytest.raises(ValueError, match=f"0x{BASE_B + 10:x}"):
        a.read_pages(b_src)
    a.enable_peer_access(b)
    a.copy_pages(BASE_A + np.arange(8), b_src).wait()                    # B -> A
    assert np.array_equal(a.read_pages(BASE_A + np.arange(8)), data)
    a.copy_pages(BASE_B + np.arange(100, 108), BASE_A + np.arange(8)).wait()   # A -> B
    assert np.array_equal(b.read_pages(BASE_B + np.arange(100, 108)), data)
    # one batch: B -> RAM, RAM -> B, B -> B, A -> A, shuffled together
    ram = np.arange(50, 58)
    ram_data = fill(a, ram, rng)
    dst = np.concatenate((np.arange(60, 68), BASE_B + np.arange(200, 208), BASE_B + np.arange(300, 308),
                          BASE_A + np.arange(400, 408)))
    src = np.concatenate((b_src, ram, b_src[::-1], BASE_A + np.arange(8)))
    perm = rng.permutation(dst.size)
    batches = a.dma.batches
    a.copy_pages(dst[perm], src[perm]).wait()
    assert a.dma.batches - batches == 4
    assert np.array_equal(a.read_pages(np.arange(60, 68)), data)
    assert np.array_equal(b.read_pages(BASE_B + np.arange(200, 208)), ram_data)
    assert np.array_equal(b.read_pages(BASE_B + np.arange(300, 308)), data[::-1])
    assert np.array_equal(a.read_pages(BASE_A + np.arange(400, 408)), data)
    # A's CPU-side access reaches B's frames as well, and B sees what A wrote
    a.write_pages(BASE_B + np.arange(500, 502), ram_data[:2])
    a.fill_pages([BASE_B + 502], 0x3C)
    assert np.array_equal(b.read_pages(BASE_B + np.arange(500, 502)), ram_data[:2])
    assert (b.read_pages([BASE_B + 502]) == 0x3C).all()
    assert np.array_equal(a.read_pages([BASE_B + 10, 50, BASE_A + 0]), np.stack([data[0], ram_data[0], data[0]]))


def test_invalidated_peer_mapping_faults(backend):
    """After invalidating a page mapped to B's frame, A's next access to it faults and the
    driver sees it; the job completes once the driver maps it again (here: to B's frame)."""
    rng = np.random.default_rng(5)
    host, a, b = devices(backend)
    a.enable_peer_access(b)
    pf = BASE_B + np.arange(20, 24)
    data = fill(b, pf, rng)
    a.pt.map(V0 + np.arange(4), pf).wait()
    want = int(data.reshape(-1).view(np.uint32).astype(np.uint64).sum())
    assert a.jobs.reduce_sum(VA, 4 * PAGE, service=no_faults).value == want
    a.pt.invalidate([V0 + 2])
    assert a.pt.lookup([V0 + 2])[0] == 0
    seen = []

    def service(faults):
        seen.append(faults.vpn.tolist())
        a.pt.map(faults.vpn, pf[faults.vpn - V0])
    r = a.jobs.reduce_sum(VA, 4 * PAGE, service=service)
    assert r.value == want and seen == [[V0 + 2]] and r.rounds == [4, 1]


def test_stale_entry_after_disable_or_peer_gone_is_fatal(backend):
    """An entry left pointing at B's frames once access is disabled -- or once B itself is gone
    -- is not followed: the job fails with EFAULT naming the address (a fatal fault, as for any
    pfn the device cannot reach), and B's memory is freed without the collector."""
    host, a, b = devices(backend)
    a.enable_peer_access(b)
    b.enable_peer_access(a)                                 # both ways: still no cycle
    a.pt.map([V0], [BASE_B + 1]).wait()
    a.jobs.memset(VA, 1, PAGE, service=no_faults)
    a.disable_peer_access(b)
    with pytest.raises(JobFault) as e:
        a.jobs.memset(VA, 2, PAGE, service=no_faults)
    assert e.value.errno == errno.EFAULT and f"{VA:#x}" in str(e.value)
    assert (b.read_pages([BASE_B + 1]) == 1).all()          # the stale entry wrote nothing
    a.enable_peer_access(b)
    a.jobs.memset(VA, 3, PAGE, service=no_faults)
    assert (b.read_pages([BASE_B + 1]) == 3).all()
    gc.collect()
    gc.disable()
    try:
        arena = weakref.ref(b.arena)
        del b
        assert arena() is None, "device A kept its peer's memory alive"
        c = EmulatedDevice(backend, 16, BASE_C, host)
        with pytest.raises(ValueError, match="not enabled"):      # B's dead entry is no excuse
            a.disable_peer_access(c)
        assert a.peers == () and not a.can_address([BASE_B + 1])[0]
        with pytest.raises(JobFault) as e:
            a.jobs.memset(VA, 4, PAGE, service=no_faults)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(ValueError):
            a.pt.map([V0 + 1], [BASE_B + 2])
    finally:
        gc.enable()
