"""Device memory: freed when the device's last reference goes, and spent only on what is used.

An EmulatedDevice's job engine, executor and contexts see it through weak proxies, so there is
no reference cycle: on the GPU, ``del dev`` returns its device memory at once (a test suite
creating many devices would otherwise hold gigabytes until the collector happens to run).  And
a DMirrorDevice's arena is lazy: GPU memory backs a chunk only when the driver hotplugs it.
"""
import gc
import weakref

import numpy as np
import pytest

from hmmgpu.device import EmulatedDevice
from hmmgpu.device.testing import ToyDriver


def test_del_device_frees_its_memory_without_gc(backend):
    host = backend.host_arena(64)
    gc.collect()
    gc.disable()
    try:
        dev = EmulatedDevice(backend, 64, 1 << 20, host)
        drv = ToyDriver(dev, 64, migrate="odd")
        a = drv.region(4, np.full(4 * 4096, 3, np.uint8))
        assert dev.jobs.reduce_sum(a, 4 * 4096, service=drv.service).value == 4 * 1024 * 0x03030303
        ctx = dev.create_context()
        cdrv = ToyDriver(dev, 64, space=ctx, ram_start=32)
        ctx.jobs.memset(cdrv.region(1, None), 1, 4096, service=cdrv.service)
        arena, pt = weakref.ref(dev.arena), weakref.ref(dev.pt)
        del dev, drv, ctx, cdrv
        assert arena() is None and pt() is None, "the device outlived its last reference"
    finally:
        gc.enable()


@pytest.mark.gpu
def test_dmirror_commits_device_memory_chunk_by_chunk():
    """A DMirrorDevice reserves address space for all its chunk slots but backs a chunk with GPU
    memory only when it hotplugs it (the CUDA driver's virtual memory management)."""
    import hmmgpu
    from hmmgpu.drivers import dmirror
    system = hmmgpu.System(backend="cupy", ram_bytes=32 << 20)
    dev = dmirror.DMirrorDevice(system, chunk_pages=512, max_chunks=8)      # 2 MiB chunks
    arena = dev.device.arena
    assert arena.lazy, arena.lazy_reason

    def committed():
        return int(arena.vmm.backed.sum()) * arena.vmm.granule

    chunk = 512 * 4096
    assert len(dev.chunks) == 1 and chunk <= committed() < 8 * chunk
    proc = system.spawn()
    m = dev.open(proc)
    addr = proc.mmap(3 * chunk, 3, 0x22)
    data = np.arange(3 * chunk // 8, dtype=np.uint64)
    proc.write(addr, data)
    assert m.migrate_to_dev(addr, 3 * 512).cpages == 3 * 512
    assert len(dev.chunks) == 3 and 3 * chunk <= committed() < 8 * chunk
    assert np.array_equal(proc.read(addr, 3 * chunk).view(np.uint64), data)
    m.close()


@pytest.mark.gpu
def test_a_dropped_lazy_arena_is_given_back_at_the_next_allocation_not_by_its_finalizer():
    """The finalizer of lazy device memory unmapped it through the CUDA driver from wherever the
    garbage collector started -- once inside a driver call that had called back into Python
    (the shim's cuMemMap), which deadlocked.  It now only queues the memory; the next lazy
    allocation gives it back."""
    import hmmgpu
    from hmmgpu.drivers import dmirror
    from hmmgpu.kernels import backend as kb

    def queued(ptr):
        return any(item[2] == ptr for item in kb._pending)

    system = hmmgpu.System(backend="cupy", ram_bytes=16 << 20)
    dev = dmirror.DMirrorDevice(system, chunk_pages=512, max_chunks=2)
    ptr = dev.device.arena.vmm.ptr
    dev.device.arena.vmm.stream.synchronize()      # nothing queued: only the finalizer decides
    del system, dev
    gc.collect()
    assert queued(ptr), "the finalizer released the memory itself (or it was never released)"
    system = hmmgpu.System(backend="cupy", ram_bytes=16 << 20)
    dmirror.DMirrorDevice(system, chunk_pages=512, max_chunks=2)
    assert not queued(ptr)
