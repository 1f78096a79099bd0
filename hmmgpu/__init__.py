"""hmmgpu: Linux HMM (Heterogeneous Memory Management) emulated with real hardware in the loop.

    import hmmgpu
    system = hmmgpu.System()              # CuPy on a CUDA machine, NumPy elsewhere
    proc = system.spawn()
    addr = proc.mmap(1 << 20, hmmgpu.PROT_READ | hmmgpu.PROT_WRITE,
                     hmmgpu.MAP_PRIVATE | hmmgpu.MAP_ANONYMOUS)
    proc.write(addr, b"hello")

Importing this package never initialises CUDA.
"""
from .constants import (MADV_COLLAPSE, MADV_DONTNEED, MADV_FREE, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
                        MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MAP_ANONYMOUS,
                        MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_HUGETLB, MAP_NORESERVE, MAP_POPULATE,
                        MAP_PRIVATE, MAP_SHARED, MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE,
                        MS_ASYNC, MS_INVALIDATE, MS_SYNC, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PROT_EXEC,
                        PROT_NONE, PROT_READ, PROT_WRITE)
from .device.backend import backend_info
from .errors import BackendUnavailable, BusError, DriverBug, ProcessKilled, SegmentationFault
from .system import System

__version__ = "0.1.0"

__all__ = [
    "System", "backend_info", "SegmentationFault", "BusError", "ProcessKilled", "BackendUnavailable", "DriverBug",
    "PAGE_SIZE", "PAGE_SHIFT", "PMD_SIZE", "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC",
    "MAP_PRIVATE", "MAP_SHARED", "MAP_ANONYMOUS", "MAP_FIXED", "MAP_FIXED_NOREPLACE", "MAP_HUGETLB",
    "MAP_NORESERVE", "MAP_POPULATE", "MADV_NORMAL", "MADV_RANDOM", "MADV_SEQUENTIAL", "MADV_WILLNEED",
    "MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "MADV_DONTNEED", "MADV_FREE", "MADV_COLLAPSE",
    "MREMAP_MAYMOVE", "MREMAP_FIXED", "MREMAP_DONTUNMAP", "MS_SYNC", "MS_ASYNC", "MS_INVALIDATE",
]
