"""The hmmgpu command: info, demo, help (in-process, NumPy backend)."""
import json

import pytest

from hmmgpu import cli, trace
from hmmgpu.drivers.mirrorgpu import MirrorGpu


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
    gpu = res["counters"]["gpu0"]
    assert gpu["num_read_faults"] > 0 and gpu["num_write_faults"] > 0
    assert gpu["num_local_maps"] > 0 and gpu["num_remote_maps"] > 0
    assert res["notifier_events"].get("MMU_NOTIFY_MIGRATE", 0) >= 1
    doc = json.loads(path.read_text())
    cats = {e.get("cat") for e in doc["traceEvents"]}
    assert {"cpu", "invalidate", "fault", "migrate", "evict", "job"} <= cats
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"fault", "migrate_to_dev", "migrate_to_ram", "release", "page_free"} <= names
    assert after["device_pages"] == 0
    assert trace.current() is None
    # the fault figures add up: every lane that faulted wrote a record or overflowed the buffer;
    # every record was a duplicate or a serviced fault; the steps account for all of gpu0's
    steps = [st for st in res["steps"] if st.get("faults", {}).get("lanes")]
    assert [st["step"] for st in steps] == ["pointer chase", "device jobs"]
    for st in steps:
        f = st["faults"]
        assert f["lanes"] == f["records"] + f["overflows"] and f["records"] == f["duplicates"] + f["serviced"]
        assert f["serviced"] > 0
    records = sum(st["faults"]["records"] for st in res["steps"] if "faults" in st)
    assert records == gpu["num_read_faults"] + gpu["num_write_faults"] + gpu["num_atomic_faults"]
    assert sum(st["faults"]["duplicates"] for st in res["steps"] if "faults" in st) == gpu["num_duplicate_faults"]
    assert sum(st["faults"]["overflows"] for st in res["steps"] if "faults" in st) == gpu["num_buffer_overflows"]
    dm = [c for k, c in res["counters"].items() if k.startswith("DMirrorDevice")]
    assert len(dm) == 1 and dm[0]["calloc"] == dm[0]["cfree"] == middle["device_pages"]


def test_mirror_gpu_refuses_faults_outside_its_interval():
    import errno

    import hmmgpu
    from hmmgpu.device import JobFault
    from hmmgpu.drivers import dmirror
    system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
    proc = system.spawn()
    a = proc.mmap(8 * 4096, hmmgpu.PROT_READ | hmmgpu.PROT_WRITE, hmmgpu.MAP_PRIVATE | hmmgpu.MAP_ANONYMOUS)
    proc.write(a, bytes(range(256)) * 128)
    dev = dmirror.DMirrorDevice(system, chunk_pages=512, max_chunks=1)
    gpu = MirrorGpu(system, proc, dev, a, a + 4 * 4096)
    assert gpu.jobs.reduce_sum(a, 4 * 4096).value > 0
    with pytest.raises(JobFault) as e:
        gpu.jobs.reduce_sum(a, 8 * 4096)
    assert e.value.errno == errno.EFAULT
    # an munmap invalidates the device page table through the interval notifier
    proc.munmap(a, 8 * 4096)
    assert gpu.invalidated_pages >= 4
    gpu.close()


def test_backend_option_does_not_leak_into_the_environment(monkeypatch, capsys):
    import os
    monkeypatch.delenv("HMMGPU_BACKEND", raising=False)
    assert cli.main(["info", "--json", "--backend", "numpy"]) == 0
    capsys.readouterr()
    assert "HMMGPU_BACKEND" not in os.environ


def test_mirror_gpu_migrate_on_fault():
    import numpy as np

    import hmmgpu
    from hmmgpu.drivers import dmirror
    system = hmmgpu.System(backend="numpy", ram_bytes=32 << 20)
    proc = system.spawn()
    n = 1024
    a = proc.mmap(n * 4096, hmmgpu.PROT_READ | hmmgpu.PROT_WRITE, hmmgpu.MAP_PRIVATE | hmmgpu.MAP_ANONYMOUS)
    data = np.arange(n * 1024, dtype=np.uint32)
    proc.write(a, data)
    dev = dmirror.DMirrorDevice(system, chunk_pages=n, max_chunks=1)
    gpu = MirrorGpu(system, proc, dev, a, a + n * 4096, migrate_on_fault=True)
    expect = int(data.sum(dtype=np.uint64))
    assert gpu.jobs.reduce_sum(a, n * 4096).value == expect
    st = gpu.stats()
    assert st["num_pages_in"] == n and st["num_local_maps"] == n and st["num_remote_maps"] == 0
    m = dev.open(proc)
    snap = m.snapshot(a, n).data
    assert ((snap & 0xF0) == dmirror.PROT_DEV_PRIVATE_LOCAL).all()
    assert gpu.jobs.reduce_sum(a, n * 4096).faults == 0      # resident blocks are not migrated again
    # the CPU takes the pages back; the next job faults and migrates them again
    assert (proc.read(a, n * 4096).view(np.uint32) == data).all()
    r = gpu.jobs.reduce_sum(a, n * 4096)
    assert r.value == expect and r.faults > 0 and gpu.stats()["num_pages_in"] == 2 * n
    m.close()
    gpu.close()


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
