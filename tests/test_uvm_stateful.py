"""A hypothesis state machine driving UvmDriver (one device, and two) under 3x oversubscription -- device and CPU reads
and writes, eviction, the prefetchers, explicit prefetch both ways, read duplication, the
preferred location and accessed-by, and (in the eager variant) thrashing pins after one
throttling period and access-counter migrations at a threshold of 16 -- against a flat model of
the bytes.

After every step: every page reads (by the CPU and by the device) what the model says; the PMM's
invariants hold and every device frame a VA block names is owned by that block and by no other
page (tests/invariants.py's check of struct pages, page tables, rss, memcg and the allocator
too).  Deterministic (derandomized); small enough for a 2-core CI box.
"""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import hmmgpu
from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmmgpu.drivers import uvm
from hmmgpu.drivers.uvm import POLICY_NAMES, UvmAccessCounters, UvmDriver, UvmThrashing
from invariants import check_system

MB2 = 2 << 20
NBLOCKS = 3                           # the working set: 3x the device's one root chunk
NPAGES = NBLOCKS * MB2 // PAGE_SIZE

ranges = st.tuples(st.integers(0, NPAGES - 1), st.integers(1, 700)).map(
    lambda t: (t[0], min(t[1], NPAGES - t[0])))


DEVICES = st.integers(0, 1)


class UvmMachine(RuleBasedStateMachine):
    NDEV = 1

    @initialize(eviction=st.sampled_from(sorted(POLICY_NAMES["eviction"])),
                prefetch=st.sampled_from(sorted(POLICY_NAMES["prefetch"])), eager=st.booleans())
    def setup(self, eviction, prefetch, eager):
        self.system = hmmgpu.System(backend="numpy", ram_bytes=32 << 20)
        self.proc = self.system.spawn()
        a = self.proc.mmap((NBLOCKS + 1) * MB2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        self.base = -(-a // MB2) * MB2
        self.model = np.zeros(NPAGES * PAGE_SIZE, np.uint8)
        policies = {"eviction": eviction, "prefetch": prefetch}
        if eager:            # pins after one throttling period, access-counter migrations on
            policies["thrashing"] = UvmThrashing(uvm_perf_thrashing_pin_threshold=1)
            policies["access_counters"] = UvmAccessCounters(uvm_perf_access_counter_migration_enable=1,
                                                            uvm_perf_access_counter_threshold=16)
        if self.NDEV > 1 and eager:
            policies["thrashing"] = UvmThrashing(nprocs=self.NDEV + 1, uvm_perf_thrashing_pin_threshold=1)
        self.drv = UvmDriver(self.system, self.proc, device_bytes=MB2, ndevices=self.NDEV, policy=policies, seed=3)
        self.k = 0

    def teardown(self):
        if hasattr(self, "drv"):
            self.drv.close()
            assert np.array_equal(self.proc.read(self.base, self.model.size), self.model)
            check_system(self.system)

    def _span(self, r):
        first, n = r
        return self.base + first * PAGE_SIZE, n * PAGE_SIZE, slice(first * PAGE_SIZE, (first + n) * PAGE_SIZE)

    @rule(r=ranges)
    def cpu_write(self, r):
        addr, n, sl = self._span(r)
        self.k += 1
        data = (np.arange(n, dtype=np.uint32) * 2654435761 + self.k).astype(np.uint8)
        self.proc.write(addr, data)
        self.model[sl] = data

    @rule(r=ranges)
    def cpu_read(self, r):
        addr, n, sl = self._span(r)
        assert np.array_equal(self.proc.read(addr, n), self.model[sl])

    def _device(self, d):
        return d % self.NDEV

    @rule(r=ranges, value=st.integers(0, 255), d=DEVICES)
    def device_write(self, r, value, d):
        addr, n, sl = self._span(r)
        self.drv.device(self._device(d)).jobs.memset(addr, value, n)
        self.model[sl] = value

    @rule(r=ranges, d=DEVICES)
    def device_read(self, r, d):
        addr, n, sl = self._span(r)
        want = int(self.model[sl].view(np.uint32).sum(dtype=np.uint64))
        assert self.drv.device(self._device(d)).jobs.reduce_sum(addr, n).value == want

    @rule(r=ranges, dst=st.sampled_from([0, 1, uvm.CPU]))
    def prefetch(self, r, dst):
        addr, n, _ = self._span(r)
        self.drv.prefetch(addr, n, dst if dst == uvm.CPU else self._device(dst))

    @rule(r=ranges, advice=st.sampled_from(uvm.ADVICE), where=st.sampled_from([uvm.CPU, 0, 1]))
    def advise(self, r, advice, where):
        addr, n, _ = self._span(r)
        self.drv.advise(addr, n, advice, where if where == uvm.CPU else self._device(where))

    @invariant()
    def device_memory_is_consistent(self):
        """Per device: the PMM's invariants hold, and every frame a VA block names is held by that
        block's page (and by no other); no page is resident on two devices unless duplicated."""
        if not hasattr(self, "drv"):
            return
        self.drv.counters                                 # takes the frees back
        blocks = self.drv.blocks
        for d in range(self.NDEV):
            gpu = self.drv.device(d)
            rows, frames = blocks.block_frames(gpu.id)
            gpu.pmm.check((rows, frames))
            held = gpu.frame_vpn[frames]
            r, f = np.nonzero(blocks.resident[gpu.id, :blocks.nblocks])
            assert np.array_equal(held, blocks.blocks[r] * (MB2 // PAGE_SIZE) + f)
        # several device copies of a page only as read duplicates (the CPU's copy is the page)
        n = blocks.nblocks
        several = blocks.resident[1:, :n].sum(axis=0) > 1
        for d in range(self.NDEV):
            gpu = self.drv.device(d)
            res, fr = blocks.resident[gpu.id, :n], blocks.frame[gpu.id, :n]
            dup = res & (gpu.dup_pfn[np.maximum(fr, 0)] >= 0)
            assert not (several & res & ~dup).any()

    @invariant()
    def the_machine_is_consistent(self):
        if hasattr(self, "drv"):
            check_system(self.system)


class TwoDeviceMachine(UvmMachine):
    """The same with two devices (one root chunk each): device-to-device migrations, peer
    mappings, thrashing between devices."""
    NDEV = 2


TestUvm = UvmMachine.TestCase
TestUvm.settings = settings(max_examples=30, stateful_step_count=25, deadline=None, derandomize=True,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestUvmTwoDevices = TwoDeviceMachine.TestCase
TestUvmTwoDevices.settings = settings(max_examples=20, stateful_step_count=25, deadline=None, derandomize=True,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
