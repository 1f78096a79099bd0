"""The HMM core of mm/: what a device driver builds on.

* ``hmm.py``             hmm_range_fault() and HmmRange (mm/hmm.c)
* ``memremap.py``        DevPagemap, memremap_pages() (mm/memremap.c), coherent-memory nodes
* ``migrate_device.py``  MigrateVma, migrate_vma_setup/pages/finalize, migrate_device_range
                         (mm/migrate_device.c)
* ``exclusive.py``       make_device_exclusive() (mm/rmap.c)
* ``legacy.py``          the 2017 API (hmm_mirror, hmm_vma_get_pfns/fault, hmm_devmem, migrate_vma)
                         as a thin layer over the modern one
* ``debug.py``           CONFIG_DEBUG_VM for drivers: DriverBug when a driver breaks a rule of
                         this API (unlocked destination pages, a pfn outside its pgmap, a device
                         mapping without the sequence check, a missing migrate_vma_finalize)

The mmu interval notifiers the sequence protocol needs live in ``hmmgpu.mm.notifier``
and are re-exported here.  Return values follow the kernel: 0 or a negative errno.

The 2017 API's calls and structs are importable from here too (``from hmmgpu.hmm import
hmm_mirror_register``); its flags (HMM_PFN_VALID = 1 << 0 of the 2017 hmm_pfn_t, ...) keep
their 2017 values in ``hmmgpu.hmm.legacy``, since the same names here are today's.
"""
from ..mm.notifier import (MMU_NOTIFY_CLEAR, MMU_NOTIFY_EXCLUSIVE, MMU_NOTIFY_MIGRATE,
                           MMU_NOTIFY_PROTECTION_PAGE, MMU_NOTIFY_PROTECTION_VMA, MMU_NOTIFY_RELEASE,
                           MMU_NOTIFY_SOFT_DIRTY, MMU_NOTIFY_UNMAP, MmuIntervalNotifier,
                           MmuNotifierRange, mmu_interval_check_retry, mmu_interval_notifier_insert,
                           mmu_interval_notifier_remove, mmu_interval_read_begin,
                           mmu_interval_read_retry, mmu_interval_set_seq,
                           mmu_notifier_range_blockable)
from .debug import DriverBug, check_device_mappings
from .exclusive import make_device_exclusive, make_device_exclusive_range
from .hmm import (HMM_PFN_DMA_MAPPED, HMM_PFN_ERROR, HMM_PFN_FLAGS, HMM_PFN_ORDER_SHIFT,
                  HMM_PFN_P2PDMA, HMM_PFN_P2PDMA_BUS, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE,
                  HMM_PFN_VALID, HMM_PFN_WRITE, HMM_RANGE_DEFAULT_TIMEOUT, HmmRange, hmm_pfn_flags_order,
                  hmm_pfn_to_map_order,
                  hmm_pfn_to_pfn, hmm_range_fault)
from .memremap import (MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE, NODE_ALLOW_ALL,
                       NODE_ALLOW_FALLBACK_ALLOC, NODE_ALLOW_HUGETLB, NODE_ALLOW_KSM,
                       NODE_ALLOW_LONGTERM_PIN, NODE_ALLOW_NUMA_BALANCING, DevPagemap, DevPagemapOps,
                       folio_is_longterm_pinnable, is_device_coherent_page, is_device_private_page,
                       is_zone_device_page, memremap_pages, memunmap_pages, page_node_allow,
                       zone_device_folio_init, zone_device_page_init)
from .migrate_device import (MIGRATE_PFN_COMPOUND, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_SHIFT,
                             MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE, MIGRATE_VMA_SELECT_COMPOUND,
                             MIGRATE_VMA_SELECT_DEVICE_COHERENT,
                             MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM, MigrateVma,
                             migrate_device_coherent_pages, migrate_device_finalize,
                             migrate_device_pages, migrate_device_pfns, migrate_device_range,
                             migrate_pfn, migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages,
                             migrate_vma_setup)
from .legacy import (HmmDevmem, HmmMirror, HmmUpdate, LegacyRange, hmm_devmem_add, hmm_devmem_remove,
                     hmm_mirror_register, hmm_mirror_unregister, hmm_vma_fault, hmm_vma_get_pfns,
                     hmm_vma_range_done, migrate_vma)
