"""An EmulatedDevice is freed when its last reference goes, not at the next garbage collection.

Its job engine, executor and contexts see it through weak proxies, so there is no reference
cycle: on the GPU, ``del dev`` returns its device memory at once (a test suite creating many
devices would otherwise hold gigabytes until the collector happens to run).
"""
import gc
import weakref

import numpy as np

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
