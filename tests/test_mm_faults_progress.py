"""A CPU fault retries as long as it makes progress (issue 10, defect 8).

A CPU load of device-private pages calls the driver's migrate_to_ram; the 2017 driver of the
seed documents migrates only the faulting page each time.  Linux takes one fault per page and
never fails a load with EAGAIN, so a fault that brought a page back must not count towards the
retry bound: only rounds that change nothing do (a livelock guard).
"""
import numpy as np
import pytest

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.hmm import legacy
from hmmgpu.hmm.memremap import zone_device_page_init
from hmmgpu.hmm.migrate_device import MIGRATE_PFN_MIGRATE, migrate_pfn, migrate_pfn_to_pfn
from hmmgpu.mm import pgtable as pt

P = PAGE_SIZE
U = np.uint64


class OnePagePerFault:
    """The seed documents' driver: hmm_devmem with a fault callback that brings back one page."""

    def __init__(self, system, npages):
        self.system = system
        self.faults = 0
        self.devmem = legacy.hmm_devmem_add(self, self, npages * P, system)
        self.pool = list(range(self.devmem.pfn_last - 1, self.devmem.pfn_first - 1, -1))

    # hmm_devmem_ops
    def free(self, devmem, pfns):
        self.pool.extend(int(x) for x in pfns)

    def fault(self, devmem, vma, addr, page, flags, pmdp):
        self.faults += 1
        src, dst = np.zeros(1, U), np.zeros(1, U)
        legacy.migrate_vma(self, vma, addr, addr + P, src, dst, "to_ram")
        return 0

    # migrate_vma ops, both directions
    def alloc_and_copy(self, vma, src, dst, start, end, private):
        phys = self.system.phys
        sel = np.nonzero((src & U(MIGRATE_PFN_MIGRATE)) != 0)[0]
        if private == "to_ram":
            new = phys.alloc(sel.size, None, zero=False)
            phys.trylock(new)
        else:
            new = np.array([self.pool.pop() for _ in sel], dtype=np.int64)
            zone_device_page_init(self.system, new)
        phys.copy(new, migrate_pfn_to_pfn(src[sel]))
        dst[sel] = migrate_pfn(new)

    def finalize_and_map(self, vma, src, dst, start, end, private):
        pass


@pytest.mark.parametrize("npages", [63, 64, 200])
def test_cpu_read_of_many_device_pages_one_migrated_per_fault(npages):
    system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
    drv = OnePagePerFault(system, npages)
    p = system.spawn()
    a = p.mmap(npages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    data = np.random.default_rng(npages).integers(0, 256, npages * P, dtype=np.uint8)
    p.write(a, data)
    src, dst = np.zeros(npages, U), np.zeros(npages, U)
    assert legacy.migrate_vma(drv, p.mm.find_vma(a), a, a + npages * P, src, dst) == 0
    assert pt.is_device_private(p.mm.find_vma(a).pte).all()
    assert (p.read(a, npages * P) == data).all()            # one fault per page, no EAGAIN
    assert drv.faults == npages
    p.exit()
    legacy.hmm_devmem_remove(drv.devmem)
