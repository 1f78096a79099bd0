"""The guides' examples run as written: docs/drivers.md (a complete driver) and docs/jobs.md."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(name):
    with open(os.path.join(ROOT, "docs", name)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_guide(name, ns=None):
    """Run every python block of docs/<name> in one namespace (later blocks use earlier ones)."""
    ns = {"__name__": "__guide__"} if ns is None else ns
    for i, code in enumerate(python_blocks(name)):
        exec(compile(code, f"docs/{name} python block {i}", "exec"), ns)
    return ns


@pytest.mark.parametrize("name", ["drivers.md"])
def test_guide_examples_run(name):
    assert python_blocks(name)
    run_guide(name)
