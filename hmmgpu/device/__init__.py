"""The emulated device hardware: memory frames, page table, fault buffer, job and copy engines.

``EmulatedDevice`` (hmmgpu/device/device.py) ties them together; its module docstring is the
API a driver programs against.  Nothing here initialises CUDA at import time.
"""
from .device import DeviceContext, EmulatedDevice
from .faults import ACCESS_ATOMIC, ACCESS_READ, ACCESS_WRITE, FaultBatch, JobFault
from .jobs import JobResult, UserJob, Zeros, pack_args
from .pagetable import PTE_ACCESSED, PTE_ATOMIC, PTE_DIRTY, PTE_HUGE, PTE_VALID, PTE_WRITE, DevicePageTable

__all__ = ["EmulatedDevice", "DeviceContext", "DevicePageTable", "FaultBatch", "JobFault", "JobResult", "UserJob", "Zeros",
           "pack_args", "ACCESS_READ", "ACCESS_WRITE", "ACCESS_ATOMIC", "PTE_VALID", "PTE_WRITE",
           "PTE_DIRTY", "PTE_ACCESSED", "PTE_ATOMIC", "PTE_HUGE"]
