"""Fault injection (issue 10): allocations that fail, copies that fail part-way, notifier retry
storms.  Whatever fails, the operation either completes or fails with an OSError, no data is
lost, nothing stays locked, and every frame comes back.

Failures are injected deterministically at every site in turn: the N-th RAM allocation of an
operation, the N-th device page allocation, the N-th DMA copy (after copying part of its batch),
and an interval notifier whose sequence keeps moving.
"""
import errno

import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.device.device import EmulatedDevice
from hmmgpu.drivers import dmirror
from hmmgpu.errors import oserror
from hmmgpu.mm.physmem import PhysicalMemory
from invariants import check_system

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
N = 8


class Rig:
    """A process with N pages of known data, half of them on each device, a mirror on each."""

    def __init__(self):
        self.system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
        self.free0 = self.system.phys.nr_free()
        self.devs = [dmirror.DMirrorDevice(self.system, memory=k, chunk_pages=16) for k in ("private", "coherent")]
        self.p = self.system.spawn()
        self.a = self.p.mmap(N * P, RW, ANON)
        self.data = np.random.default_rng(7).integers(1, 256, N * P, dtype=np.uint8)
        self.p.write(self.a, self.data)
        self.m = [d.open(self.p) for d in self.devs]
        self.m[0].migrate_to_dev(self.a + 2 * P, 2)
        self.m[1].migrate_to_dev(self.a + 4 * P, 2)

    def intact(self):
        """Every page still holds its data (read without faulting anything in), all consistent."""
        check_system(self.system, pins=(), devices=self.devs)
        phys = self.system.phys
        v = self.p.mm.find_vma(self.a)
        got = phys.read((v.pte[v.idx(self.a):v.idx(self.a) + N] >> np.uint64(12)).astype(np.int64))
        assert np.array_equal(got.reshape(-1), self.data), "data changed"
        assert np.array_equal(self.p.read(self.a, N * P), self.data)

    def close(self):
        for m in self.m:
            m.close()
        self.p.exit()
        phys = self.system.phys
        assert phys.nr_free() == self.free0, f"{self.free0 - phys.nr_free()} frames leaked"
        assert not (phys.pages.flags[1:] & 1).any(), "a page left locked"
        assert all(d.nr_allocated() == 0 for d in self.devs)


# Everything that allocates, copies or retries.
OPERATIONS = {
    "device read": lambda r: r.m[0].read(r.a, N),
    "device write": lambda r: r.m[1].write(r.a, r.data),
    "private migrate_to_dev": lambda r: r.m[0].migrate_to_dev(r.a, N // 2),           # RAM and its own
    "coherent migrate_to_dev": lambda r: r.m[1].migrate_to_dev(r.a + N // 2 * P, N // 2),
    "migrate_to_sys": lambda r: r.m[0].migrate_to_sys(r.a, N),
    "coherent migrate_to_sys": lambda r: r.m[1].migrate_to_sys(r.a, N),
    "exclusive": lambda r: r.m[0].exclusive(r.a, N),
    "release": lambda r: r.m[0].release(),
    "coherent release": lambda r: r.m[1].release(),
    "snapshot": lambda r: r.m[0].snapshot(r.a, N),
    "cpu read": lambda r: r.p.read(r.a, N * P),
    "cpu write": lambda r: r.p.write(r.a, r.data),
    "fork": lambda r: r.p.fork().exit(),
    "long-term pin": lambda r: r.p.pin_user_pages(r.a, N, write=True, longterm=True).unpin(),
}
NAMES = list(OPERATIONS)


def run_injected(monkeypatch, name, patch):
    """Run operation ``name`` with failure site k = 1, 2, ... until it runs without reaching k."""
    for k in range(1, 64):
        r = Rig()
        hits = patch(monkeypatch, k)
        try:
            OPERATIONS[name](r)
        except OSError:
            pass
        finally:
            monkeypatch.undo()
        r.intact()
        r.close()
        if hits[0] < k:            # the k-th site was never reached: every site has been tried
            return k - 1
    raise AssertionError("more than 63 failure sites?")


def fail_nth_ram_alloc(monkeypatch, k):
    real = PhysicalMemory.alloc
    hits = [0]

    def alloc(self, n, memcg=None, zero=True):
        if int(n):
            hits[0] += 1
            if hits[0] == k:
                raise oserror(errno.ENOMEM, f"injected: allocation #{k} of {n} pages fails")
        return real(self, n, memcg, zero)
    monkeypatch.setattr(PhysicalMemory, "alloc", alloc)
    return hits


def fail_nth_copy(monkeypatch, k):
    """The k-th DMA batch copies its first half, then the engine reports an error."""
    real = EmulatedDevice.copy_pages
    hits = [0]

    def copy_pages(self, dst, src):
        hits[0] += 1
        if hits[0] == k:
            half = len(dst) // 2
            if half:
                real(self, np.asarray(dst)[:half], np.asarray(src)[:half]).wait()
            raise oserror(errno.EIO, f"injected: DMA batch #{k} failed after {half} of {len(dst)} pages")
        return real(self, dst, src)
    monkeypatch.setattr(EmulatedDevice, "copy_pages", copy_pages)
    return hits


def short_device_alloc(monkeypatch, k):
    """The k-th device page allocation gets half what it asked for (device memory ran out)."""
    real = dmirror.DMirrorDevice.alloc_pages
    hits = [0]

    def alloc_pages(self, n):
        hits[0] += 1
        return real(self, n // 2 if hits[0] == k else n)
    monkeypatch.setattr(dmirror.DMirrorDevice, "alloc_pages", alloc_pages)
    return hits


@pytest.mark.parametrize("name", NAMES)
def test_ram_allocation_failure_at_every_site(monkeypatch, name):
    run_injected(monkeypatch, name, fail_nth_ram_alloc)


@pytest.mark.parametrize("name", NAMES)
def test_dma_failure_mid_batch_at_every_copy(monkeypatch, name):
    run_injected(monkeypatch, name, fail_nth_copy)


@pytest.mark.parametrize("name", [n for n in NAMES if "migrate_to_dev" in n])
def test_device_memory_running_short(monkeypatch, name):
    run_injected(monkeypatch, name, short_device_alloc)


def test_fail_alloc_flag_leaves_a_small_page_behind():
    """HMM_DMIRROR_FLAG_FAIL_ALLOC fails the next device allocation; without THP the page it
    was for is small and, as in lib/test_hmm.c, stays where it is (ENOENT from the readback);
    the flag is spent, nothing is lost or leaked."""
    r = Rig()
    r.m[0].set_flags(dmirror.FLAG_FAIL_ALLOC)
    with pytest.raises(OSError) as ei:
        r.m[0].migrate_to_dev(r.a, N // 2)
    assert ei.value.errno == errno.ENOENT
    assert r.m[0].flags == 0
    r.intact()
    assert r.m[0].migrate_to_dev(r.a, N // 2).cpages == N // 2
    r.intact()
    r.close()


@pytest.mark.parametrize("storm", [10, None])
def test_notifier_retry_storm(monkeypatch, storm):
    """Every check of the notifier sequence says "retry" (``storm`` times, or forever): each
    operation completes once the storm passes, or fails cleanly (EBUSY, ENOENT) after a bounded
    number of retries -- never a hang -- and leaves nothing locked or lost."""
    import hmmgpu.drivers.dmirror as dm
    real = dm.mmu_interval_read_retry
    left = [0]

    def read_retry(mni, seq):
        if left[0] > 0:
            left[0] -= 1
            return True
        return real(mni, seq)
    monkeypatch.setattr(dm, "mmu_interval_read_retry", read_retry)
    for name in ("device read", "device write", "private migrate_to_dev", "exclusive", "snapshot",
                 "migrate_to_sys"):
        r = Rig()
        left[0] = storm or 1 << 62
        try:
            OPERATIONS[name](r)
        except OSError as ex:
            assert storm is None and ex.errno in (errno.EBUSY, errno.ENOENT), (name, ex)
        left[0] = 0
        r.intact()
        r.close()
