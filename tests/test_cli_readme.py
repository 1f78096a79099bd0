"""The README's API example runs as written (NumPy backend)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_exactly_two_setup_commands():
    with open(README) as f:
        text = f.read()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert [c.strip() for c in cmds] == ["pip install -e . && hmmgpu demo",
                                         "pip install -e '.[test]' && python -m pytest -q"]


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_readme_example_runs(i, monkeypatch, tmp_path):
    monkeypatch.setenv("HMMGPU_BACKEND", "numpy")
    code = _python_blocks()[i].replace("/tmp/hmmgpu-trace.json", str(tmp_path / "t.json"))
    exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    from hmmgpu import trace
    assert trace.current() is None
