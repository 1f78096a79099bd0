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

The sample's four modes are a parameter: ``page_fault`` (the default: data starts in system
memory and moves on demand) runs today.  ``zero_copy`` (preferred location CPU + accessed-by the
GPU), ``prefetch_once_and_hints`` (accessed-by + one prefetch to the GPU) and ``stripe_gpu_cpu``
(pages placed alternately on the GPU and the CPU by prefetch, with preferred-location and
accessed-by hints) need cudaMemAdvise and cudaMemPrefetchAsync, which the UVM driver of issue
13 provides; until then they raise NotImplementedError.  Between loops the sample prefetches
the data back to the CPU; here the CPU reads it, which migrates device pages back to system
memory through migrate_to_ram (remote mappings of system pages stay, as a driver keeps them).
"""
import numpy as np

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
        if p["mode"] != "page_fault":
            raise NotImplementedError(
                f"{self.name}: mode {p['mode']!r} needs cudaMemAdvise / cudaMemPrefetchAsync (advise and "
                "prefetch), which the UVM driver of issue 13 (hmmgpu.drivers.uvm) provides; only "
                "'page_fault' runs until then")
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
        T = int(self.p["threads"])
        for loop in range(int(self.p["loops"])):
            if loop:
                # each loop starts in system memory (the sample prefetches to the CPU)
                self.read("data", U32)
            for s0, s1 in steps(self.iterations(), self.p["step"]):
                self.launch(self.kernel, T, self.args(s0, s1))

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
