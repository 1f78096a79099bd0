"""The hmmgpu command: info, demo, help (in-process, NumPy backend)."""
import json

import pytest

from hmmgpu import cli, trace


def _json_out(capsys):
    out = capsys.readouterr().out
    return json.loads(out)


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("info", "demo", "bench", "HMMGPU_BACKEND", "numpy fallback", "--trace"):
        assert word in out
    for sub in ("info", "demo", "bench"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "--backend" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: hmmgpu" in capsys.readouterr().out


def test_info_json(capsys):
    assert cli.main(["info", "--json", "--backend", "numpy"]) == 0
    info = _json_out(capsys)
    assert info["backend"] == "numpy" and info["emulated"] is True
    assert info["auto_backend"] in ("numpy", "cupy") and info["auto_reason"]
    assert isinstance(info["gpus"], list)
    names = [d["device"] for d in info["emulated_devices"]]
    assert "system RAM" in names
    assert any("dmirror" in n for n in names)
    # the UVM driver's policies and their knobs, with nvidia-uvm's names and defaults
    knobs = info["uvm_knobs"]
    assert knobs["prefetch"]["policy"] == "DensityPrefetcher"
    assert knobs["prefetch"]["uvm_perf_prefetch_threshold"] == 51
    assert knobs["thrashing"]["uvm_perf_thrashing_lapse_usec"] == 500
    assert knobs["access_counters"]["uvm_perf_access_counter_threshold"] == 256
    assert knobs["eviction"] == {"policy": "UvmLru"}
    # and the names `hmmgpu run --policy` takes, each one the driver's registry accepts
    assert info["uvm_policy_names"]["eviction"] == ["fifo", "lfu", "lru", "random"]
    assert "density" in info["uvm_policy_names"]["prefetch"]


def test_info_table(capsys):
    assert cli.main(["info", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "backend in use" in out and "numpy" in out and "emulated devices" in out
    assert "uvm_perf_thrashing_pin_threshold" in out and "UVM driver policies" in out


def test_demo_end_to_end(capsys, tmp_path):
    path = tmp_path / "demo.json"
    rc = cli.main(["demo", "--backend", "numpy", "--mib", "1", "--json", "--trace", str(path)])
    res = _json_out(capsys)
    assert rc == 0 and res["ok"], res["checks"]
    assert res["backend"] == "numpy" and res["label"] == cli.EMULATED_LABEL
    assert [s["step"] for s in res["steps"]] == ["build", "attach", "pointer chase", "migrate hot data",
                                                 "device jobs", "cpu meanwhile", "cpu touches results", "evict"]
    assert all(res["checks"].values()) and len(res["checks"]) == 7
    before, middle, after = res["rss_memcg"]
    assert middle["device_pages"] == 2 * res["array_bytes"] // 4096
    assert before["memcg_bytes"] > 0 and after["memcg_bytes"] >= before["memcg_bytes"]
    gpu = res["counters"]["gpu"]
    npages = res["array_bytes"] // 4096
    # the heap's pages mapped remotely, x and y prefetched, y faulted home by the CPU
    assert gpu["num_read_faults"] > 0 and gpu["num_map_remote"] > 0
    assert gpu["num_pages_in"] == 2 * npages and gpu["cpu_page_fault_count"] > 0
    assert res["notifier_events"].get("MMU_NOTIFY_MIGRATE", 0) >= 1
    doc = json.loads(path.read_text())
    cats = {e.get("cat") for e in doc["traceEvents"]}
    assert {"cpu", "invalidate", "fault", "migrate", "evict", "job"} <= cats
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"fault", "prefetch", "migrate_to_ram", "close", "page_free"} <= names
    assert after["device_pages"] == 0
    assert trace.current() is None
    # the fault figures add up: every lane that faulted wrote a record or overflowed the buffer;
    # every record was a duplicate or a serviced fault; the steps account for all of the driver's
    steps = [st for st in res["steps"] if st.get("faults", {}).get("lanes")]
    assert [st["step"] for st in steps] == ["pointer chase"]      # the prefetch mapped x and y
    modelled = {st["step"]: st["modelled_s"] for st in res["steps"] if "modelled_s" in st}
    assert list(modelled)[0] == "pointer chase" and modelled["migrate hot data"] > 0
    assert all(m >= 0 for m in modelled.values()) and gpu["modelled_s"] >= sum(modelled.values())
    for st in steps:
        f = st["faults"]
        assert f["lanes"] == f["records"] + f["overflows"] and f["records"] == f["duplicates"] + f["serviced"]
        assert f["serviced"] > 0
    records = sum(st["faults"]["records"] for st in res["steps"] if "faults" in st)
    assert records == gpu["num_read_faults"] + gpu["num_write_faults"] + gpu["num_atomic_faults"]
    assert sum(st["faults"]["duplicates"] for st in res["steps"] if "faults" in st) == gpu["num_duplicate_faults"]
    assert sum(st["faults"]["overflows"] for st in res["steps"] if "faults" in st) == gpu["num_buffer_overflows"]


def test_backend_option_does_not_leak_into_the_environment(monkeypatch, capsys):
    import os
    monkeypatch.delenv("HMMGPU_BACKEND", raising=False)
    assert cli.main(["info", "--json", "--backend", "numpy"]) == 0
    capsys.readouterr()
    assert "HMMGPU_BACKEND" not in os.environ


def exit_status(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_demo_tables_go_to_stdout(capsys):
    """``hmmgpu demo > out.txt`` keeps the tables: without --json they are on stdout."""
    assert cli.main(["demo", "--backend", "numpy", "--mib", "0.25"]) == 0
    cap = capsys.readouterr()
    assert "hmmgpu demo: the main job" in cap.out and "device faults, step by step" in cap.out
    assert "checks:" in cap.out and cap.err == ""


def test_demo_mib_is_the_size_of_each_array(capsys):
    assert cli.main(["demo", "--backend", "numpy", "--mib", "0.5", "--json"]) == 0
    assert _json_out(capsys)["array_bytes"] == 512 * 1024


def test_user_errors_are_one_line_before_any_work(capsys, monkeypatch, tmp_path):
    from hmmgpu.cli import demo
    ran = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: ran.append(a))
    monkeypatch.delenv("HMMGPU_BACKEND", raising=False)
    cases = [
        (["demo", "--mib", "100000000"], "of host memory but"),
        (["demo", "--mib", "0"], "--mib must be a positive number"),
        (["demo", "--mib", "-1"], "--mib must be a positive number"),
        (["demo", "--trace", str(tmp_path / "nonexistent" / "t.json")], "does not exist"),
        (["demo", "--trace", str(tmp_path)], "it is a directory"),
        (["info", "--backend", "bogus"], "invalid choice"),
    ]
    try:
        import cupy  # noqa: F401
    except Exception:
        cases.append((["demo", "--backend", "cupy"], "pip install 'hmmgpu[cuda12]'"))
    for argv, words in cases:
        assert exit_status(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setenv("HMMGPU_BACKEND", "bogus")
    for argv in (["demo"], ["bench", "jobs"], ["info"]):
        assert exit_status(argv) == 2
        err = capsys.readouterr().err
        assert "HMMGPU_BACKEND='bogus' is not a backend" in err and err.count("\n") == 1
    assert not ran


def test_empty_backend_variable_means_unset(capsys, monkeypatch):
    from hmmgpu.device.backend import backend_info, get_backend
    monkeypatch.setenv("HMMGPU_BACKEND", "")
    assert backend_info()["env"] is None
    assert get_backend().name == backend_info()["backend"]
    assert cli.main(["info", "--json"]) == 0
    info = _json_out(capsys)
    assert info["HMMGPU_BACKEND"] is None and info["requested_backend"] == "auto"


def test_version_and_python_m_hmmgpu():
    import subprocess
    import sys

    import hmmgpu
    out = subprocess.run([sys.executable, "-m", "hmmgpu", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"hmmgpu {hmmgpu.__version__}"
    out = subprocess.run([sys.executable, "-m", "hmmgpu.cli", "bench", "--list"], capture_output=True, text=True)
    assert out.returncode == 0 and "migration" in out.stdout


# -- hmmgpu run, hmmgpu sweep ---------------------------------------------------------------------

TINY = ["--footprint", "100K", "--param", "step=50", "--backend", "numpy"]


def test_run_and_sweep_help_teach(capsys):
    for sub, words in (("run", ("--oversub", "--policy", "--footprint", "--trace", "examples:", "hmmgpu run --list")),
                       ("sweep", ("--spec", "--workers", "--scheduler", "examples:", "uvmbench", '"oversub"'))):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out, (sub, w)


def test_run_json_and_trace(capsys, tmp_path):
    path = tmp_path / "run.json"
    rc = cli.main(["run", "atax", "--oversub", "1.25", "--seed", "2", "--json", "--trace", str(path)] + TINY)
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert rc == 0
    r = res["result"]
    assert r["ok"] and r["oversub"] == 1.25 and r["seed"] == 2 and r["params"] == {"step": 50}
    assert r["footprint"] <= 100 << 10 and r["device_bytes"] == 2 << 20 and r["faults"] > 0
    assert r["driver"] == "UvmDriver" and r["modelled_s"] > 0 and r["counters"]["num_pages_in"] > 0
    assert res["point"]["policy"] == "default" and res["trace"]["events"] > 0
    # the live table and the result went to stderr, the JSON alone to stdout
    assert "atax_kernel1" in cap.err and "modelled time" in cap.err and "num_read_faults" in cap.err
    cats = {e.get("cat") for e in json.loads(path.read_text())["traceEvents"]}
    assert "fault" in cats


def test_run_table_on_stdout(capsys):
    assert cli.main(["run", "mvt"] + TINY) == 0
    cap = capsys.readouterr()
    assert "mvt_kernel1" in cap.out and "ok" in cap.out and "wall time" in cap.out and cap.err == ""


def test_run_replays_a_trace_file(capsys, tmp_path):
    """``hmmgpu run trace --param path=FILE``: a captured page-access trace, replayed and checked."""
    import numpy as np
    from hmmgpu import workloads
    rng = np.random.default_rng(0)
    vaddr = 0x7F0000000000 + rng.integers(0, 3 << 20, 300) // 8 * 8
    workloads.save_trace(str(tmp_path / "t.npz"), np.arange(300) // 50, vaddr, rng.integers(0, 2, 300))
    assert cli.main(["run", "trace", "--param", f"path={tmp_path / 't.npz'}", "--param", "batch=64", "--json",
                     "--backend", "numpy"]) == 0
    r = json.loads(capsys.readouterr().out)["result"]
    assert r["ok"] and r["launches"] == 5 and r["faults"] > 0 and r["params"]["batch"] == 64


def test_run_list(capsys):
    assert cli.main(["run", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"gemm", "kmeans", "trace"}
    assert next(r for r in rows if r["name"] == "gemm")["default_footprint"] == 786432


def test_run_exit_status_1_when_the_check_fails(capsys, monkeypatch):
    from hmmgpu import workloads
    from hmmgpu.workloads.base import Check
    monkeypatch.setattr(workloads.get("atax"), "check", lambda self: Check(False, "y", detail="y: 1 of 96 differ"))
    assert cli.main(["run", "atax", "--json"] + TINY) == 1
    r = json.loads(capsys.readouterr().out)["result"]
    assert not r["ok"] and r["check_detail"] == "y: 1 of 96 differ"


def test_run_and_sweep_user_errors_are_one_line(capsys, monkeypatch, tmp_path):
    from hmmgpu import experiments
    ran = []
    monkeypatch.setattr(experiments, "run_point", lambda *a, **k: ran.append(a))
    (tmp_path / "bad.json").write_text('{"oversub": 1.25}')
    (tmp_path / "file").write_text("")
    cases = [
        (["run"], "name a workload"),
        (["run", "nosuch"], "no workload 'nosuch'"),
        (["run", "atax", "--oversub", "0"], "oversubscription ratio must be a positive number"),
        (["run", "atax", "--oversub", "x"], "invalid float value"),
        (["run", "atax", "--footprint", "1Q"], "--footprint: '1Q' is not a size"),
        (["run", "atax", "--footprint", "1K"], "below its smallest instance"),
        (["run", "atax", "--footprint", "1T"], "of host memory but"),
        (["run", "atax", "--param", "nope=1"], "unknown parameter(s) nope"),
        (["run", "atax", "--param", "step"], "is not NAME=VALUE"),
        (["run", "atax", "--policy", "prefetch"], "is not FAMILY=NAME"),
        (["run", "atax", "--policy", "colour=red"], "no policy family 'colour'"),
        (["run", "atax", "--policy", "eviction=mru"], "no eviction policy 'mru': choose from fifo, lfu, lru, random"),
        (["run", "atax", "--seed", "-1"], "seed must be a non-negative integer"),
        (["run", "atax", "--trace", str(tmp_path / "no" / "t.json")], "does not exist"),
        (["sweep"], "name the workloads"),
        (["sweep", "atax", "--oversub", "1,x"], "--oversub must be a comma-separated list"),
        (["sweep", "atax", "--spec", str(tmp_path / "bad.json")], "oversub must be a list"),
        (["sweep", "atax", "--spec", str(tmp_path / "none.toml")], "cannot read the spec"),
        (["sweep", "atax", "--workers", "0"], "--workers must be at least 1"),
        (["sweep", "atax", "--timeout", "0"], "--timeout: must be positive"),
        (["sweep", "atax", "--out", str(tmp_path / "file")], "is not a directory"),
        (["sweep", "atax", "--out", str(tmp_path / "no" / "out")], "does not exist"),
        (["sweep", "atax", "--policies", "nosuch=1"], "no policy family"),
    ]
    for argv, words in cases:
        assert exit_status(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)
    assert exit_status(["sweep", "atax", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "needs dask.distributed" in err and "pip install 'hmmgpu[dask]'" in err and err.count("\n") == 1
    assert not ran


def test_sweep_from_a_spec_resumes(capsys, tmp_path):
    spec = tmp_path / "sweep.toml"
    spec.write_text('workloads = ["atax", "mvt"]\noversub = [1.0, 1.25]\nfootprint = "100K"\n'
                    'backend = "numpy"\n[params]\nstep = 50\n')
    out = tmp_path / "out"
    argv = ["sweep", "--spec", str(spec), "--out", str(out), "--workers", "1", "--json"]
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["points"] == 4 and res["ran"] == 4 and len(res["rows"]) == 4 and all(r["ok"] for r in res["rows"])
    assert (out / "results.json").exists() and (out / "results.csv").exists()
    assert "[4/4]" in cap.err and "slowdown, default policies" in cap.err
    try:
        import matplotlib  # noqa: F401
        assert res["plots"]["oversubscription.png"] is None and (out / "oversubscription.png").exists()
    except ImportError:
        assert "matplotlib is not installed" in res["plots"]["*"]
    # flags win over the spec; the points already there are skipped
    assert cli.main(argv + ["bicg", "atax", "--no-plots"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert res2["points"] == 4 and res2["ran"] == 2 and res2["plots"] == {}
    assert [r for r in res2["rows"] if r["workload"] == "atax"] == [r for r in res["rows"] if r["workload"] == "atax"]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 6


def test_sweep_exit_status_1_when_a_point_fails(capsys, monkeypatch, tmp_path):
    from hmmgpu import workloads
    from hmmgpu.workloads.base import Check
    monkeypatch.setattr(workloads.get("mvt"), "check", lambda self: Check(False, "x1", detail="x1: 1 differ"))
    assert cli.main(["sweep", "atax", "mvt", "--out", str(tmp_path), "--workers", "1", "--no-plots"] + TINY) == 1
    assert "FAILED" in capsys.readouterr().out
