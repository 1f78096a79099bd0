"""hmmgpu.trace: the global tracer is free when off, records when on, and exports Chrome trace JSON."""
import json

import numpy as np
import pytest

import hmmgpu
from hmmgpu import trace

RW = hmmgpu.PROT_READ | hmmgpu.PROT_WRITE
ANON = hmmgpu.MAP_PRIVATE | hmmgpu.MAP_ANONYMOUS


@pytest.fixture(autouse=True)
def _off():
    trace.disable()
    yield
    trace.disable()


def test_off_is_a_noop():
    assert trace.enabled is False and trace.current() is None
    trace.event("x", "cat", 0.0, 1.0)
    trace.instant("y", "cat")
    trace.counter("c", a=1)
    with trace.span("z", "cat") as s:
        s.args["k"] = 1
    assert trace.current() is None


def test_records_and_exports_chrome_fields(tmp_path):
    t = trace.enable()
    trace.event("migrate", trace.CAT_MIGRATE, 10.0, 5.0, track="gpu0/dma", npages=np.int64(3))
    trace.instant("fault", trace.CAT_FAULT, track="gpu0", vaddr="0x1000")
    trace.counter("resident", track="gpu0", pages=7)
    with trace.span("service", trace.CAT_FAULT, track="gpu0", batch=2):
        pass
    with pytest.raises(ValueError):
        with trace.span("job", trace.CAT_JOB, track="gpu0"):
            raise ValueError("boom")
    path = tmp_path / "t.json"
    n = t.write(str(path), {"command": "test"})
    doc = json.loads(path.read_text())
    assert n == len(doc["traceEvents"])
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["command"] == "test"
    evs = doc["traceEvents"]
    for e in evs:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(e)
        assert isinstance(e["ts"], (int, float)) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
    real = [e for e in evs if e["ph"] != "M"]
    assert {e["ph"] for e in real} == {"X", "i", "C"}
    assert all("dur" in e and e["dur"] >= 0 for e in real if e["ph"] == "X")
    mig = next(e for e in real if e["name"] == "migrate")
    assert mig["cat"] == "migrate" and mig["dur"] == 5.0 and mig["args"]["npages"] == 3
    job = next(e for e in real if e["name"] == "job")
    assert job["args"]["error"] == "ValueError"
    names = {(e["name"], e["args"]["name"]) for e in evs if e["ph"] == "M"}
    assert ("process_name", "gpu0") in names and ("thread_name", "gpu0/dma") in names
    # same process for both gpu0 tracks
    pids = {e["pid"] for e in real}
    assert len(pids) == 1
    assert trace.current().summary()[("migrate", "migrate")][0] == 1


def test_tracing_context_restores_and_writes(tmp_path):
    path = tmp_path / "c.json"
    with trace.tracing(str(path)) as t:
        trace.instant("a", "cat")
        assert trace.enabled
    assert not trace.enabled and len(t) == 1
    assert json.loads(path.read_text())["traceEvents"]


def test_bounded():
    t = trace.enable(limit=3)
    for i in range(5):
        trace.instant(str(i), "cat")
    assert len(t) == 3 and t.dropped == 2
    assert t.to_chrome()["otherData"]["dropped_events"] == 2


def test_watch_notifiers_traces_invalidations():
    system = hmmgpu.System(backend="numpy", ram_bytes=8 << 20)
    proc = system.spawn()
    trace.watch_notifiers(proc.mm)
    trace.watch_notifiers(proc.mm)          # idempotent
    a = proc.mmap(4 * 4096, RW, ANON)
    proc.write(a, b"x" * 4096)
    t = trace.enable()
    proc.mprotect(a, 4 * 4096, hmmgpu.PROT_READ)
    proc.munmap(a, 4 * 4096)
    evs = [e for e in t.to_chrome()["traceEvents"] if e["ph"] == "i"]
    assert evs, "no invalidation traced"
    assert all(e["cat"] == "invalidate" and e["name"].startswith("invalidate MMU_NOTIFY_") for e in evs)
    assert any("UNMAP" in e["name"] for e in evs)
    assert evs[-1]["args"]["start"] == hex(a)
    counts = trace.notifier_event_counts(proc.mm)
    assert counts.get("MMU_NOTIFY_UNMAP", 0) >= 1
    proc.exit()


def test_read_counters_duck_typing():
    class Stats:
        def stats(self):
            return {"num_read_faults": 3, "nested": {"a": 1}, "name": "x"}

    class Attrs:
        num_write_faults = 5
        num_replays = np.int64(2)
        pages_copied = 7

    class Nothing:
        pass

    assert trace.read_counters(Stats()) == {"num_read_faults": 3, "nested.a": 1}
    assert trace.read_counters(Attrs()) == {"num_write_faults": 5, "num_replays": 2, "pages_copied": 7}
    assert trace.read_counters(Nothing()) == {}
    assert trace.read_counters(None) == {}


def test_collect_counters_reads_devices_and_system():
    from hmmgpu.device import EmulatedDevice
    from hmmgpu.device.backend import get_backend
    be = get_backend("numpy")
    host = be.host_arena(64)
    dev = EmulatedDevice(be, 16, 1 << 20, host, name="gpu-test")
    system = hmmgpu.System(backend="numpy", ram_bytes=8 << 20)
    system.memcg("cg")
    out = trace.collect_counters(system, devices=[dev])
    assert out["gpu-test"]["num_read_faults"] == 0
    assert "num_fault_batches" in out["gpu-test"]
    assert out["system"]["nr_ram_pages"] == (8 << 20) // 4096
    assert out["memcg cg"]["pages"] == 0


def test_every_device_kind_reads_through_one_interface():
    """read_counters of a dmirror device gives its calloc/cfree (it used to give {}), and
    collect_counters(system) finds every driver that holds device memory by itself: the dmirror
    device and the UVM driver, whose counters have UVM's names."""
    from hmmgpu import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
    from hmmgpu.drivers import dmirror, uvm
    system = hmmgpu.System(backend="numpy", ram_bytes=16 << 20)
    proc = system.spawn()
    a, b = (proc.mmap(8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS) for _ in range(2))
    proc.write(a, np.arange(8 * 1024, dtype=np.uint32))
    proc.write(b, np.arange(8 * 1024, dtype=np.uint32))
    dm = dmirror.DMirrorDevice(system, chunk_pages=512, max_chunks=1)
    m = dm.open(proc)
    assert m.migrate_to_dev(a, 8).cpages == 8
    assert trace.read_counters(dm) == {"calloc": 8, "cfree": 0}
    drv = uvm.UvmDriver(system, proc, device_bytes=2 << 20)
    assert drv.jobs.reduce_sum(b, 8 * 4096).faults == 8
    out = trace.collect_counters(system)
    assert out["DMirrorDevice#%d" % dm.id] == {"calloc": 8, "cfree": 0}
    gpu = out[trace.source_name(drv)]
    assert gpu["num_read_faults"] >= 8 and gpu["num_pages_in"] == 8
    assert trace.read_counters(drv.device(0).hw)["num_read_faults"] == gpu["num_read_faults"]
    assert gpu["modelled_s"] == drv.modelled_time > 0          # seconds: not cut to an int
    drv.close()
    m.close()
    proc.exit()
