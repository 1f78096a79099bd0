"""The package as a user gets it: no import cycles, and a wheel that runs ``hmmgpu bench``.

* Every module's imports (function-level ones included) form an acyclic graph, and a fresh
  interpreter imports every module in that graph's dependency order.
* The source checkout, an editable install and a built wheel import the same bench code: the
  repository's bench/ folder, shipped as ``hmmgpu.bench``.
* A wheel built from a copy of the checkout, installed into a new virtual environment (with the
  system's site-packages for NumPy and rich, so nothing but the build backend is downloaded),
  runs ``hmmgpu bench --quick`` from outside the checkout (one repeat: this checks that it
  runs, not what it measures).
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "hmmgpu")


def _modules():
    """{module name: path} of every module of the package, hmmgpu.bench (a link to bench/) too."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(PKG, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, ROOT).split(os.sep)
        for f in filenames:
            if f.endswith(".py"):
                parts = rel + ([] if f == "__init__.py" else [f[:-3]])
                out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def _imports(name, path, modules):
    """The package modules ``name`` imports, at any depth of its code."""
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # ``from pkg import submodule`` needs the submodule, not the package's __init__ done
            # (Python binds a submodule of a partly initialised package); a name needs ``mod``
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.JoinedStr)):
            # importlib.import_module(f".suites.{name}", __package__): every module of that package
            prefix = "".join(v.value for v in node.args[0].values if isinstance(v, ast.Constant))
            if prefix.startswith("."):
                prefix = pkg + prefix
            targets = [m for m in modules if m.startswith(prefix) and m != prefix.rstrip(".")]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _topological(graph):
    """Modules in dependency order (a module after everything it imports); raises on a cycle."""
    order, state = [], {}

    def visit(m, stack):
        if state.get(m) == "done":
            return
        if state.get(m) == "visiting":
            cycle = stack[stack.index(m):]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        state[m] = "visiting"
        for d in sorted(graph[m]):
            visit(d, stack + [d])
        state[m] = "done"
        order.append(m)
    for m in sorted(graph):
        visit(m, [m])
    return order


def test_no_import_cycles_and_each_module_imports_in_dependency_order():
    graph = _graph()
    assert "hmmgpu.bench.framework" in graph and "hmmgpu.cli.bench" in graph
    order = _topological(graph)
    # the two cycles there were: the command line and the bench framework, the backend switch
    # and the two backends
    assert "hmmgpu.cli.bench" not in graph["hmmgpu.bench.framework"]
    assert "hmmgpu.device.backend" not in graph["hmmgpu.fallback.backend"]
    try:
        import cupy  # noqa: F401
        skip = ()
    except Exception:
        skip = ("hmmgpu.kernels.",)            # the CuPy backend needs CuPy to import
    order = [m for m in order if not m.startswith(skip) and not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n")
    r = subprocess.run([sys.executable, "-c", code] + order, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_cycle_is_found():
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        _topological({"a": {"b"}, "b": {"a"}})


def test_the_checkout_imports_bench_from_its_bench_folder():
    import hmmgpu.bench.framework
    assert os.path.realpath(hmmgpu.bench.framework.__file__) == os.path.join(ROOT, "bench", "framework.py")


def _copy_checkout(dst):
    shutil.copytree(ROOT, dst, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".whl", ".out"))


def _run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_in_a_fresh_venv_runs_bench_and_an_editable_install_runs_the_same_code(tmp_path):
    src = tmp_path / "src"
    _copy_checkout(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)])
    wheels = list((tmp_path / "dist").glob("hmmgpu-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    # the system's site-packages give NumPy and rich (and pip); nothing else is installed
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheels[0])])
    shutil.rmtree(src / "hmmgpu")              # nothing may come from the copy of the checkout
    env = dict(os.environ, HMMGPU_BACKEND="numpy")
    env.pop("PYTHONPATH", None)
    where = _run([py, "-c", "import hmmgpu.bench.framework as f; print(f.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv))
    bench = _run([str(venv / "bin" / "hmmgpu"), "bench", "--quick", "--repeat", "1", "--json", "--no-progress"],
                 cwd=tmp_path, env=env)
    res = json.loads(bench.stdout)
    assert not res["unavailable"], res["unavailable"]
    assert {r["suite"] for r in res["rows"]} == set(res["suites"]) - set(res["skipped"])
    assert "hmmgpu bench" in bench.stderr            # the table, on stderr beside --json
    # an editable install of the checkout runs the bench/ folder itself
    _copy_checkout(tmp_path / "src2")
    _run([py, "-m", "pip", "install", "--no-deps", "-q", "-e", str(tmp_path / "src2")])
    where = _run([py, "-c", "import hmmgpu.bench.framework as f; print(f.__file__)"], cwd=tmp_path, env=env)
    assert os.path.realpath(where.stdout.strip()) == str(tmp_path / "src2" / "bench" / "framework.py")
