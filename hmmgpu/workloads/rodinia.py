"""Rodinia as UVMBench runs it: hotspot, pathfinder, srad and backprop.

Each class is one program of OSU-STARLAB/UVM_benchmark's rodinia/ directory: its managed arrays,
kernels and host steps, with the CUDA lanes in kernels/rodinia.cu and their NumPy twins here,
checked exactly against plain NumPy.  Differences from the originals, on purpose: inputs are
seeded random data in the ranges of Rodinia's input files; a lane has no __shared__ block, so
hotspot and pathfinder advance one time step per launch instead of a pyramid of several; the
constants written in double (``2.0`` in hotspot, ``0.5`` in srad, ETA and MOMENTUM in backprop)
are float32; backprop's first kernel does not write its partly reduced products back into the
weights (a Rodinia quirk that corrupts them before the second kernel reads them).  UVMBench's
sizes: hotspot 512 x 512 for 2 steps, pathfinder 100,000 columns x 100 rows, srad 2048 x 2048 for
2 iterations, backprop 65,536 inputs.
"""
import numpy as np

from .base import F32, Workload, compare, f32arg, kernel_jobs, va

I32 = np.int32


def _clamped(k, n):
    """The neighbours k-1 and k+1 clamped to [0, n)."""
    return np.maximum(k - 1, 0), np.minimum(k + 1, n - 1)


# ------------------------------------------------------------------------------------------------
# NumPy twins of kernels/rodinia.cu

def hotspot_np(ctx, lanes, a):
    power, src, dst, rows, cols = (int(x) for x in a[:5])
    sdc, rx1, ry1, rz1, amb = (f32arg(x) for x in a[5:10])
    r, c = lanes // cols, lanes % cols
    n, s = _clamped(r, rows)
    w, e = _clamped(c, cols)
    t = ctx.load(va(src, r * cols + c), F32)
    p = ctx.load(va(power, r * cols + c), F32)
    ts = ctx.load(va(src, s * cols + c), F32)
    tn = ctx.load(va(src, n * cols + c), F32)
    te = ctx.load(va(src, r * cols + e), F32)
    tw = ctx.load(va(src, r * cols + w), F32)
    ctx.store(va(dst, r * cols + c), _hotspot_cell(t, p, ts, tn, te, tw, sdc, rx1, ry1, rz1, amb))


def _hotspot_cell(t, p, ts, tn, te, tw, sdc, rx1, ry1, rz1, amb):
    t2 = F32(2.0) * t
    v = p + ((ts + tn) - t2) * ry1
    v = v + ((te + tw) - t2) * rx1
    v = v + (amb - t) * rz1
    return t + sdc * v


def pathfinder_np(ctx, lanes, a):
    wall, src, dst, cols, row = (int(x) for x in a[:5])
    w, e = _clamped(lanes, cols)
    up = ctx.load(va(src, lanes), I32)
    left = ctx.load(va(src, w), I32)
    right = ctx.load(va(src, e), I32)
    shortest = np.minimum(np.minimum(left, up), right)
    ctx.store(va(dst, lanes), shortest + ctx.load(va(wall, row * cols + lanes), I32))


def srad1_np(ctx, lanes, a):
    J, C, E, W, N, S, rows, cols = (int(x) for x in a[:8])
    q0sqr = f32arg(a[8])
    i, j = lanes // cols, lanes % cols
    k = i * cols + j
    north, south = _clamped(i, rows)
    west, east = _clamped(j, cols)
    jc = ctx.load(va(J, k), F32)
    dn = ctx.load(va(J, north * cols + j), F32) - jc
    ds = ctx.load(va(J, south * cols + j), F32) - jc
    dw = ctx.load(va(J, i * cols + west), F32) - jc
    de = ctx.load(va(J, i * cols + east), F32) - jc
    c = _srad_coefficient(jc, dn, ds, dw, de, q0sqr)
    for arr, v in ((C, c), (E, de), (W, dw), (S, ds), (N, dn)):
        ctx.store(va(arr, k), v)


def _srad_coefficient(jc, dn, ds, dw, de, q0sqr):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g2 = (((dn * dn + ds * ds) + dw * dw) + de * de) / (jc * jc)
        lap = (((dn + ds) + dw) + de) / jc
        num = F32(0.5) * g2 - F32(0.0625) * (lap * lap)
        den = F32(1.0) + F32(0.25) * lap
        qsqr = num / (den * den)
        den = (qsqr - q0sqr) / (q0sqr * (F32(1.0) + q0sqr))
        c = F32(1.0) / (F32(1.0) + den)
    return np.where(c < 0, F32(0), np.where(c > 1, F32(1), c)).astype(F32)


def srad2_np(ctx, lanes, a):
    J, C, E, W, N, S, rows, cols = (int(x) for x in a[:8])
    q = f32arg(a[8])
    i, j = lanes // cols, lanes % cols
    k = i * cols + j
    _, south = _clamped(i, rows)
    _, east = _clamped(j, cols)
    jv = ctx.load(va(J, k), F32)
    cc = ctx.load(va(C, k), F32)
    cs = ctx.load(va(C, south * cols + j), F32)
    ce = ctx.load(va(C, i * cols + east), F32)
    nv, sv, wv, ev = (ctx.load(va(arr, k), F32) for arr in (N, S, W, E))
    ctx.store(va(J, k), jv + q * (((cc * nv + cs * sv) + cc * wv) + ce * ev))


def layerforward_np(ctx, lanes, a):
    inp, w, partial, hid = (int(x) for x in a[:4])
    by, j = lanes // hid, lanes % hid
    v = []
    for ty in range(16):                          # one iteration per input row of the block
        row = 16 * by + ty + 1
        x = ctx.load(va(inp, row), F32)
        m = ctx.load(va(w, row * (hid + 1) + j + 1), F32)
        v.append(m * x)
    ctx.store(va(partial, by * hid + j), _tree16(v))


def _tree16(v):
    """The original's shared-memory reduction order over 16 rows: strides 1, 2, 4, 8."""
    v = list(v)
    p = 1
    while p < 16:
        for ty in range(0, 16, 2 * p):
            v[ty] = v[ty] + v[ty + p]
        p *= 2
    return v[0]


def adjust_weights_np(ctx, lanes, a):
    delta, ly, w, oldw, hid = (int(x) for x in a[:5])
    eta, momentum = f32arg(a[5]), f32arg(a[6])
    by, ty, tx = lanes // (16 * hid), lanes // hid % 16, lanes % hid
    ix, iy = tx + 1, 16 * by + ty + 1
    index = (hid + 1) * iy + ix
    d = ctx.load(va(delta, ix), F32)
    y = ctx.load(va(ly, iy), F32)
    o = ctx.load(va(oldw, index), F32)
    wv = ctx.load(va(w, index), F32)
    nd = (eta * d) * y + momentum * o
    ctx.store(va(w, index), wv + nd)
    ctx.store(va(oldw, index), nd)
    sel = np.flatnonzero((ty == 0) & (by == 0))
    if sel.size:
        o0 = ctx.load(va(oldw, ix[sel]), F32, sel)
        w0 = ctx.load(va(w, ix[sel]), F32, sel)
        nd0 = eta * d[sel] + momentum * o0
        ctx.store(va(w, ix[sel]), w0 + nd0, sel)
        ctx.store(va(oldw, ix[sel]), nd0, sel)


KERNELS = kernel_jobs("rodinia.cu", {
    "calculate_temp": hotspot_np, "dynproc_kernel": pathfinder_np,
    "srad_cuda_1": srad1_np, "srad_cuda_2": srad2_np,
    "bpnn_layerforward_CUDA": layerforward_np, "bpnn_adjust_weights_cuda": adjust_weights_np})


# ------------------------------------------------------------------------------------------------

class Hotspot(Workload):
    """hotspot: ``sim_time`` steps of the thermal simulation of a chip (rodinia/hotspot)."""

    name = "hotspot"
    suite = "rodinia"
    default_dims = {"rows": 1024, "cols": 1024}     # UVMBench: 512 x 512
    params = {"sim_time": 2}
    KERNELS = KERNELS
    # rodinia's chip: 16 mm x 16 mm x 0.5 mm of silicon, ambient 80
    T_CHIP, CHIP_H, CHIP_W, AMB = 0.0005, 0.016, 0.016, 80.0
    FACTOR_CHIP, SPEC_HEAT_SI, K_SI, MAX_PD, PRECISION = 0.5, 1.75e6, 100.0, 3.0e6, 0.001

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"rows": n, "cols": n}, 16, 16)

    def layout(self, dims=None):
        d = dims or self.dims
        n = 4 * d["rows"] * d["cols"]
        return [("temp0", n), ("temp1", n), ("power", n)]

    def init(self, rng):
        rows, cols = self.dims["rows"], self.dims["cols"]
        self.temp = (323.0 + 20.0 * rng.random((rows, cols))).astype(F32)   # Kelvin, as temp_512
        self.power = (0.004 * rng.random((rows, cols))).astype(F32)          # W, as power_512
        self.write("temp0", self.temp)
        self.write("power", self.power)

    def constants(self):
        """step/Cap, 1/Rx, 1/Ry, 1/Rz and the ambient temperature, as float32."""
        rows, cols = self.dims["rows"], self.dims["cols"]
        gh, gw = self.CHIP_H / rows, self.CHIP_W / cols
        cap = self.FACTOR_CHIP * self.SPEC_HEAT_SI * self.T_CHIP * gw * gh
        rx = gw / (2.0 * self.K_SI * self.T_CHIP * gh)
        ry = gh / (2.0 * self.K_SI * self.T_CHIP * gw)
        rz = self.T_CHIP / (self.K_SI * gh * gw)
        step = self.PRECISION / (self.MAX_PD / (self.FACTOR_CHIP * self.T_CHIP * self.SPEC_HEAT_SI))
        one = F32(1.0)
        return (F32(step) / F32(cap), one / F32(rx), one / F32(ry), one / F32(rz), F32(self.AMB))

    def execute(self):
        rows, cols = self.dims["rows"], self.dims["cols"]
        bufs = [self.addr("temp0"), self.addr("temp1")]
        for t in range(self.p["sim_time"]):
            self.launch("calculate_temp", rows * cols, [self.addr("power"), bufs[t % 2], bufs[(t + 1) % 2],
                                                        rows, cols, *self.constants()])

    def result_name(self):
        return "temp%d" % (self.p["sim_time"] % 2)

    def reference(self):
        sdc, rx1, ry1, rz1, amb = self.constants()
        t = self.temp
        for _ in range(self.p["sim_time"]):
            p = np.pad(t, 1, mode="edge")
            t = _hotspot_cell(t, self.power, p[2:, 1:-1], p[:-2, 1:-1], p[1:-1, 2:], p[1:-1, :-2],
                              sdc, rx1, ry1, rz1, amb)
        return {"temp": t}

    def check(self):
        got = self.read(self.result_name(), F32, (self.dims["rows"], self.dims["cols"]))
        return compare(self.reference(), {"temp": got}, "temperature after %d steps" % self.p["sim_time"])


class Pathfinder(Workload):
    """pathfinder: the cheapest path down a grid of weights, one row per launch
    (rodinia/pathfinder)."""

    name = "pathfinder"
    suite = "rodinia"
    default_dims = {"cols": 20000, "rows": 100}     # UVMBench: 100,000 x 100
    params = {}
    KERNELS = KERNELS

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"cols": n, "rows": 100}, 1024, 1024)

    def layout(self, dims=None):
        d = dims or self.dims
        return [("wall", 4 * (d["rows"] - 1) * d["cols"]), ("result0", 4 * d["cols"]),
                ("result1", 4 * d["cols"])]

    def init(self, rng):
        rows, cols = self.dims["rows"], self.dims["cols"]
        self.data = rng.integers(0, 10, (rows, cols), dtype=I32)          # rand() % 10
        self.write("result0", self.data[0])
        self.write("wall", self.data[1:])

    def execute(self):
        rows, cols = self.dims["rows"], self.dims["cols"]
        bufs = [self.addr("result0"), self.addr("result1")]
        for t in range(rows - 1):
            self.launch("dynproc_kernel", cols, [self.addr("wall"), bufs[t % 2], bufs[(t + 1) % 2], cols, t])

    def reference(self):
        cur = self.data[0]
        for row in self.data[1:]:
            p = np.pad(cur, 1, mode="edge")
            cur = np.minimum(np.minimum(p[:-2], p[1:-1]), p[2:]) + row
        return {"result": cur}

    def check(self):
        got = self.read("result%d" % ((self.dims["rows"] - 1) % 2), I32)
        return compare(self.reference(), {"result": got}, "path costs")


class Srad(Workload):
    """srad: speckle-reducing anisotropic diffusion of an image (rodinia/srad, srad_v1's
    kernels); before each iteration the CPU reads the region of interest back to compute q0."""

    name = "srad"
    suite = "rodinia"
    default_dims = {"rows": 512, "cols": 512}       # UVMBench: 2048 x 2048
    params = {"niter": 2, "lam": 0.5, "roi": (0, 127, 0, 127)}
    KERNELS = KERNELS
    ARRAYS = ("J", "C", "E", "W", "N", "S")

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"rows": n, "cols": n}, 16, 16)

    def layout(self, dims=None):
        d = dims or self.dims
        return [(k, 4 * d["rows"] * d["cols"]) for k in self.ARRAYS]

    def _roi(self):
        r1, r2, c1, c2 = self.p["roi"]
        return (r1, min(r2, self.dims["rows"] - 1), c1, min(c2, self.dims["cols"] - 1))

    def init(self, rng):
        rows, cols = self.dims["rows"], self.dims["cols"]
        image = rng.random((rows, cols), dtype=np.float32)
        self.J0 = np.exp(image.astype(np.float64)).astype(F32)           # J = exp(I), on the CPU
        self.write("J", self.J0)

    @staticmethod
    def q0sqr(roi):
        """The host's ROI statistics, float32 sums in the original's sequential order."""
        flat = roi.reshape(-1)
        size = F32(flat.size)
        total = np.add.accumulate(flat, dtype=F32)[-1]
        total2 = np.add.accumulate(flat * flat, dtype=F32)[-1]
        mean = total / size
        var = (total2 / size) - mean * mean
        return F32(var / (mean * mean))

    def execute(self):
        rows, cols = self.dims["rows"], self.dims["cols"]
        r1, r2, c1, c2 = self._roi()
        arrays = [self.addr(k) for k in self.ARRAYS]
        q = F32(0.25) * F32(self.p["lam"])
        for _ in range(self.p["niter"]):
            # the CPU reads the region of interest (rows r1..r2) out of the managed image
            roi = self.read("J", F32, (r2 - r1 + 1, cols), offset=4 * r1 * cols,
                            count=(r2 - r1 + 1) * cols)[:, c1:c2 + 1]
            q0 = self.q0sqr(roi)
            self.launch("srad_cuda_1", rows * cols, arrays + [rows, cols, q0])
            self.launch("srad_cuda_2", rows * cols, arrays + [rows, cols, q])

    def reference(self):
        r1, r2, c1, c2 = self._roi()
        J = self.J0.copy()
        q = F32(0.25) * F32(self.p["lam"])
        for _ in range(self.p["niter"]):
            q0 = self.q0sqr(J[r1:r2 + 1, c1:c2 + 1])
            p = np.pad(J, 1, mode="edge")
            dn, ds = p[:-2, 1:-1] - J, p[2:, 1:-1] - J
            dw, de = p[1:-1, :-2] - J, p[1:-1, 2:] - J
            C = _srad_coefficient(J, dn, ds, dw, de, q0)
            pc = np.pad(C, 1, mode="edge")
            cs, ce = pc[2:, 1:-1], pc[1:-1, 2:]
            J = J + q * (((C * dn + cs * ds) + C * dw) + ce * de)
        return {"J": J, "C": C}

    def check(self):
        shape = (self.dims["rows"], self.dims["cols"])
        return compare(self.reference(), {k: self.read(k, F32, shape) for k in ("J", "C")}, "J, C")


class Backprop(Workload):
    """backprop: one training step of a 3-layer perceptron, ``n_in`` inputs, 16 hidden units,
    one output (rodinia/backprop): a kernel forms the hidden layer's partial sums, the CPU
    finishes the forward and backward pass, a kernel adjusts the input weights."""

    name = "backprop"
    suite = "rodinia"
    default_dims = {"n_in": 65536}                   # UVMBench: 65,536
    params = {}
    KERNELS = KERNELS
    HID, OUT = 16, 1
    ETA, MOMENTUM = F32(0.3), F32(0.3)

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"n_in": n}, 16, 16)

    def layout(self, dims=None):
        n, h = (dims or self.dims)["n_in"], self.HID
        return [("input", 4 * (n + 1)), ("output_hidden", 4 * (h + 1)),
                ("input_hidden", 4 * (n + 1) * (h + 1)), ("hidden_partial_sum", 4 * (n // 16) * h),
                ("input_prev_weights", 4 * (n + 1) * (h + 1)), ("hidden_delta", 4 * (h + 1))]

    def init(self, rng):
        n, h = self.dims["n_in"], self.HID
        self.inp = rng.random(n + 1, dtype=np.float32)
        self.inp[0] = 1.0                                   # the bias unit
        self.w0 = rng.random((n + 1, h + 1), dtype=np.float32)
        self.hidden_w = rng.random((h + 1, self.OUT + 1), dtype=np.float32)
        self.target = np.full(self.OUT + 1, 0.1, F32)
        self.write("input", self.inp)
        self.write("input_hidden", self.w0)
        self.write("input_prev_weights", np.zeros((n + 1, h + 1), F32))

    def hidden_delta(self, partial):
        """The CPU's part (bpnn_train_cuda after the first kernel): hidden units from the partial
        sums, the output layer, its error, and the hidden layer's error deltas."""
        h = self.HID
        sums = np.add.accumulate(partial, axis=0, dtype=F32)[-1] + self.w0[0, 1:]
        hidden = np.ones(h + 1, F32)
        hidden[1:] = (1.0 / (1.0 + np.exp(-sums.astype(np.float64)))).astype(F32)
        out = (1.0 / (1.0 + np.exp(-np.float64(np.add.accumulate(self.hidden_w[:, 1] * hidden, dtype=F32)[-1]))))
        o = F32(out)
        delta_o = o * (F32(1.0) - o) * (self.target[1] - o)
        delta_h = np.zeros(h + 1, F32)
        delta_h[1:] = hidden[1:] * (F32(1.0) - hidden[1:]) * (delta_o * self.hidden_w[1:, 1])
        return delta_h

    def execute(self):
        n, h = self.dims["n_in"], self.HID
        nblocks = n // 16
        self.launch("bpnn_layerforward_CUDA", nblocks * h, [self.addr("input"), self.addr("input_hidden"),
                                                            self.addr("hidden_partial_sum"), h])
        partial = self.read("hidden_partial_sum", F32, (nblocks, h))
        self.write("hidden_delta", self.hidden_delta(partial))
        self.launch("bpnn_adjust_weights_cuda", nblocks * 16 * h,
                    [self.addr("hidden_delta"), self.addr("input"), self.addr("input_hidden"),
                     self.addr("input_prev_weights"), h, self.ETA, self.MOMENTUM])

    def reference(self):
        n, h = self.dims["n_in"], self.HID
        rows = self.w0[1:, 1:].reshape(n // 16, 16, h) * self.inp[1:].reshape(n // 16, 16, 1)
        partial = _tree16([rows[:, ty, :] for ty in range(16)])
        d = self.hidden_delta(partial)
        nd = np.zeros((n + 1, h + 1), F32)
        nd[1:, 1:] = (self.ETA * d[1:])[None, :] * self.inp[1:, None]     # oldw starts at zero
        nd[0, 1:] = self.ETA * d[1:]
        return {"hidden_partial_sum": partial, "input_hidden": self.w0 + nd, "input_prev_weights": nd}

    def check(self):
        n, h = self.dims["n_in"], self.HID
        got = {"hidden_partial_sum": self.read("hidden_partial_sum", F32, (n // 16, h)),
               "input_hidden": self.read("input_hidden", F32, (n + 1, h + 1)),
               "input_prev_weights": self.read("input_prev_weights", F32, (n + 1, h + 1))}
        return compare(self.reference(), got, "partial sums, weights, weight changes")
