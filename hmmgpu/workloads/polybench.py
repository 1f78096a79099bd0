"""PolyBench/GPU as UVMBench runs it: GEMM, 2DCONV, ATAX, MVT, BICG, GESUMMV, FDTD-2D.

Each class is one program of OSU-STARLAB/UVM_benchmark's polybench/ directory: the same
managed arrays, kernels, loop structure and float32 arithmetic (the CUDA lanes are in
kernels/polybench.cu, their NumPy twins here), checked exactly against a plain-NumPy model
that adds in the original's order.  Differences from the originals, on purpose: the input is
seeded random data instead of PolyBench's formulas (a symmetric A = i*j/N would hide a
transposed index); constants the originals write in double (``0.5`` in FDTD-2D's host loop) are
float32 throughout; and loops over a reduction dimension run ``step`` iterations per launch
(hmmgpu/workloads/base.py).  Square problems: UVMBench's sizes are GEMM 512, 2DCONV 4096,
ATAX / BICG / MVT / GESUMMV 4096, FDTD-2D 2048 with 500 time steps.
"""
import numpy as np

from .base import F32, Workload, compare, f32arg, kernel_jobs, steps, va


# ------------------------------------------------------------------------------------------------
# NumPy twins of kernels/polybench.cu: the same accesses in the same order, vectorised over lanes

def gemm_np(ctx, lanes, a):
    A, B, C, _, nj, nk, k0, k1 = (int(x) for x in a[:8])
    alpha, beta = f32arg(a[8]), f32arg(a[9])
    i, j = lanes // nj, lanes % nj
    c = ctx.load(va(C, i * nj + j), F32)
    if k0 == 0:
        c = c * beta
    for k in range(k0, k1):                       # one iteration per step of the k loop
        if not ctx.active.any():
            break
        x = ctx.load(va(A, i * nk + k), F32)
        y = ctx.load(va(B, k * nj + j), F32)
        c = c + (alpha * x) * y
    ctx.store(va(C, i * nj + j), c)


CONV_TAPS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]
CONV_COEF = np.array([0.2, 0.5, -0.8, -0.3, 0.6, -0.9, 0.4, 0.7, 0.10], F32)


def conv2d_np(ctx, lanes, a):
    A, B, ni, nj = (int(x) for x in a[:4])
    i, j = lanes // nj, lanes % nj
    sel = np.flatnonzero((i > 0) & (j > 0) & (i + 1 < ni) & (j + 1 < nj))
    i, j = i[sel], j[sel]
    s = None
    for t, (di, dj) in enumerate(CONV_TAPS):       # one iteration per tap
        v = ctx.load(va(A, (i + di) * nj + (j + dj)), F32, sel)
        s = CONV_COEF[t] * v if s is None else s + CONV_COEF[t] * v
    ctx.store(va(B, i * nj + j), s, sel)


def mv_row_np(ctx, lanes, a):
    M, v, out, _, ncols, lo, hi, zero = (int(x) for x in a[:8])
    acc = np.zeros(lanes.size, F32) if (lo == 0 and zero) else ctx.load(va(out, lanes), F32)
    for j in range(lo, hi):                       # one iteration per column of the walk
        if not ctx.active.any():
            break
        m = ctx.load(va(M, lanes * ncols + j), F32)
        x = ctx.load(va(v, np.full(lanes.size, j)), F32)
        acc = acc + m * x
    ctx.store(va(out, lanes), acc)


def mv_col_np(ctx, lanes, a):
    M, v, out, _, ncols, lo, hi, zero = (int(x) for x in a[:8])
    acc = np.zeros(lanes.size, F32) if (lo == 0 and zero) else ctx.load(va(out, lanes), F32)
    for i in range(lo, hi):                       # one iteration per row of the walk
        if not ctx.active.any():
            break
        m = ctx.load(va(M, i * ncols + lanes), F32)
        x = ctx.load(va(v, np.full(lanes.size, i)), F32)
        acc = acc + m * x
    ctx.store(va(out, lanes), acc)


def gesummv_np(ctx, lanes, a):
    A, B, x, y, tmp, n, lo, hi = (int(w) for w in a[:8])
    alpha, beta = f32arg(a[8]), f32arg(a[9])
    t = ctx.load(va(tmp, lanes), F32)
    s = ctx.load(va(y, lanes), F32)
    for j in range(lo, hi):                       # one iteration per column
        if not ctx.active.any():
            break
        av = ctx.load(va(A, lanes * n + j), F32)
        xv = ctx.load(va(x, np.full(lanes.size, j)), F32)
        bv = ctx.load(va(B, lanes * n + j), F32)
        t = t + av * xv
        s = s + bv * xv
    if hi == n:
        s = alpha * t + beta * s
    ctx.store(va(tmp, lanes), t)
    ctx.store(va(y, lanes), s)


HALF, SEVEN_TENTHS = F32(0.5), F32(0.7)


def fdtd_step1_np(ctx, lanes, a):
    fict, _, ey, hz, _, ny, t = (int(x) for x in a[:7])
    i, j = lanes // ny, lanes % ny
    top = np.flatnonzero(i == 0)
    if top.size:
        f = ctx.load(va(fict, np.full(top.size, t)), F32, top)
        ctx.store(va(ey, j[top]), f, top)
    sel = np.flatnonzero(i != 0)
    i, j = i[sel], j[sel]
    e = ctx.load(va(ey, i * ny + j), F32, sel)
    h = ctx.load(va(hz, i * ny + j), F32, sel)
    hn = ctx.load(va(hz, (i - 1) * ny + j), F32, sel)
    ctx.store(va(ey, i * ny + j), e - HALF * (h - hn), sel)


def fdtd_step2_np(ctx, lanes, a):
    _, ex, _, hz, _, ny = (int(x) for x in a[:6])
    i, j = lanes // ny, lanes % ny
    sel = np.flatnonzero(j != 0)
    i, j = i[sel], j[sel]
    e = ctx.load(va(ex, i * (ny + 1) + j), F32, sel)
    h = ctx.load(va(hz, i * ny + j), F32, sel)
    hw = ctx.load(va(hz, i * ny + j - 1), F32, sel)
    ctx.store(va(ex, i * (ny + 1) + j), e - HALF * (h - hw), sel)


def fdtd_step3_np(ctx, lanes, a):
    _, ex, ey, hz, _, ny = (int(x) for x in a[:6])
    i, j = lanes // ny, lanes % ny
    h = ctx.load(va(hz, i * ny + j), F32)
    xe = ctx.load(va(ex, i * (ny + 1) + j + 1), F32)
    xw = ctx.load(va(ex, i * (ny + 1) + j), F32)
    ys = ctx.load(va(ey, (i + 1) * ny + j), F32)
    yn = ctx.load(va(ey, i * ny + j), F32)
    ctx.store(va(hz, i * ny + j), h - SEVEN_TENTHS * (((xe - xw) + ys) - yn))


KERNELS = kernel_jobs("polybench.cu", {
    "gemm_kernel": gemm_np, "convolution2d_kernel": conv2d_np,
    "atax_kernel1": mv_row_np, "atax_kernel2": mv_col_np,
    "mvt_kernel1": mv_row_np, "mvt_kernel2": mv_col_np,
    "bicg_kernel1": mv_col_np, "bicg_kernel2": mv_row_np,
    "gesummv_kernel": gesummv_np,
    "fdtd_step1_kernel": fdtd_step1_np, "fdtd_step2_kernel": fdtd_step2_np,
    "fdtd_step3_kernel": fdtd_step3_np})


def _rand(rng, *shape):
    return rng.random(shape, dtype=np.float32)


def _mv_row(M, v, out, lo, hi):
    """The model of mv_row over [lo, hi): sequential float32 sums, as the lanes add."""
    for j in range(lo, hi):
        out = out + M[:, j] * v[j]
    return out


def _mv_col(M, v, out, lo, hi):
    for i in range(lo, hi):
        out = out + M[i, :] * v[i]
    return out


class _Square(Workload):
    """A PolyBench program over n x n matrices (n a multiple of 16); ``step`` iterations of a
    reduction loop per launch."""

    suite = "polybench"
    params = {"step": 16}
    nmat = 1            # n x n float32 matrices
    nvec = 0            # float32 vectors of n

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"n": n}, 16, 16)

    def layout(self, dims=None):
        n = (dims or self.dims)["n"]
        return self.arrays(n)


class Gemm(_Square):
    """GEMM: C = alpha A B + beta C (polybench/GEMM/gemm.cu; alpha 32412, beta 2123)."""

    name = "gemm"
    default_dims = {"n": 256}          # UVMBench: 512
    ALPHA, BETA = F32(32412.0), F32(2123.0)
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n), ("B", 4 * n * n), ("C", 4 * n * n)]

    def init(self, rng):
        n = self.dims["n"]
        self.A, self.B, self.C0 = _rand(rng, n, n), _rand(rng, n, n), _rand(rng, n, n)
        for name, v in (("A", self.A), ("B", self.B), ("C", self.C0)):
            self.write(name, v)

    def execute(self):
        n = self.dims["n"]
        for k0, k1 in steps(n, self.p["step"]):
            self.launch("gemm_kernel", n * n, [self.addr("A"), self.addr("B"), self.addr("C"), n, n, n,
                                               k0, k1, self.ALPHA, self.BETA])

    def reference(self):
        c = self.C0 * self.BETA
        for k in range(self.dims["n"]):
            c = c + (self.ALPHA * self.A[:, k:k + 1]) * self.B[k:k + 1, :]
        return {"C": c}

    def check(self):
        n = self.dims["n"]
        return compare(self.reference(), {"C": self.read("C", F32, (n, n))}, "C")


class Conv2d(_Square):
    """2DCONV: a 3x3 convolution of A into B's interior (polybench/2DCONV/2DConvolution.cu)."""

    name = "2dconv"
    default_dims = {"n": 1024}         # UVMBench: 4096
    params = {}
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n), ("B", 4 * n * n)]

    def init(self, rng):
        n = self.dims["n"]
        self.A = _rand(rng, n, n)
        self.write("A", self.A)

    def execute(self):
        n = self.dims["n"]
        self.launch("convolution2d_kernel", n * n, [self.addr("A"), self.addr("B"), n, n])

    def reference(self):
        A = self.A
        n = A.shape[0]
        b = np.zeros_like(A)
        s = None
        for t, (di, dj) in enumerate(CONV_TAPS):
            v = A[1 + di:n - 1 + di, 1 + dj:n - 1 + dj]
            s = CONV_COEF[t] * v if s is None else s + CONV_COEF[t] * v
        b[1:-1, 1:-1] = s
        return {"B": b}

    def check(self):
        n = self.dims["n"]
        return compare(self.reference(), {"B": self.read("B", F32, (n, n))}, "B")


class Atax(_Square):
    """ATAX: y = A^T (A x) (polybench/ATAX/atax.cu): a row walk, then a column walk of A."""

    name = "atax"
    default_dims = {"n": 1024}         # UVMBench: 4096
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n), ("x", 4 * n), ("y", 4 * n), ("tmp", 4 * n)]

    def init(self, rng):
        n = self.dims["n"]
        self.A, self.x = _rand(rng, n, n), _rand(rng, n)
        self.write("A", self.A)
        self.write("x", self.x)

    def execute(self):
        n, A = self.dims["n"], self.addr("A")
        for lo, hi in steps(n, self.p["step"]):         # tmp = A x (tmp starts at zero)
            self.launch("atax_kernel1", n, [A, self.addr("x"), self.addr("tmp"), n, n, lo, hi, 0])
        for lo, hi in steps(n, self.p["step"]):         # y = A^T tmp
            self.launch("atax_kernel2", n, [A, self.addr("tmp"), self.addr("y"), n, n, lo, hi, 0])

    def reference(self):
        n = self.dims["n"]
        tmp = _mv_row(self.A, self.x, np.zeros(n, F32), 0, n)
        return {"tmp": tmp, "y": _mv_col(self.A, tmp, np.zeros(n, F32), 0, n)}

    def check(self):
        return compare(self.reference(), {k: self.read(k, F32) for k in ("tmp", "y")}, "tmp, y")


class Mvt(_Square):
    """MVT: x1 += A y1, x2 += A^T y2 (polybench/MVT/mvt.cu)."""

    name = "mvt"
    default_dims = {"n": 1024}         # UVMBench: 4096
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n)] + [(v, 4 * n) for v in ("x1", "x2", "y1", "y2")]

    def init(self, rng):
        n = self.dims["n"]
        self.A = _rand(rng, n, n)
        self.v = {k: _rand(rng, n) for k in ("x1", "x2", "y1", "y2")}
        self.write("A", self.A)
        for k, v in self.v.items():
            self.write(k, v)

    def execute(self):
        n, A = self.dims["n"], self.addr("A")
        for lo, hi in steps(n, self.p["step"]):
            self.launch("mvt_kernel1", n, [A, self.addr("y1"), self.addr("x1"), n, n, lo, hi, 0])
        for lo, hi in steps(n, self.p["step"]):
            self.launch("mvt_kernel2", n, [A, self.addr("y2"), self.addr("x2"), n, n, lo, hi, 0])

    def reference(self):
        n, v = self.dims["n"], self.v
        return {"x1": _mv_row(self.A, v["y1"], v["x1"], 0, n), "x2": _mv_col(self.A, v["y2"], v["x2"], 0, n)}

    def check(self):
        return compare(self.reference(), {k: self.read(k, F32) for k in ("x1", "x2")}, "x1, x2")


class Bicg(_Square):
    """BICG: s = A^T r, q = A p (polybench/BICG/bicg.cu): a column walk, then a row walk."""

    name = "bicg"
    default_dims = {"n": 1024}         # UVMBench: 4096
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n)] + [(v, 4 * n) for v in ("r", "s", "p", "q")]

    def init(self, rng):
        n = self.dims["n"]
        self.A, self.r, self.pv = _rand(rng, n, n), _rand(rng, n), _rand(rng, n)
        self.write("A", self.A)
        self.write("r", self.r)
        self.write("p", self.pv)

    def execute(self):
        n, A = self.dims["n"], self.addr("A")
        for lo, hi in steps(n, self.p["step"]):        # s[j] = 0, then += A[i, j] r[i]
            self.launch("bicg_kernel1", n, [A, self.addr("r"), self.addr("s"), n, n, lo, hi, 1])
        for lo, hi in steps(n, self.p["step"]):        # q[i] = 0, then += A[i, j] p[j]
            self.launch("bicg_kernel2", n, [A, self.addr("p"), self.addr("q"), n, n, lo, hi, 1])

    def reference(self):
        n = self.dims["n"]
        return {"s": _mv_col(self.A, self.r, np.zeros(n, F32), 0, n),
                "q": _mv_row(self.A, self.pv, np.zeros(n, F32), 0, n)}

    def check(self):
        return compare(self.reference(), {k: self.read(k, F32) for k in ("s", "q")}, "s, q")


class Gesummv(_Square):
    """GESUMMV: y = alpha A x + beta B x (polybench/GESUMMV/gesummv.cu; 43532, 12313)."""

    name = "gesummv"
    default_dims = {"n": 1024}         # UVMBench: 4096
    ALPHA, BETA = F32(43532.0), F32(12313.0)
    KERNELS = KERNELS

    def arrays(self, n):
        return [("A", 4 * n * n), ("B", 4 * n * n)] + [(v, 4 * n) for v in ("x", "y", "tmp")]

    def init(self, rng):
        n = self.dims["n"]
        self.A, self.B, self.x = _rand(rng, n, n), _rand(rng, n, n), _rand(rng, n)
        for k in ("A", "B", "x"):
            self.write(k, getattr(self, k))

    def execute(self):
        n = self.dims["n"]
        for lo, hi in steps(n, self.p["step"]):
            self.launch("gesummv_kernel", n, [self.addr("A"), self.addr("B"), self.addr("x"), self.addr("y"),
                                              self.addr("tmp"), n, lo, hi, self.ALPHA, self.BETA])

    def reference(self):
        n = self.dims["n"]
        t, s = np.zeros(n, F32), np.zeros(n, F32)
        for j in range(n):
            t = t + self.A[:, j] * self.x[j]
            s = s + self.B[:, j] * self.x[j]
        return {"tmp": t, "y": self.ALPHA * t + self.BETA * s}

    def check(self):
        return compare(self.reference(), {k: self.read(k, F32) for k in ("tmp", "y")}, "tmp, y")


class Fdtd2d(Workload):
    """FDTD-2D: ``tmax`` time steps of three stencil kernels over ex, ey, hz
    (polybench/FDTD-2D/fdtd2d.cu; ey has nx + 1 rows and ex ny + 1 columns, which the
    original's last row / column of accesses reach)."""

    name = "fdtd-2d"
    suite = "polybench"
    default_dims = {"nx": 512, "ny": 512}      # UVMBench: 2048 x 2048, tmax 500
    params = {"tmax": 20}
    KERNELS = KERNELS

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"nx": n, "ny": n}, 16, 16)

    def layout(self, dims=None):
        d = dims or self.dims
        nx, ny = d["nx"], d["ny"]
        return [("fict", 4 * self.p["tmax"]), ("ex", 4 * nx * (ny + 1)), ("ey", 4 * (nx + 1) * ny),
                ("hz", 4 * nx * ny)]

    def init(self, rng):
        nx, ny = self.dims["nx"], self.dims["ny"]
        self.fict = np.arange(self.p["tmax"], dtype=F32)
        self.ex0, self.ey0, self.hz0 = _rand(rng, nx, ny + 1), _rand(rng, nx + 1, ny), _rand(rng, nx, ny)
        for k, v in (("fict", self.fict), ("ex", self.ex0), ("ey", self.ey0), ("hz", self.hz0)):
            self.write(k, v)

    def execute(self):
        nx, ny = self.dims["nx"], self.dims["ny"]
        args = [self.addr("fict"), self.addr("ex"), self.addr("ey"), self.addr("hz"), nx, ny]
        for t in range(self.p["tmax"]):
            for k in ("fdtd_step1_kernel", "fdtd_step2_kernel", "fdtd_step3_kernel"):
                self.launch(k, nx * ny, args + [t])

    def reference(self):
        ex, ey, hz = self.ex0.copy(), self.ey0.copy(), self.hz0.copy()
        for t in range(self.p["tmax"]):
            ey[0, :] = self.fict[t]
            ey[1:-1, :] = ey[1:-1, :] - HALF * (hz[1:, :] - hz[:-1, :])
            ex[:, 1:-1] = ex[:, 1:-1] - HALF * (hz[:, 1:] - hz[:, :-1])
            hz = hz - SEVEN_TENTHS * (((ex[:, 1:] - ex[:, :-1]) + ey[1:, :]) - ey[:-1, :])
        return {"ex": ex, "ey": ey, "hz": hz}

    def check(self):
        nx, ny = self.dims["nx"], self.dims["ny"]
        got = {"ex": self.read("ex", F32, (nx, ny + 1)), "ey": self.read("ey", F32, (nx + 1, ny)),
               "hz": self.read("hz", F32, (nx, ny))}
        return compare(self.reference(), got, "ex, ey, hz")
