"""The access patterns of NVIDIA's unified-memory oversubscription sample: streaming,
block_streaming and random_warp (NVIDIA-developer-blog/code-samples,
posts/unified-memory-oversubscription/uvm_oversubs.cu).

Each reads one managed allocation of uint32 words with a grid of ``threads`` threads (blocks of
``block``), ``loops`` times (the sample's ``-lc``, default 3), each loop starting with the data in
system memory.  random_warp reads a random ``page_size`` page (the sample's ``-s``: 2M, 64K or
4K) per warp and iteration.  Every thread's sum is checked exactly (uint32, wrapping) against
NumPy over the same words.  The sample's grid is the GPU's resident thread count
(SMs x blocks per SM x 128, about 270,000 on an H100); here ``threads`` is a parameter.  Where the
sample shrinks random_warp's allocation to a third of the GPU after taking the rest with
cudaMalloc, here the device memory a driver is given sets the ratio.

The sample's four modes are a parameter, run as uvm_oversubs.cu runs them:

* ``page_fault`` (the default): every loop starts with the data in system memory and the kernel
  migrates it on demand;
* ``zero_copy``: before the first loop, preferred location CPU and accessed-by the GPU over the
  whole allocation, so the kernel reads system memory in place;
* ``prefetch_once_and_hints``: before the first loop, accessed-by the GPU and one prefetch of
  the whole allocation to the GPU (what does not fit stays in system memory, mapped); the data
  is not sent back to the CPU between loops;
* ``stripe_gpu_cpu``: every loop prefetches each ``page_size`` page to the GPU or the CPU as the
  sample stripes them -- with oversubscription R, one page in round(R / (R - 1)) goes to the
  CPU (the rest to the GPU, until device memory is full), and before the first loop each page
  gets its device as preferred location, the CPU's pages accessed-by the GPU.

The three hinted modes need a driver with ``advise`` and ``prefetch`` (cudaMemAdvise and
cudaMemPrefetchAsync: the UVM driver, hmmgpu.drivers.uvm) and say so with any other.  Between
loops the sample prefetches the data back to the CPU: the hinted modes do the same through the
driver; ``page_fault`` lets the CPU read it, which migrates device pages back to system memory
through migrate_to_ram (remote mappings of system pages stay, as a driver keeps them), and so
runs under any driver.
"""
import numpy as np

from ..drivers.uvm.driver import CPU, SET_ACCESSED_BY, SET_PREFERRED_LOCATION
from .base import Workload, compare, kernel_jobs, steps, va

U32 = np.uint32
MODES = ("page_fault", "zero_copy", "prefetch_once_and_hints", "stripe_gpu_cpu")
PAGE_SIZES = {"2M": 2 << 20, "64K": 64 << 10, "4K": 4 << 10}
LCG_A, LCG_C, LCG_M = np.uint64(1103515245), np.uint64(12345), np.uint64(1 << 31)


def myrand(x):
    """The sample's LCG over uint64 arrays."""
    return (LCG_A * x + LCG_C) % LCG_M


# ------------------------------------------------------------------------------------------------
# NumPy twins of kernels/patterns.cu

def streaming_np(ctx, lanes, a):
    data, acc, _, n, T, s0, s1 = (int(x) for x in a[:7])
    s = ctx.load(va(acc, lanes), U32) if s0 else np.zeros(lanes.size, U32)
    for k in range(s0, s1):                       # one iteration per sweep of the grid
        if not ctx.active.any():
            break
        idx = lanes + k * T
        sel = np.flatnonzero(idx < n)
        s[sel] += ctx.load(va(data, idx[sel]), U32, sel)
    ctx.store(va(acc, lanes), s)


def block_streaming_np(ctx, lanes, a):
    data, acc, _, n, B, E, s0, s1 = (int(x) for x in a[:8])
    start = (lanes // B) * E + lanes % B
    s = ctx.load(va(acc, lanes), U32) if s0 else np.zeros(lanes.size, U32)
    for k in range(s0, s1):                       # one iteration per stride of the block
        if not ctx.active.any():
            break
        idx = start + k * B
        sel = np.flatnonzero(idx < n)
        s[sel] += ctx.load(va(data, idx[sel]), U32, sel)
    ctx.store(va(acc, lanes), s)


def random_warp_np(ctx, lanes, a):
    data, acc, state, _, num_pages, dpp, s0, s1 = (int(x) for x in a[:8])
    lane = lanes & 31
    s = ctx.load(va(acc, lanes), U32) if s0 else np.zeros(lanes.size, U32)
    r = ctx.load(va(state, lanes, 8), np.uint64) if s0 else myrand((lanes - lane).astype(np.uint64))
    for _ in range(s0, s1):                       # one iteration per random page
        if not ctx.active.any():
            break
        r = myrand(r)
        idx = (r % np.uint64(num_pages)) * np.uint64(dpp) + r % np.uint64(dpp - 32) + lane.astype(np.uint64)
        s += ctx.load(va(data, idx), U32)
    ctx.store(va(acc, lanes), s)
    ctx.store(va(state, lanes, 8), r)


KERNELS = kernel_jobs("patterns.cu", {
    "read_thread_blocksync": streaming_np, "read_thread_blockCont_blocksync": block_streaming_np,
    "cta_random_warp_streaming_read": random_warp_np})


class _Pattern(Workload):
    suite = "oversubscription"
    params = {"threads": 32768, "block": 128, "loops": 3, "step": 16, "mode": "page_fault",
              "page_size": "2M"}
    default_dims = {"n": 2 << 20}                # 8 MiB of words; the sample: 1.0 x GPU memory
    KERNELS = KERNELS

    def validate(self):
        p = self.p
        if p["mode"] not in MODES:
            raise ValueError(f"{self.name}: mode {p['mode']!r} is not one of {', '.join(MODES)}")
        if p["page_size"] not in PAGE_SIZES:
            raise ValueError(f"{self.name}: page_size {p['page_size']!r} is not one of {', '.join(PAGE_SIZES)}")
        T, B = int(p["threads"]), int(p["block"])
        if T <= 0 or B <= 0 or B % 32 or T % B:
            raise ValueError(f"{self.name}: threads ({T}) must be a positive multiple of block ({B}), "
                             "itself a multiple of 32 (a warp)")

    def dims_for(self, footprint):
        unit = PAGE_SIZES[self.p["page_size"]] // 4 if self.name == "random_warp" else 1024
        return self._fit(footprint, lambda n: {"n": n}, unit, unit)

    def layout(self, dims=None):
        n, T = (dims or self.dims)["n"], int(self.p["threads"])
        return [("data", 4 * n), ("acc", 4 * T)] + ([("state", 8 * T)] if self.name == "random_warp" else [])

    def init(self, rng):
        self.data = rng.integers(0, 1 << 32, self.dims["n"], dtype=np.uint64).astype(U32)
        self.write("data", self.data)

    def iterations(self):
        raise NotImplementedError

    def args(self, s0, s1):
        raise NotImplementedError

    def execute(self):
        T, mode = int(self.p["threads"]), self.p["mode"]
        drv = self.driver
        if mode != "page_fault" and not (hasattr(drv, "advise") and hasattr(drv, "prefetch")):
            raise ValueError(f"{self.name}: mode {mode!r} needs a driver with advise and prefetch "
                             f"(cudaMemAdvise / cudaMemPrefetchAsync: hmmgpu.drivers.uvm.UvmDriver), "
                             f"not {type(drv).__name__}")
        data = self.regions["data"]
        for loop in range(int(self.p["loops"])):
            if mode == "page_fault":
                if loop:
                    # each loop starts in system memory (the sample prefetches to the CPU)
                    self.read("data", U32)
            elif mode != "prefetch_once_and_hints":
                drv.prefetch(data.addr, data.length, CPU)
            if mode == "stripe_gpu_cpu":
                self._stripe(drv, data, first=loop == 0)
            elif loop == 0 and mode == "zero_copy":
                drv.advise(data.addr, data.length, SET_PREFERRED_LOCATION, CPU)
                drv.advise(data.addr, data.length, SET_ACCESSED_BY, 0)
            elif loop == 0 and mode == "prefetch_once_and_hints":
                drv.advise(data.addr, data.length, SET_ACCESSED_BY, 0)
                drv.prefetch(data.addr, data.length, 0)
            for s0, s1 in steps(self.iterations(), self.p["step"]):
                self.launch(self.kernel, T, self.args(s0, s1))

    def stripes(self, npages, oversub, gpu_pages):
        """Where uvm_oversubs.cu's STRIPE_GPU_CPU puts each of ``npages`` pages at oversubscription
        ``oversub`` with room for ``gpu_pages`` on the GPU: a bool array, True for the GPU."""
        cpu_factor = max(0.0, oversub - 1.0)
        zero_on_gpu = cpu_factor > 1.0          # then one page in round(R) stays on the GPU
        if zero_on_gpu:
            mod = int(round(oversub))
        elif cpu_factor:
            mod = int(round(oversub / cpu_factor))
        else:
            mod = npages
        i = np.arange(npages)
        gpu = np.full(npages, not zero_on_gpu)
        gpu[(i % max(mod, 1) == 0) & (i != 0)] = zero_on_gpu
        # the sample sends a page to the CPU once the GPU's pages are all taken
        gpu &= np.cumsum(gpu) <= gpu_pages
        return gpu

    def _stripe(self, drv, data, first):
        size = PAGE_SIZES[self.p["page_size"]]
        npages = -(-data.length // size)
        device = getattr(drv, "device_bytes", None) or data.length
        gpu = self.stripes(npages, self.footprint / device, device // size)
        cuts = np.flatnonzero(np.diff(gpu.astype(np.int8))) + 1
        for run in np.split(np.arange(npages), cuts):          # one call per run of one device
            addr, end = data.addr + int(run[0]) * size, min(data.addr + (int(run[-1]) + 1) * size,
                                                            data.addr + data.length)
            where = 0 if gpu[run[0]] else CPU
            drv.prefetch(addr, end - addr, where)
            if first:
                drv.advise(addr, end - addr, SET_PREFERRED_LOCATION, where)
                if where == CPU:
                    drv.advise(addr, end - addr, SET_ACCESSED_BY, 0)

    def check(self):
        return compare({"acc": self.reference()}, {"acc": self.read("acc", U32)}, "every thread's sum")


class Streaming(_Pattern):
    """streaming: the whole grid sweeps the array front to back, thread t reading t, t + T, ..."""

    name = "streaming"
    kernel = "read_thread_blocksync"

    def iterations(self):
        return -(-self.dims["n"] // int(self.p["threads"]))

    def args(self, s0, s1):
        return [self.addr("data"), self.addr("acc"), 0, self.dims["n"], int(self.p["threads"]), s0, s1]

    def reference(self):
        n, T = self.dims["n"], int(self.p["threads"])
        padded = np.zeros(self.iterations() * T, U32)
        padded[:n] = self.data
        return padded.reshape(-1, T).sum(axis=0, dtype=U32)


class BlockStreaming(_Pattern):
    """block_streaming: each thread block sweeps its own contiguous share of the array."""

    name = "block_streaming"
    kernel = "read_thread_blockCont_blocksync"

    def share(self):
        G = int(self.p["threads"]) // int(self.p["block"])
        return -(-self.dims["n"] // G) + 1

    def iterations(self):
        return self.share() // int(self.p["block"]) + 1

    def args(self, s0, s1):
        return [self.addr("data"), self.addr("acc"), 0, self.dims["n"], int(self.p["block"]), self.share(),
                s0, s1]

    def reference(self):
        n, T, B = self.dims["n"], int(self.p["threads"]), int(self.p["block"])
        t = np.arange(T)
        idx = ((t // B) * self.share() + t % B)[:, None] + B * np.arange(self.iterations())[None, :]
        vals = np.where(idx < n, self.data[np.minimum(idx, n - 1)], U32(0))
        return vals.sum(axis=1, dtype=U32)


class RandomWarp(_Pattern):
    """random_warp: every iteration each warp reads 32 consecutive words of a random page."""

    name = "random_warp"
    kernel = "cta_random_warp_streaming_read"

    def geometry(self):
        dpp = PAGE_SIZES[self.p["page_size"]] // 4
        return self.dims["n"] // dpp, dpp

    def iterations(self):
        return self.dims["n"] // int(self.p["threads"])

    def args(self, s0, s1):
        num_pages, dpp = self.geometry()
        return [self.addr("data"), self.addr("acc"), self.addr("state"), self.dims["n"], num_pages, dpp,
                s0, s1]

    def reference(self):
        T = int(self.p["threads"])
        num_pages, dpp = self.geometry()
        t = np.arange(T, dtype=np.uint64)
        lane = t & np.uint64(31)
        r = myrand(t - lane)
        s = np.zeros(T, U32)
        for _ in range(self.iterations()):
            r = myrand(r)
            s += self.data[(r % np.uint64(num_pages)) * np.uint64(dpp) + r % np.uint64(dpp - 32) + lane]
        return s
