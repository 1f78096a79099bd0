"""dmirror beyond the selftests: ioctl argument checks, the device page table, chunks,
eviction, several opens of one device, and that device memory always comes back."""
import errno
import os

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import dmirror
from hmmgpu.drivers.dmirror import DPT_ATOMIC, DPT_VALID, DPT_WRITE
from hmmgpu.mm import pgtable as pt
from invariants import errno_of

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
U = np.uint64


@pytest.fixture(params=["private", "coherent"])
def kind(request):
    return request.param


@pytest.fixture
def system():
    return hmmgpu.System(backend=os.environ.get("HMMGPU_BACKEND", "numpy"), ram_bytes=32 << 20)


def entries_match_cpu(m, proc, addr, npages):
    """No device entry may point anywhere the CPU page table does not."""
    ent = m.pt.lookup(np.arange(addr >> 12, (addr >> 12) + npages))
    live = (ent & U(DPT_VALID)) != 0
    v = proc.mm.find_vma(addr)
    cpu = np.asarray(v.pte[v.idx(addr):v.idx(addr) + npages], U)
    return bool((pt.pte_pfn(cpu[live]) == (ent[live] >> U(12)).astype(np.int64)).all())


def test_each_open_is_an_address_space_of_the_device(system):
    """The mirror's page table is its own context's DevicePageTable on the device; read and
    write run as device jobs that fault through the fault buffer, and a close gives it back."""
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p, q = system.spawn(), system.spawn()
    m1, m2 = d.open(p), d.open(q)
    assert m1.pt is m1.ctx.pt and m1.pt is not m2.pt and d.device.contexts == [m1.ctx, m2.ctx]
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x05" * (4 * PAGE_SIZE))
    jobs0 = d.device.jobs.next_job_id
    c0 = dict(d.device.counters)
    r = m1.read(a, 4)
    assert (r.cpages, r.faults) == (4, 1) and (r.data == 5).all()
    assert d.device.jobs.next_job_id == jobs0 + 1                   # one copy job
    assert d.device.counters["num_read_faults"] - c0["num_read_faults"] == 4
    assert d.device.counters["num_replays"] - c0["num_replays"] == 1
    vpns = np.arange(a >> 12, (a >> 12) + 4)
    e = m1.pt.lookup(vpns)
    assert (e & U(DPT_VALID | DPT_WRITE)).all()          # the CPU PTEs are writable: so is the mirror
    assert entries_match_cpu(m1, p, a, 4)
    assert not m2.pt.lookup(vpns).any()                                  # q's space is separate
    assert m1.read(a, 4).faults == 0                                     # mapped: no fault
    assert m1.write(a, b"\x06" * (4 * PAGE_SIZE)).faults == 0
    assert (p.read(a, 4 * PAGE_SIZE) == 6).all()
    m1.exclusive(a, 4)
    assert (m1.pt.lookup(vpns) & U(DPT_ATOMIC)).all()
    p.munmap(a, 4 * PAGE_SIZE)                                           # the notifier unmaps
    assert not m1.pt.lookup(vpns).any()
    m1.close()
    assert d.device.contexts == [m2.ctx] and m1.pt.nr_nodes == 1


def test_reads_and_writes_longer_than_the_bounce_buffer(system, monkeypatch):
    """Longer requests go a bounce-buffer piece at a time; a fault brings in the rest of the
    request, as dmirror_fault does, so a whole request still counts one fault."""
    monkeypatch.setattr(dmirror, "BOUNCE_PAGES", 3)
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    n = 10
    a = p.mmap(n * PAGE_SIZE, RW, ANON)
    data = np.random.default_rng(1).integers(0, 256, n * PAGE_SIZE, dtype=np.uint8)
    assert (m.write(a, data).cpages, m.write(a, data).faults) == (n, 0)
    r = m.read(a, n)
    assert r.faults == 0 and (r.data == data).all() and (p.read(a, n * PAGE_SIZE) == data).all()
    p.mprotect(a + 7 * PAGE_SIZE, PAGE_SIZE, 0)
    assert errno_of(m.read, a, n) == errno.EFAULT                        # the 3rd piece faults


def test_ioctl_argument_checks(system, kind):
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=64)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    assert errno_of(m.read, a + 1, 1) == errno.EINVAL
    assert errno_of(m.read, a, 0) == errno.EINVAL
    assert errno_of(m.write, a, b"") == errno.EINVAL
    assert errno_of(m.migrate_to_dev, a, 8) == errno.EINVAL       # runs past the mapping
    assert errno_of(m.migrate_to_sys, a - PAGE_SIZE, 1) == errno.EINVAL
    assert errno_of(m.read, a + 4 * PAGE_SIZE, 1) == errno.EFAULT  # no VMA
    m.close()
    assert errno_of(m.read, a, 1) == errno.EBADF                   # a closed descriptor
    p.exit()


def test_chunks_grow_and_release_evicts(system, kind):
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    n = 40
    a = p.mmap(n * PAGE_SIZE, RW, ANON)
    data = np.arange(n * PAGE_SIZE // 4, dtype=np.int32)
    p.write(a, data)
    r = m.migrate_to_dev(a, n)
    assert r.cpages == n and len(d.chunks) == 3 and d.nr_allocated() == n
    m.release()
    assert d.chunks == [] and d.nr_allocated() == 0
    v = p.mm.find_vma(a)
    assert pt.pte_present(v.pte).all() and (pt.pte_pfn(v.pte) < system.phys.nr_ram).all()
    assert (p.read(a, n * PAGE_SIZE).view(np.int32) == data).all()
    # the device keeps working after a release: new chunks
    assert m.migrate_to_dev(a, n).cpages == n and d.nr_allocated() == n
    p.exit()
    assert d.nr_allocated() == 0 and d.nr_free() == len(d.chunks) * d.chunk_pages


def test_two_opens_of_one_device_stay_coherent(system, kind):
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=64)
    p = system.spawn()
    m1, m2 = d.open(p), d.open(p)
    a = p.mmap(8 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x11" * (8 * PAGE_SIZE))
    assert m1.read(a, 8).cpages == 8                 # m1 maps the system pages
    assert m2.migrate_to_dev(a, 8).cpages == 8        # m2 moves them (its owner's MIGRATE event)
    assert entries_match_cpu(m1, p, a, 8)
    assert (m1.read(a, 8).data == 0x11).all()
    if kind == "private":
        p.read(a, PAGE_SIZE)                          # CPU fault: migrate_to_ram
        assert entries_match_cpu(m1, p, a, 8) and entries_match_cpu(m2, p, a, 8)
    p.exit()
    assert d.nr_allocated() == 0


def test_mixed_map_pages_are_zeroed_and_freed(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    free0 = system.phys.nr_free()
    a = p.mmap(3 * PAGE_SIZE, RW, MAP_PRIVATE, fd=m)
    assert not p.read(a, 3 * PAGE_SIZE).any()
    assert list(m.snapshot(a, 3).data) == [dmirror.PROT_READ] * 3
    assert errno_of(m.migrate_to_dev, a, 1) == errno.EINVAL      # VM_MIXEDMAP is VM_SPECIAL
    p.munmap(a, 3 * PAGE_SIZE)
    assert system.phys.nr_free() == free0


def test_fail_alloc_flag_is_consumed(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x01" * (4 * PAGE_SIZE))
    m.set_flags(dmirror.FLAG_FAIL_ALLOC)
    # no THP here: the first page's allocation fails and, small, it has no fallback (lib/test_hmm.c
    # skips it), so it stays in system memory and the readback finds it missing
    assert errno_of(m.migrate_to_dev, a, 4) == errno.ENOENT
    assert m.flags == 0
    assert list(m.snapshot(a, 4).data) == [dmirror.PROT_WRITE] + [dmirror.PROT_DEV_PRIVATE_LOCAL
                                                                  | dmirror.PROT_WRITE] * 3
    assert m.migrate_to_dev(a, 4).cpages == 4


def test_exclusive_needs_write_access_and_check(system):
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(2 * PAGE_SIZE, PROT_READ, ANON)
    assert errno_of(m.exclusive, a, 2) == errno.EFAULT
    b = p.mmap(2 * PAGE_SIZE, RW, ANON)
    p.write(b, b"\x03" * (2 * PAGE_SIZE))
    m.exclusive(b, 2)
    assert errno_of(m.check_exclusive, b, 2) == errno.EPERM
    # a device write through an atomic entry first restores the CPU mapping
    assert m.write(b, b"\x04" * (2 * PAGE_SIZE)).faults == 1
    m.check_exclusive(b, 2)
    assert (p.read(b, 2 * PAGE_SIZE) == 4).all()


def test_exit_with_open_mirror_then_close(system, kind):
    d = dmirror.DMirrorDevice(system, memory=kind, chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x01" * (4 * PAGE_SIZE))
    m.migrate_to_dev(a, 4)
    p.exit()
    assert d.nr_allocated() == 0
    assert errno_of(m.read, a, 1) == errno.EINVAL
    m.close()


def test_a_failing_copy_leaves_nothing_locked(system, monkeypatch):
    """Nothing is lost on a failure path: the migration is abandoned, pages stay put."""
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(4 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x09" * (4 * PAGE_SIZE))

    def boom(dst, src):
        raise MemoryError("DMA engine lost")
    monkeypatch.setattr(d.device, "copy_pages", boom)
    with pytest.raises(MemoryError):
        m.migrate_to_dev(a, 4)
    monkeypatch.undo()
    v = p.mm.find_vma(a)
    assert pt.pte_present(v.pte).all() and not pt.is_migration(v.pte).any()
    assert d.nr_allocated() == 0
    assert (p.read(a, 4 * PAGE_SIZE) == 9).all()
    assert m.migrate_to_dev(a, 4).cpages == 4


def test_fault_count_does_not_depend_on_the_order_faults_arrive(system, monkeypatch):
    """A GPU records faults in no promised order: with the fault buffer handing them back last
    page first, in batches of 2, a read still faults once (from its first page), like
    dmirror_read."""
    d = dmirror.DMirrorDevice(system, memory="private", chunk_pages=16)
    p = system.spawn()
    m = d.open(p)
    a = p.mmap(8 * PAGE_SIZE, RW, ANON)
    p.write(a, b"\x07" * (8 * PAGE_SIZE))
    fb = d.device.fault_buffer
    fb.batch_size = 2
    drain = fb.hw.drain

    def reversed_drain():
        recs, put = drain()
        return recs[::-1].copy(), put
    monkeypatch.setattr(fb.hw, "drain", reversed_drain)
    r = m.read(a, 8)
    assert (r.cpages, r.faults) == (8, 1) and (r.data == 7).all()
    assert d.device.counters["num_fault_batches"] >= 4
