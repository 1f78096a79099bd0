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


def test_info_table(capsys):
    assert cli.main(["info", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "backend in use" in out and "numpy" in out and "emulated devices" in out


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
