"""hmmgpu bench: the framework and every suite in quick mode, in-process, NumPy backend.

No timing thresholds: only the shape of the results and their honesty (labels, baselines,
spreads, pass/fail, unavailable and skipped suites) is checked.
"""
import json

import pytest

from hmmgpu import cli
from hmmgpu.bench import framework
from hmmgpu.bench.measure import BestOf, Ctx, Timing, Unavailable, ratio_spread


@pytest.fixture(scope="module")
def quick_results():
    return framework.run(quick=True, backend="numpy", repeat=1)


def test_every_suite_runs_or_says_why(quick_results):
    res = quick_results
    assert res["suites"] == list(framework.SUITE_ORDER)
    seen = {r["suite"] for r in res["rows"]}
    for name in framework.SUITE_ORDER:
        assert name in seen or name in res["unavailable"] or name in res["skipped"], name
    assert not res["unavailable"], res["unavailable"]
    # on the NumPy backend the fallback suite would repeat the migration suite's rows
    assert set(res["skipped"]) == {"fallback"} and "migration" in res["skipped"]["fallback"]


def test_rows_are_labelled_with_same_run_baselines_and_spreads(quick_results):
    rows = [r for r in quick_results["rows"] if r["ratio"] is not None]
    assert rows
    for r in rows:
        assert "emulated (numpy fallback)" in r["label"]
        assert r["baseline_name"] and r["baseline"] is not None and r["baseline"] > 0
        assert r["ours"] is not None and r["ours"] > 0
        lo, med, hi = r["ratio_spread"]
        assert 0 < lo <= med <= hi and med == pytest.approx(r["ratio"])
        assert r["meets_target"] in (True, False, None)
        assert r["result"] == {True: "pass", False: "fail", None: None}[r["meets_target"]]
    assert quick_results["meta"]["backend"] == "numpy"
    assert quick_results["meta"]["label"] == "emulated (numpy fallback)"
    assert quick_results["meta"]["timer"] == "cpu"       # process CPU time: the box is shared


def test_numpy_baselines_are_the_fastest_of_three_and_named(quick_results):
    # (the device suite's 2 MiB-folio rows compare with 4 KiB pages instead: see below)
    rows = [r for r in quick_results["rows"] if r["suite"] in ("migration", "prefetch")
            or r["figure"].startswith("DMA engine: scattered")]
    assert rows
    for r in rows:
        cands = r["baseline_candidates"]
        assert set(cands) == {"fancy indexing", "np.take", "contiguous copy"}
        best = max(cands, key=cands.get)           # GB/s: the fastest is the baseline
        assert r["baseline"] == pytest.approx(cands[best]) and r["baseline_name"].endswith(best)


def test_device_2mib_folio_rows_say_one_copy_one_command_one_entry(quick_results):
    rows = {r["figure"]: r for r in quick_results["rows"] if r["suite"] == "device" and "2 MiB" in r["figure"]}
    assert set(rows) == {"DMA engine: 2 MiB folios host -> device",
                         "device page table: map device folios as 2 MiB leaves",
                         "reduce job via page table, device-resident 2 MiB folios",
                         "gather job via page table, device-resident 2 MiB folios"}
    for r in rows.values():
        assert r["ratio"] > 0 and "4 KiB" in r["baseline_name"] and r["result"] is None
    assert rows["DMA engine: 2 MiB folios host -> device"]["note"] == "4 folios in 4 contiguous copies"
    assert rows["device page table: map device folios as 2 MiB leaves"]["note"].startswith(
        "per folio: 1 command(s), 1 entry with 2 MiB leaves; 1, 512 with 4 KiB leaves")


def test_scaling_compares_the_largest_size_with_smaller_ones(quick_results):
    # the per-size rows (the fault-driven rows and the fixed per-call costs have their own sizes)
    rows = [r for r in quick_results["rows"] if r["suite"] == "scaling" and r["figure"].endswith(" per page")]
    ops = {r["figure"] for r in rows}
    assert ops == {f"{op} per page" for op in ("fault-in", "mprotect", "fork", "writeback", "munmap",
                                               "hmm_range_fault", "migrate")}
    for r in rows:
        assert r["size"] == "2^15 / 2^12 pages" and r["target"] == ">= 0.67"
        # higher is better: the smaller size's cost per page over the largest's
        assert r["ratio"] == pytest.approx(r["baseline"] / r["ours"])


def test_fault_driven_rows(quick_results):
    """Issue 8's rows: a fault-driven reduce against itself at 8 MiB, and the targets given as
    fixed costs (control plane per page, list chase per step, the demo's chase) as ratios."""
    rows = {(r["suite"], r["figure"]): r for r in quick_results["rows"]}
    r = rows[("scaling", "fault-driven reduce per page (remote map)")]
    assert r["size"] == "32 MiB / 8 MiB" and r["target"] == ">= 0.77"
    assert r["ratio"] == pytest.approx(r["baseline"] / r["ours"])
    for key, unit, target in ((("faults", "host control plane per faulting page (remote map)"), "us/page", 0.5),
                              (("jobs", "list chase per step (one lane, warm page table)"), "us/step", 2.0),
                              (("jobs", "demo pointer-chase step (cold: list + 586 tree lookups)"), "ms", 50.0)):
        r = rows[key]
        assert r["ours_unit"] == unit and r["baseline"] == target and r["target"] == ">= 1"
        assert r["ratio"] == pytest.approx(target / r["ours"]) and r["result"] in ("pass", "fail")
    for fig in ("reduce job faulting on host-resident pages (remote map)",
                "memset job faulting on untouched pages (demand-zero)"):
        assert rows[("faults", fig)]["target"] == ">= 0.5"
    assert rows[("jobs", "reduce job via page table, remote system pages")]["baseline_name"].startswith(
        "NumPy gather + sum of the same frames")


def test_cli_bench_json_on_stdout_tables_on_stderr(capsys):
    rc = cli.main(["bench", "migration", "--quick", "--json", "--repeat", "1", "--backend", "numpy",
                   "--no-progress"])
    assert rc == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["suites"] == ["migration"] and res["rows"]
    assert "hmmgpu bench" in cap.err and "emulated (numpy fallback)" in cap.err
    assert "PASS" in cap.err or "FAIL" in cap.err


def test_cli_bench_table_on_stdout(capsys):
    assert cli.main(["bench", "fallback", "--quick", "--repeat", "1", "--backend", "numpy", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "hmmgpu bench" in cap.out and "fallback: skipped" in cap.out and cap.err == ""
    assert "timer: process CPU time" in cap.out
    assert cli.main(["bench", "fallback", "--timer", "wall", "--backend", "numpy", "--no-progress"]) == 0
    assert "timer: wall clock" in capsys.readouterr().out


def test_inner_calls_cover_short_work():
    ctx = Ctx("numpy", quick=True, repeat=2)
    calls = {"ours": 0, "base": 0, "setup": 0}

    def count(k):
        calls[k] += 1
    ctx.warmup = 0
    ctx.compare(lambda: count("ours"), lambda: count("base"), base_setup=lambda: count("setup"),
                ours_inner=3, base_inner=8)
    assert calls == {"ours": 6, "base": 16, "setup": 16}    # a setup before every timed call


def test_unavailable_suite_is_reported_not_faked(monkeypatch):
    class Missing:
        NAME = "jobs"
        DESCRIPTION = "x"

        @staticmethod
        def run(ctx):
            raise Unavailable("the job engine is not there yet")
    monkeypatch.setitem(framework.SUITES, "jobs", Missing)
    res = framework.run(["jobs"], quick=True, backend="numpy", repeat=1)
    assert res["rows"] == []
    assert res["unavailable"] == {"jobs": "the job engine is not there yet"}


def test_a_broken_suite_is_reported_as_failed(monkeypatch, capsys):
    class Broken:
        NAME = "jobs"
        DESCRIPTION = "x"

        @staticmethod
        def run(ctx):
            raise ZeroDivisionError("oops")
    monkeypatch.setitem(framework.SUITES, "jobs", Broken)
    res = framework.run(["jobs"], quick=True, backend="numpy", repeat=1)
    assert res["unavailable"] == {"jobs": "failed: ZeroDivisionError: oops"}
    assert cli.main(["bench", "jobs", "--backend", "numpy", "--no-progress"]) == 1     # not exit 0


def test_a_missing_piece_is_not_a_failure(monkeypatch, capsys):
    class Missing:
        NAME = "jobs"
        DESCRIPTION = "x"

        @staticmethod
        def run(ctx):
            raise Unavailable("no GPU here")
    monkeypatch.setitem(framework.SUITES, "jobs", Missing)
    assert cli.main(["bench", "jobs", "--backend", "numpy", "--no-progress"]) == 0
    assert "jobs: not available: no GPU here" in capsys.readouterr().out


def exit_status(argv):
    """The command's exit status, whether argparse exits or main returns."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    cases = [
        (["bench", "nosuchsuite", "--backend", "numpy"], "unknown suite(s) nosuchsuite"),
        (["bench", "--repeat", "-3"], "--repeat: must be at least 1 (got -3)"),
        (["bench", "--repeat", "0"], "--repeat: must be at least 1 (got 0)"),
        (["bench", "--trace", str(tmp_path / "no" / "t.json")], "does not exist"),
    ]
    for argv, words in cases:
        assert exit_status(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ran = []
    monkeypatch.setattr(framework, "run", lambda *a, **k: ran.append(1))
    assert cli.main(["bench", "--plot", str(tmp_path / "p.png"), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert not ran and not (tmp_path / "p.png").exists()


def test_list_as_text_and_json(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in framework.SUITE_ORDER:
        assert name in out
    assert cli.main(["bench", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == list(framework.SUITE_ORDER)
    assert all(s["description"] and "does not import" not in s["description"] for s in listed)


def test_trace_of_a_bench_run(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "jobs", "--quick", "--repeat", "1", "--backend", "numpy", "--no-progress",
                     "--trace", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert any(e.get("cat") == "job" for e in doc["traceEvents"])


def test_a_baseline_that_cannot_run_leaves_no_ratio():
    ctx = Ctx("numpy", quick=True, repeat=1)
    ctx.suite = "x"
    ours = ctx.time(lambda: None)
    base = ctx.baseline(lambda: (_ for _ in ()).throw(RuntimeError("no managed memory here")))
    r = ctx.figure("fig", nbytes=4096, ours=ours, base=base, baseline_name="managed", target=">= 1.0")
    assert r["ratio"] is None and r["baseline"] is None and r["meets_target"] is None
    assert "unavailable" in r["baseline_name"] and "no managed memory here" in r["baseline_name"]


def test_ratio_is_higher_is_better_and_bands_have_no_upper_end():
    ctx = Ctx("numpy", quick=True, repeat=1)
    ctx.suite = "x"
    slow, fast = Timing([2.0, 2.0, 2.0]), Timing([1.0, 1.0, 1.0])
    r = ctx.figure("faster than its baseline", nbytes=1 << 30, ours=fast, base=slow, baseline_name="b",
                   target=">= 0.8")
    assert r["ratio"] == pytest.approx(2.0) and r["meets_target"] is True      # 2.5x faster never fails
    r = ctx.figure("slower", nbytes=1 << 30, ours=slow, base=fast, baseline_name="b", target=">= 0.8")
    assert r["ratio"] == pytest.approx(0.5) and r["result"] == "fail"
    c = ctx.cost("per page", ours=Timing([4.0]), base=Timing([1.0]), per=4, base_per=1, target=">= 0.67")
    assert c["ours"] == pytest.approx(1e9) and c["ratio"] == pytest.approx(1.0) and c["result"] == "pass"


def test_interleaved_pairs_give_the_spread_of_per_repeat_ratios():
    ctx = Ctx("numpy", quick=True, repeat=3)
    seq = iter([1.0, 2.0, 1.0, 3.0, 1.0, 4.0] * 2)      # ours, base alternately: ratios 2, 3, 4
    ctx._once = lambda fn, setup=None, device_only=False, inner=1: next(seq)
    ctx.warmup = 0
    ours, base = ctx.compare(lambda: None, lambda: None)
    assert ours.partner is base
    assert ratio_spread(ours, base) == (2.0, 3.0, 4.0)
    unpaired = Timing(base.samples)
    assert ratio_spread(ours, unpaired) == (2.0, 3.0, 4.0)   # band: min/max, med/med, max/min
    assert ratio_spread(Timing([1.0, 2.0]), Timing([2.0, 4.0])) == (1.0, 2.0, 4.0)


def test_best_of_picks_the_fastest_candidate_in_the_same_run():
    ctx = Ctx("numpy", quick=True, repeat=2)
    times = {"slow": 3.0, "fast": 1.0, "ours": 2.0}
    ctx._once = lambda fn, setup=None, device_only=False, inner=1: times[fn()]
    ctx.warmup = 0
    ours, base = ctx.compare(lambda: "ours", BestOf([("slow", lambda: "slow"), ("fast", lambda: "fast")]))
    assert base.name == "fast" and base.candidates == {"slow": 3.0, "fast": 1.0}
    ctx.suite = "x"
    r = ctx.figure("f", nbytes=1 << 30, ours=ours, base=base, baseline_name="fastest NumPy way", target=">= 1")
    assert r["baseline_name"] == "fastest NumPy way: fast" and r["ratio"] == pytest.approx(0.5)


def test_plot_with_matplotlib(quick_results, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    msg = framework.plot(quick_results, str(path))
    assert str(path) in msg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_bench_script_writes_the_figures_a_gpu_check_reads(tmp_path, capsys):
    """bench/device_bench.py is a thin entry over the device suite: figures[name] has ratio,
    target (a number) and GBps; without a GPU it asks for --cpu in one line."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(framework.__file__), "device_bench.py")
    spec = importlib.util.spec_from_file_location("device_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "db.json"
    assert mod.main(["--cpu", "--gib", "0.01", "--reps", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["backend"] == "numpy" and len(doc["figures"]) == 2
    for f in doc["figures"].values():
        assert f["ratio"] > 0 and f["target"] == 0.7 and f["GBps"] > 0
    from hmmgpu.device.backend import backend_info
    if backend_info()["backend"] != "cupy":
        assert mod.main(["--gib", "0.01"]) == 2
        assert "--cpu" in capsys.readouterr().err
