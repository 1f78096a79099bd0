"""hmmgpu bench: the framework and every suite in quick mode, in-process, NumPy backend.

No timing thresholds: only the shape of the results and their honesty (labels, baselines,
unavailable suites) is checked.
"""
import json

import pytest

from hmmgpu import cli


@pytest.fixture(scope="module")
def b():
    return cli._import_bench()


@pytest.fixture(scope="module")
def quick_results(b):
    return b.run(quick=True, backend="numpy", repeat=1)


def test_every_suite_runs_or_says_why(b, quick_results):
    res = quick_results
    assert res["suites"] == list(b.SUITE_ORDER)
    seen = {r["suite"] for r in res["rows"]}
    for name in b.SUITE_ORDER:
        assert name in seen or name in res["unavailable"], name
    for why in res["unavailable"].values():
        assert why          # a reason, never an empty string
    assert not any(w.startswith("failed") for w in res["unavailable"].values()), res["unavailable"]


def test_rows_are_labelled_and_have_same_run_baselines(quick_results):
    rows = [r for r in quick_results["rows"] if r["ratio"] is not None]
    assert rows
    for r in rows:
        assert "emulated (numpy fallback)" in r["label"]
        assert r["baseline_name"] and r["baseline"] is not None and r["baseline"] > 0
        assert r["ours"] is not None and r["ours"] > 0
        assert r["ratio"] > 0
        assert r["meets_target"] in (True, False, None)
    assert quick_results["meta"]["backend"] == "numpy"
    assert quick_results["meta"]["label"] == "emulated (numpy fallback)"


def test_scaling_rows_cover_the_sizes(quick_results):
    rows = [r for r in quick_results["rows"] if r["suite"] == "scaling" and r["ratio"] is not None]
    ops = {r["figure"] for r in rows if r["size"].endswith("pages")}
    assert {"fault-in per page", "fork per page", "munmap per page"} <= ops
    for op in ops:
        sizes = [r["size"] for r in rows if r["figure"] == op]
        assert sizes[0] == "2^10 pages" and sizes[-1] == "2^13 pages"
        assert [r for r in rows if r["figure"] == op][-1]["ratio"] == 1.0


def test_cli_bench_json_on_stdout(capsys):
    rc = cli.main(["bench", "fallback", "--quick", "--json", "--repeat", "1", "--backend", "numpy",
                   "--no-progress"])
    assert rc == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["suites"] == ["fallback"] and res["rows"]
    assert "hmmgpu bench" in cap.err          # the table goes to stderr
    assert "emulated (numpy fallback)" in cap.err


def test_unavailable_suite_is_reported_not_faked(b, monkeypatch):
    class Missing:
        NAME = "jobs"
        DESCRIPTION = "x"

        @staticmethod
        def run(ctx):
            raise b.Unavailable("the job engine is not there yet")
    monkeypatch.setitem(b.SUITES, "jobs", Missing)
    res = b.run(["jobs"], quick=True, backend="numpy", repeat=1)
    assert res["rows"] == []
    assert res["unavailable"] == {"jobs": "the job engine is not there yet"}


def test_unknown_suite_is_an_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "nosuchsuite", "--backend", "numpy"])
    assert "unknown suite" in str(e.value.code)


def test_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("migration", "jobs", "faults", "prefetch", "scaling", "fallback"):
        assert name in out


def test_plot_without_matplotlib_says_so(b, monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = {"rows": [{"ratio": 1.0}], "meta": {}}
    msg = b.plot(res, str(tmp_path / "p.png"))
    assert "matplotlib" in msg and "pip install" in msg
    assert not (tmp_path / "p.png").exists()


def test_trace_of_a_bench_run(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "jobs", "--quick", "--repeat", "1", "--backend", "numpy", "--no-progress",
                     "--trace", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert any(e.get("cat") == "job" for e in doc["traceEvents"])


def test_a_baseline_that_cannot_run_leaves_no_ratio(b):
    ctx = b.Ctx("numpy", quick=True, repeat=1)
    ctx.suite = "x"
    ours = ctx.time(lambda: None)
    base = ctx.baseline(lambda: (_ for _ in ()).throw(RuntimeError("no managed memory here")))
    r = ctx.figure("fig", nbytes=4096, ours=ours, base=base, baseline_name="managed", target=">= 1.0")
    assert r["ratio"] is None and r["baseline"] is None and r["meets_target"] is None
    assert "unavailable" in r["baseline_name"] and "no managed memory here" in r["baseline_name"]
    ok = ctx.figure("fig2", nbytes=4096, ours=ours, base=ours, baseline_name="itself", target=">= 1.0")
    assert ok["ratio"] == 1.0 and ok["meets_target"] is True


def test_plot_with_matplotlib(b, quick_results, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    msg = b.plot(quick_results, str(path))
    assert str(path) in msg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
