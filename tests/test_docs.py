"""The guides' examples run as written: docs/drivers.md (a complete driver) and docs/jobs.md (a job
with a NumPy lane and a CUDA lane), on each backend."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_guide(name, ns=None):
    """Run every python block of docs/<name> in one namespace (later blocks use earlier ones);
    ``GUIDE`` is the file's path (jobs.md reads its CUDA lane from its own C block)."""
    ns = {"__name__": "__guide__"} if ns is None else ns
    ns["GUIDE"] = os.path.join(ROOT, "docs", name)
    for i, code in enumerate(python_blocks(name)):
        exec(compile(code, f"docs/{name} python block {i}", "exec"), ns)
    return ns


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["drivers.md", "jobs.md"])
def test_guide_examples_run(name, backend, monkeypatch):
    """On CuPy, jobs.md's CUDA lane runs (tests/test_device_cuda_cpu.py runs this on the CPU)."""
    monkeypatch.setenv("HMMGPU_BACKEND", backend)
    assert python_blocks(name)
    ns = run_guide(name)
    assert ns["system"].backend_name == backend


def test_uvm_guide_prints_what_it_says(capsys, monkeypatch):
    """docs/uvm.md's session prints exactly its text block: the modelled time and the counters are
    deterministic (the emulated clock, seeded policies), so the guide's figures are real."""
    monkeypatch.setenv("HMMGPU_BACKEND", "numpy")
    run_guide("uvm.md")
    with open(os.path.join(ROOT, "docs", "uvm.md")) as f:
        want = re.findall(r"```text\n(.*?)```", f.read(), re.S)[0]
    assert capsys.readouterr().out == want
