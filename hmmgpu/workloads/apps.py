"""UVMBench's own programs: bfs and kmeans (OSU-STARLAB/UVM_benchmark, bfs/ and kmeans/).

bfs is the level-synchronous ``simpleBfs`` over a random undirected graph in CSR form that the
CPU builds in process memory (``./main 5 n m``: m random edges, start vertex 5), one launch per
level until no distance changes; distances are checked exactly against a NumPy BFS and every
parent against the graph (parents race on the GPU, as in the original).  kmeans is
``kmeans_cuda``'s loop over 2-D points: distances, regrouping and recentring, ``reps`` times
(UVMBench runs 100).  Its recentring differs on purpose: the original's k threads each walk all
n points in one loop, which the lane engine would have to replay from the start on every fault;
here lanes sum one chunk of points each in point order and a second kernel adds the chunks in
order (float32 sums in that order, which the check follows exactly).  The CUDA lanes are in
kernels/apps.cu.
"""
import numpy as np

from .base import F32, Check, Workload, compare, kernel_jobs, va

I32 = np.int32
INT_MAX = np.iinfo(I32).max


# ------------------------------------------------------------------------------------------------
# NumPy twins of kernels/apps.cu

def simple_bfs_np(ctx, lanes, a):
    adj, off, sz, dist, parent, changed, _, level = (int(x) for x in a[:8])
    d = ctx.load(va(dist, lanes), I32)
    sel = np.flatnonzero(ctx.active & (d == level))
    lo = ctx.load(va(off, lanes[sel]), I32, sel)
    cnt = ctx.load(va(sz, lanes[sel]), I32, sel)
    change = np.zeros(lanes.size, bool)
    k = 0
    while True:                                   # one iteration per edge of the longest list
        m = ctx.active[sel] & (k < cnt)
        s = sel[m]
        if s.size == 0:
            break
        i = lo[m] + k
        v = ctx.load(va(adj, i), I32, s)
        dv = ctx.load(va(dist, v), I32, s)
        upd = ctx.active[s] & (level + 1 < dv)
        su, vu = s[upd], v[upd]
        ctx.store(va(dist, vu), np.full(su.size, level + 1, I32), su)
        ctx.store(va(parent, vu), i[upd].astype(I32), su)
        change[su] = True
        k += 1
    c = np.flatnonzero(change)
    ctx.store(va(changed, np.zeros(c.size, np.int64)), np.ones(c.size, I32), c)


def get_dst_np(ctx, lanes, a):
    dst, x, y, mu_x, mu_y, k = (int(w) for w in a[:6])
    i, j = lanes // k, lanes % k
    xi = ctx.load(va(x, i), F32)
    mx = ctx.load(va(mu_x, j), F32)
    yi = ctx.load(va(y, i), F32)
    my = ctx.load(va(mu_y, j), F32)
    dx, dy = xi - mx, yi - my
    ctx.store(va(dst, lanes), dx * dx + dy * dy)


def regroup_np(ctx, lanes, a):
    group, dst, k = (int(w) for w in a[:3])
    best = ctx.load(va(dst, lanes * k), F32)
    g = np.ones(lanes.size, I32)
    for j in range(1, k):                         # one iteration per centroid
        d = ctx.load(va(dst, lanes * k + j), F32)
        closer = d < best
        best = np.where(closer, d, best)
        g = np.where(closer, I32(j + 1), g)
    ctx.store(va(group, lanes), g)


def recenter_partial_np(ctx, lanes, a):
    psx, psy, pcnt, x, y, group, k, chunk, nchunks = (int(w) for w in a[:9])
    c, j = lanes // k, lanes % k
    sx, sy = np.zeros(lanes.size, F32), np.zeros(lanes.size, F32)
    cnt = np.zeros(lanes.size, I32)
    for t in range(chunk):                        # one iteration per point of the chunk
        if not ctx.active.any():
            break
        i = c * chunk + t
        g = ctx.load(va(group, i), I32)
        sel = np.flatnonzero(ctx.active & (g == j + 1))
        xv = ctx.load(va(x, i[sel]), F32, sel)
        yv = ctx.load(va(y, i[sel]), F32, sel)
        sx[sel] = sx[sel] + xv
        sy[sel] = sy[sel] + yv
        cnt[sel] += 1
    p = j * nchunks + c
    ctx.store(va(psx, p), sx)
    ctx.store(va(psy, p), sy)
    ctx.store(va(pcnt, p), cnt)


def recenter_step2_np(ctx, lanes, a):
    psx, psy, pcnt, mu_x, mu_y, sum_x, sum_y, nx, ny, nchunks = (int(w) for w in a[:10])
    sx, sy = np.zeros(lanes.size, F32), np.zeros(lanes.size, F32)
    cnt = np.zeros(lanes.size, I32)
    for c in range(nchunks):                      # one iteration per chunk
        if not ctx.active.any():
            break
        p = lanes * nchunks + c
        px = ctx.load(va(psx, p), F32)
        py = ctx.load(va(psy, p), F32)
        cnt = cnt + ctx.load(va(pcnt, p), I32)
        sx, sy = sx + px, sy + py
    for arr, v in ((sum_x, sx), (sum_y, sy), (nx, cnt), (ny, cnt)):
        ctx.store(va(arr, lanes), v)
    with np.errstate(divide="ignore", invalid="ignore"):
        ctx.store(va(mu_x, lanes), sx / cnt.astype(F32))
        ctx.store(va(mu_y, lanes), sy / cnt.astype(F32))


KERNELS = kernel_jobs("apps.cu", {
    "simpleBfs": simple_bfs_np, "get_dst": get_dst_np, "regroup": regroup_np,
    "recenter_partial": recenter_partial_np, "recenter_step2": recenter_step2_np})


# ------------------------------------------------------------------------------------------------

def random_graph(rng, n, m):
    """graph.cpp's random graph: m edges between uniform random endpoints, each stored in both
    adjacency lists (in edge order); CSR arrays (offsets, sizes, adjacency) as int32."""
    u = rng.integers(0, n, m)
    v = rng.integers(0, n, m)
    src = np.stack([u, v], 1).reshape(-1)         # edge e adds v to u's list, then u to v's
    dst = np.stack([v, u], 1).reshape(-1)
    order = np.argsort(src, kind="stable")
    sizes = np.bincount(src, minlength=n)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return offsets.astype(I32), sizes.astype(I32), dst[order].astype(I32)


def bfs_levels(offsets, sizes, adj, start):
    """Distances from ``start`` (INT_MAX where unreachable), one vectorised pass per level."""
    n = offsets.size
    dist = np.full(n, INT_MAX, I32)
    dist[start] = 0
    frontier, level = np.array([start]), 0
    while frontier.size:
        cnt = sizes[frontier].astype(np.int64)
        idx = np.repeat(offsets[frontier].astype(np.int64) - np.cumsum(cnt) + cnt, cnt) + np.arange(cnt.sum())
        nxt = np.unique(adj[idx])
        nxt = nxt[dist[nxt] == INT_MAX]
        level += 1
        dist[nxt] = level
        frontier = nxt
    return dist


class Bfs(Workload):
    """bfs: breadth-first search from ``start`` over a random graph of n vertices and
    ``degree`` * n / 2 undirected edges (UVMBench's ``./main 5 1000000 10000000``: degree 20)."""

    name = "bfs"
    suite = "uvmbench"
    default_dims = {"n": 1 << 16}                     # UVMBench: 10^6 vertices
    params = {"degree": 20, "start": 5}
    KERNELS = KERNELS

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"n": n}, 1024, 1024)

    def layout(self, dims=None):
        n = (dims or self.dims)["n"]
        m = self.p["degree"] * n // 2
        return [("adjacency", 4 * 2 * m), ("offsets", 4 * n), ("sizes", 4 * n), ("distance", 4 * n),
                ("parent", 4 * n), ("changed", 4)]

    def init(self, rng):
        n = self.dims["n"]
        if not 0 <= self.p["start"] < n:
            raise ValueError(f"bfs: start vertex {self.p['start']} is not one of {n} vertices")
        self.offsets, self.sizes, self.adj = random_graph(rng, n, self.p["degree"] * n // 2)
        for k, v in (("offsets", self.offsets), ("sizes", self.sizes), ("adjacency", self.adj)):
            self.write(k, v)
        dist = np.full(n, INT_MAX, I32)
        parent = np.full(n, INT_MAX, I32)
        dist[self.p["start"]] = 0
        parent[self.p["start"]] = 0
        self.write("distance", dist)
        self.write("parent", parent)

    def execute(self):
        n = self.dims["n"]
        args = [self.addr(k) for k in ("adjacency", "offsets", "sizes", "distance", "parent", "changed")]
        level = 0
        while True:
            self.write("changed", np.zeros(1, I32))            # *changed = 0 (the host)
            self.launch("simpleBfs", n, args + [n, level])
            level += 1
            if not self.read("changed", I32)[0]:
                break
        self.levels = level

    def check(self):
        dist = self.read("distance", I32)
        parent = self.read("parent", I32)
        want = bfs_levels(self.offsets, self.sizes, self.adj, self.p["start"])
        c = compare({"distance": want}, {"distance": dist}, "distances")
        if not c:
            return c
        # every reached vertex's parent is an edge into it from a vertex one level closer
        v = np.flatnonzero((want != INT_MAX) & (np.arange(want.size) != self.p["start"]))
        e = parent[v].astype(np.int64)
        ok = (e >= 0) & (e < self.adj.size)
        owner = np.searchsorted(self.offsets, np.where(ok, e, 0), side="right") - 1
        ok &= self.adj[np.where(ok, e, 0)] == v
        ok &= want[owner] == want[v] - 1
        unreached = want == INT_MAX
        ok_un = (parent[unreached] == INT_MAX).all() and parent[self.p["start"]] == 0
        detail = "" if ok.all() and ok_un else f"{int((~ok).sum())} bad parents"
        return Check(ok.all() and ok_un, "distances; parents are edges from the previous level",
                     "exact", detail)


class Kmeans(Workload):
    """kmeans: ``reps`` rounds of Lloyd's algorithm on n 2-D points and k centroids starting at
    UVMBench's initCoord.txt ((-10, -10), (0, 0), (10, 10) for k = 3)."""

    name = "kmeans"
    suite = "uvmbench"
    default_dims = {"n": 1 << 16}                     # UVMBench: 10^6 points
    params = {"k": 3, "reps": 20}
    KERNELS = KERNELS

    def dims_for(self, footprint):
        return self._fit(footprint, lambda n: {"n": n}, 1024, 1024)

    def chunk(self, n=None):
        """Points per recentring lane: the power of two nearest sqrt(n) (at least 64), so the
        chunk and the number of chunks stay short loops."""
        n = self.dims["n"] if n is None else n
        return max(64, 1 << int(round(np.log2(n) / 2)))

    def layout(self, dims=None):
        n, k = (dims or self.dims)["n"], self.p["k"]
        nchunks = n // self.chunk(n)
        return ([("x", 4 * n), ("y", 4 * n), ("group", 4 * n), ("dst", 4 * n * k)]
                + [(v, 4 * k) for v in ("mu_x", "mu_y", "sum_x", "sum_y", "nx", "ny")]
                + [(v, 4 * k * nchunks) for v in ("psum_x", "psum_y", "pcount")])

    def init(self, rng):
        n, k = self.dims["n"], self.p["k"]
        centres = rng.uniform(-15, 15, (k, 2))
        which = rng.integers(0, k, n)
        pts = (centres[which] + rng.normal(0, 3, (n, 2))).astype(F32)
        self.x, self.y = pts[:, 0].copy(), pts[:, 1].copy()
        self.mu0 = np.linspace(-10, 10, k).astype(F32) if k > 1 else np.zeros(1, F32)
        for name, v in (("x", self.x), ("y", self.y), ("mu_x", self.mu0), ("mu_y", self.mu0)):
            self.write(name, v)

    def execute(self):
        n, k = self.dims["n"], self.p["k"]
        chunk = self.chunk()
        nchunks = n // chunk
        A = self.addr
        for _ in range(self.p["reps"]):
            self.launch("get_dst", n * k, [A("dst"), A("x"), A("y"), A("mu_x"), A("mu_y"), k])
            self.launch("regroup", n, [A("group"), A("dst"), k])
            self.launch("recenter_partial", nchunks * k, [A("psum_x"), A("psum_y"), A("pcount"), A("x"),
                                                          A("y"), A("group"), k, chunk, nchunks])
            self.launch("recenter_step2", k, [A("psum_x"), A("psum_y"), A("pcount"), A("mu_x"), A("mu_y"),
                                              A("sum_x"), A("sum_y"), A("nx"), A("ny"), nchunks])

    def reference(self):
        n, k = self.dims["n"], self.p["k"]
        chunk = self.chunk()
        nchunks = n // chunk
        mx, my = self.mu0.copy(), self.mu0.copy()
        xs, ys = self.x.reshape(nchunks, chunk), self.y.reshape(nchunks, chunk)
        for _ in range(self.p["reps"]):
            dx, dy = self.x[:, None] - mx[None, :], self.y[:, None] - my[None, :]
            dst = dx * dx + dy * dy
            best, g = dst[:, 0], np.ones(n, I32)
            for j in range(1, k):
                closer = dst[:, j] < best
                best, g = np.where(closer, dst[:, j], best), np.where(closer, I32(j + 1), g)
            gs = g.reshape(nchunks, chunk)
            psx, psy = np.zeros((k, nchunks), F32), np.zeros((k, nchunks), F32)
            for t in range(chunk):
                hit = gs[:, t][None, :] == np.arange(1, k + 1)[:, None]
                psx = np.where(hit, psx + xs[:, t][None, :], psx)
                psy = np.where(hit, psy + ys[:, t][None, :], psy)
            cnt = np.stack([(g == j + 1).sum() for j in range(k)]).astype(I32)
            sx, sy = np.zeros(k, F32), np.zeros(k, F32)
            for c in range(nchunks):
                sx, sy = sx + psx[:, c], sy + psy[:, c]
            with np.errstate(divide="ignore", invalid="ignore"):
                mx, my = sx / cnt.astype(F32), sy / cnt.astype(F32)
        return {"group": g, "mu_x": mx, "mu_y": my, "dst": dst.reshape(-1)}

    def check(self):
        got = {"group": self.read("group", I32), "mu_x": self.read("mu_x", F32),
               "mu_y": self.read("mu_y", F32), "dst": self.read("dst", F32)}
        return compare(self.reference(), got, "groups, centroids, distances")
