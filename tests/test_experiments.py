"""Experiments (hmmgpu/experiments.py): points, run_point, sweeps (resume, local workers, Dask),
spec files, results files and plots.  Tiny footprints: every point runs in a fraction of a second."""
import csv
import json

import pytest

from hmmgpu import experiments as X
from hmmgpu import workloads as W
from hmmgpu.workloads.base import Check

STEP = (("step", 50),)


def tiny(workload="atax", oversub=1.0, seed=0, **kw):
    return X.Point(workload, kw.pop("footprint", 100_000), kw.pop("policies", ()), oversub, seed, "numpy",
                   kw.pop("params", STEP if workload in ("atax", "mvt", "bicg") else ()))


def test_parse_bytes():
    assert X.parse_bytes("1536") == 1536
    assert X.parse_bytes("64K") == 64 << 10
    assert X.parse_bytes("1.5M") == 3 << 19
    assert X.parse_bytes("2GiB") == 2 << 30
    assert X.parse_bytes(4096) == 4096
    for bad in ("", "1Q", "K", "-4K", "0", "1.3"):
        with pytest.raises(ValueError):
            X.parse_bytes(bad)


def test_policies_parse_and_label():
    p = X.parse_policies(["prefetch=none", "Eviction=fifo"])
    assert p == (("eviction", "fifo"), ("prefetch", "none"))
    assert X.parse_policies("eviction=fifo,prefetch=none") == p
    assert X.parse_policies({"prefetch": "none", "eviction": "fifo"}) == p
    assert X.parse_policies(p) == p
    assert X.parse_policies("default") == () == X.parse_policies({})
    # nvidia-uvm's own policies are the default, however they are named
    assert X.parse_policies("prefetch=density,eviction=lru,thrashing=default") == ()
    assert X.policy_label(p) == "eviction=fifo,prefetch=none" and X.policy_label(()) == "default"
    with pytest.raises(ValueError, match="no prefetch policy 'bogus': choose from block, density, none"):
        X.parse_policies("prefetch=bogus")
    for bad in ("prefetch", "nosuch=x", "prefetch=none,prefetch=block", "prefetch="):
        with pytest.raises(ValueError):
            X.parse_policies(bad)


def test_point_validation_names_the_problem():
    with pytest.raises(ValueError, match="oversubscription"):
        X.Point("atax", oversub=0)
    with pytest.raises(ValueError, match="oversubscription"):
        X.Point("atax", oversub=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        X.Point("atax", seed=-1)
    with pytest.raises(ValueError, match="backend"):
        X.Point("atax", backend="opencl")
    with pytest.raises(ValueError, match="no workload"):
        X.validate(X.Point("nosuch"))
    with pytest.raises(ValueError, match="smallest instance"):
        X.validate(X.Point("atax", footprint=4096))
    with pytest.raises(TypeError, match="unknown parameter"):
        X.validate(X.Point("atax", params=(("nope", 1),)))
    # a point is a value: equal fields, equal keys
    assert X.Point("ATAX", "100K", "default").key == X.Point("atax", 102400, ()).key
    assert X.Point("atax", oversub=1).key != X.Point("atax", oversub=1.25).key


def test_device_memory_is_footprint_over_oversub_in_root_chunks():
    M = 1 << 20
    assert X.device_bytes_for(10 * M, 1.25) == 8 * M           # exact
    assert X.device_bytes_for(10 * M, 1.0) == 10 * M
    assert X.device_bytes_for(9 * M, 1.0) == 10 * M            # <= 1: everything fits, rounded up
    assert X.device_bytes_for(9 * M, 0.5) == 18 * M
    assert X.device_bytes_for(9 * M, 1.25) == 8 * M            # 7.2 MiB: 8 is nearer by ratio than 6
    assert X.device_bytes_for(5 * M, 1.25) == 4 * M            # 4.0 MiB
    assert X.device_bytes_for(6.5 * M, 2.0) == 4 * M           # 3.25 MiB: 4 / 3.25 < 3.25 / 2
    assert X.device_bytes_for(M, 4.0) == 2 * M                 # at least one root chunk
    assert X.device_bytes_for(100 * M, 3.0) == 34 * M          # 33.3 MiB


def test_run_point_checks_and_is_deterministic():
    a = X.run_point(tiny(oversub=1.25))
    assert a["ok"] and a["error"] is None and a["check"].startswith("tmp, y")
    assert list(a) == list(X.ROW_FIELDS) and a["driver"] == "UvmDriver"
    # a tiny footprint is not oversubscribed: device memory is at least one 2 MiB root chunk
    assert a["device_bytes"] == 2 << 20 and a["oversub_effective"] == round(a["footprint"] / (2 << 20), 4)
    assert a["faults"] > 0 and a["launches"] == 6 and a["replays"] > 0 and a["lanes"] > 0
    assert a["migrated_bytes"] >= a["footprint"] // 2 and a["wall_s"] > 0 and a["backend"] == "numpy"
    assert a["modelled_s"] > 0 and a["evictions"] == 0
    assert a["counters"]["gpu_page_fault_count"] == a["faults"]
    b = X.run_point(tiny(oversub=1.25))
    assert X.deterministic(a) == X.deterministic(b)
    # another seed is other input data, the same program: the same launches
    c = X.run_point(tiny(oversub=1.25, seed=1))
    assert c["ok"] and c["launches"] == a["launches"]


def test_oversubscription_evicts_and_costs_modelled_time():
    """A working set 1.25 x device memory: root chunks are evicted, more bytes move, the modelled
    time grows, and the result is still exact; a policy changes what the driver does."""
    fit = X.run_point(tiny(footprint="5M", oversub=1.0))
    over = X.run_point(tiny(footprint="5M", oversub=1.25))
    assert fit["ok"] and over["ok"] and fit["evictions"] == 0 < over["evictions"]
    assert 1.2 < over["oversub_effective"] <= 1.25 and fit["oversub_effective"] < 1
    assert over["migrated_bytes"] > fit["migrated_bytes"] and over["counters"]["bytes_xfer_dth"] > 0
    assert over["modelled_s"] > fit["modelled_s"]
    assert fit["counters"]["num_prefetched_pages"] > 0
    nopf = X.run_point(tiny(footprint="5M", oversub=1.0, policies="prefetch=none"))
    assert nopf["ok"] and nopf["policy"] == "prefetch=none" and nopf["counters"]["num_prefetched_pages"] == 0


def test_run_point_reports_a_failed_check_and_a_crash(monkeypatch):
    cls = W.get("atax")
    monkeypatch.setattr(cls, "check", lambda self: Check(False, "y", detail="y: 1 of 96 differ"))
    r = X.run_point(tiny())
    assert not r["ok"] and r["error"] is None and r["check_detail"] == "y: 1 of 96 differ"

    def boom(self):
        raise RuntimeError("the device fell over")
    monkeypatch.setattr(cls, "execute", boom)
    r = X.run_point(tiny())
    assert not r["ok"] and r["error"] == "RuntimeError: the device fell over"


def test_a_point_past_its_timeout_is_an_error_and_runs_again(tmp_path):
    """A wall-time limit stops a point mid-run (a livelocking policy would never return): an
    error row with the figures so far, which the next sweep runs again."""
    p = tiny(footprint="5M", oversub=1.25)
    rows, _ = X.sweep([p], str(tmp_path), timeout=0.05)
    r = rows[0]
    assert not r["ok"] and r["error"].startswith("timeout: did not finish within 0.05 s")
    assert r["wall_s"] >= 0.05 and r["modelled_s"] > 0 and r["check"] == ""
    rows, ran = X.sweep([p], str(tmp_path))
    assert ran == 1 and rows[0]["ok"] and rows[0]["error"] is None


def test_run_point_reports_every_launch():
    seen = []
    r = X.run_point(tiny(), on_launch=lambda res, driver: seen.append((res.name, res.faults)))
    assert len(seen) == r["launches"] and sum(f for _, f in seen) == r["faults"]
    assert {n for n, _ in seen} == {"atax_kernel1", "atax_kernel2"}


def test_policies_are_checked_by_the_driver_registry():
    with pytest.raises(ValueError, match="no eviction policy 'mru'"):
        X.validate(tiny(policies="eviction=mru"))
    assert X.validate(tiny(policies="eviction=fifo")).policy == "eviction=fifo"


def test_make_points_expands_groups():
    pts = X.make_points(["uvmbench"], oversubs=(1.0, 1.25))
    assert [p.workload for p in pts[::2]] == list(X.UVMBENCH) and len(X.UVMBENCH) == 13
    assert {"gemm", "2dconv", "bfs", "kmeans"} <= set(X.UVMBENCH) and "streaming" not in X.UVMBENCH
    assert [p.oversub for p in pts[:2]] == [1.0, 1.25]
    assert X.expand_workloads(["atax", "ATAX", "patterns"]) == ["atax", "streaming", "block_streaming",
                                                                 "random_warp"]
    with pytest.raises(ValueError, match="no workload"):
        X.make_points(["nosuch"])


def _points():
    return [tiny("atax", o) for o in (1.0, 1.25)] + [tiny("mvt", 1.25), tiny("bicg", 1.0, seed=2)]


def _parallel_points():
    """_points and one that evicts (3 MiB on one 2 MiB root chunk) with another eviction policy."""
    return _points() + [tiny("mvt", 1.25, footprint="3M", policies="eviction=fifo")]


def _det(rows):
    return [X.deterministic(r) for r in rows]


def test_sweep_writes_json_and_csv(tmp_path):
    pts = _points()
    rows, ran = X.sweep(pts, str(tmp_path), workers=1, meta={"what": "test"})
    assert ran == 4 and len(rows) == 4 and all(r["ok"] for r in rows)
    doc = json.loads((tmp_path / X.RESULTS_JSON).read_text())
    assert doc["meta"] == {"what": "test"} and doc["rows"] == rows
    # a fixed order: workload, then policy, oversub, seed
    assert [(r["workload"], r["oversub"]) for r in rows] == [("atax", 1.0), ("atax", 1.25), ("bicg", 1.0),
                                                             ("mvt", 1.25)]
    with open(tmp_path / X.RESULTS_CSV) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    for line, r in zip(table, rows):
        assert line["workload"] == r["workload"] and float(line["oversub"]) == r["oversub"]
        assert int(line["faults"]) == r["faults"] and line["ok"] == "True"
        assert int(line["counter.num_read_faults"]) == r["counters"]["num_read_faults"]
        assert json.loads(line["params"]) == r["params"]


def test_sweep_resumes(tmp_path):
    """Points already in the directory are not run again; new ones are; a point that crashed is."""
    pts = _points()
    first, ran = X.sweep(pts[:2], str(tmp_path), workers=1)
    assert ran == 2
    calls = []
    rows, ran = X.sweep(pts, str(tmp_path), workers=1, on_point=lambda p, r, i, n: calls.append((p.key, i, n)))
    assert ran == 2 and [c[0] for c in calls] == [p.key for p in pts[2:]] and calls[-1][1:] == (2, 2)
    assert len(rows) == 4
    assert [r for r in rows if r["workload"] == "atax"] == first       # kept as they were, wall time too
    rows, ran = X.sweep(pts, str(tmp_path), workers=1)
    assert ran == 0 and len(rows) == 4
    # a crashed point is run again
    doc = json.loads((tmp_path / X.RESULTS_JSON).read_text())
    doc["rows"][0]["error"] = "RuntimeError: interrupted"
    (tmp_path / X.RESULTS_JSON).write_text(json.dumps(doc))
    rows, ran = X.sweep(pts, str(tmp_path), workers=1)
    assert ran == 1 and len(rows) == 4 and all(r["error"] is None for r in rows)


def test_sweep_same_results_on_one_and_two_workers(tmp_path):
    pts = _parallel_points()
    one, _ = X.sweep(pts, str(tmp_path / "one"), workers=1)
    assert one[-1]["evictions"] > 0 and one[-1]["policy"] == "eviction=fifo"
    two, ran = X.sweep(pts, str(tmp_path / "two"), workers=2)      # spawned worker processes
    assert ran == 5 and _det(one) == _det(two)


def test_sweep_on_a_dask_cluster(tmp_path):
    """The same sweep on a dask.distributed LocalCluster of 2 worker processes gives the rows of
    the local run (CI runs this: dask is in the test extra)."""
    distributed = pytest.importorskip("distributed")
    pts = _parallel_points()
    local, _ = X.sweep(pts, str(tmp_path / "local"), workers=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster:
        rows, ran = X.sweep(pts, str(tmp_path / "dask"), scheduler=cluster.scheduler_address)
    assert ran == 5 and _det(rows) == _det(local)


def test_spec_files(tmp_path):
    spec = {"workloads": ["atax"], "oversub": [1.0, 1.25], "seeds": [0], "policies": [{}], "footprint": "100K",
            "params": {"step": 50}, "backend": "numpy"}
    j = tmp_path / "s.json"
    j.write_text(json.dumps(spec))
    assert X.load_spec(str(j)) == spec
    t = tmp_path / "s.toml"
    t.write_text('workloads = ["atax"]\noversub = [1.0, 1.25]\nseeds = [0]\npolicies = [{}]\n'
                 'footprint = "100K"\nbackend = "numpy"\n[params]\nstep = 50\n')
    assert X.load_spec(str(t)) == spec
    for text, msg in (('{"workload": ["atax"]}', "unknown key"), ('{"oversub": 1.25}', "must be a list"),
                      ("[1]", "a spec is"), ("{", "not valid JSON")):
        j.write_text(text)
        with pytest.raises(ValueError, match=msg):
            X.load_spec(str(j))
    with pytest.raises(ValueError, match="cannot read"):
        X.load_spec(str(tmp_path / "none.json"))


def _row(workload, policy, oversub, modelled, seed=0, faults=10):
    return {"workload": workload, "policy": policy, "oversub": oversub, "seed": seed, "ok": True,
            "modelled_s": modelled, "wall_s": 1.0, "faults": faults, "migrated_bytes": 1 << 20, "evictions": 0}


def test_speedups_and_slowdowns():
    rows = [_row("a", "default", 1.0, 2.0), _row("a", "default", 1.25, 3.0), _row("a", "default", 1.25, 5.0, 1),
            _row("a", "prefetch=none", 1.0, 4.0), _row("b", "prefetch=none", 1.0, 1.0)]
    assert X.speedups(rows) == {("a", 1.0, "prefetch=none"): 0.5}        # b has no default to compare
    assert X.slowdowns(rows) == {("a", 1.25): 2.0}                       # mean over seeds: 4 / 2
    assert X.slowdowns([_row("a", "default", 1.0, None), _row("a", "default", 1.25, None)]) == {}
    assert X.by_oversub(rows)["a"][1.25]["faults"] == 10


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(w, p, o, t * (1 + o)) for w in ("a", "b") for p, t in (("default", 1.0), ("prefetch=none", 0.8))
            for o in (1.0, 1.25)]
    got = X.plot(rows, str(tmp_path))
    assert got == {X.PLOT_SPEEDUP: None, X.PLOT_OVERSUB: None}
    for f in got:
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "x").mkdir()
    got = X.plot([dict(r, modelled_s=None) for r in rows], str(tmp_path / "x"))
    assert "no modelled times" in got[X.PLOT_SPEEDUP] and got[X.PLOT_OVERSUB] is None
