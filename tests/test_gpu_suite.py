"""benchmarks/gpu_suite.py keeps working without a GPU: --smoke runs every code path on the CPU, and the
budget stops it cleanly with what it has."""

import importlib.util
import json
import subprocess
import sys
import time

from conftest import REPO, SUBPROCESS_ENV


def test_smoke_runs_every_path_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stopped"] is None
    assert results["tests"]["exit_code"] == 0  # the CUDA tests, skipped here
    assert any("cuda" in r["test"] for r in results["tests"]["reports"])
    rows = {(r["precision"], r["kernel"], r["mode"]): r for r in results["train"]}
    for precision in ("bf16-mixed", "16-mixed"):
        for kernel in ("reference", "chunked"):
            for mode in ("eager", "compiled"):
                row = rows[(precision, kernel, mode)]
                assert "error" not in row, row
                assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_bytes"] > 0
    assert rows[("bf16-mixed", "chunked", "compiled")]["compile_s"] is not None
    assert [r["context"] for r in results["generation"]] == [10, 20, 40]
    assert all(r["bytes_per_s"] > 0 for r in results["generation"])
    markdown = (out / "results.md").read_text()
    assert "| chunked | compiled |" in markdown and "## Generation" in markdown
    assert markdown in done.stdout


def test_budget_stops_cleanly_with_what_it_has(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    # a stage that outlasts the budget whatever the machine (warm compile caches made the whole smoke run fit 1.5 s)
    monkeypatch.setattr(suite.Suite, "generation", lambda self: time.sleep(600))
    out = tmp_path / "out"
    assert suite.main(["--smoke", "--skip_tests", "--budget", "1.5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stopped"].startswith("budget of 2 s reached during ")
    assert len(results["train"]) < 8  # not everything: it stopped
    assert "Stopped early" in (out / "results.md").read_text()


def test_an_alarm_whose_exception_was_lost_still_stops_the_suite(tmp_path, monkeypatch):
    """The alarm landing in a finalizer (Python prints and drops its exception) or turned into a RuntimeError by a
    library: the suite stops at the next row or stage anyway, instead of running on past its budget."""
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)

    def alarm_lost(self, precision, mode):
        try:
            suite.on_alarm(None, None)
        except BaseException:
            pass

    def ran_past_the_budget(self):
        raise AssertionError("a stage started after the budget was spent")

    monkeypatch.setattr(suite.Suite, "train", alarm_lost)
    monkeypatch.setattr(suite.Suite, "generation", ran_past_the_budget)
    out = tmp_path / "out"
    assert suite.main(["--smoke", "--skip_tests", "--budget", "600", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["stopped"] == "budget of 600 s reached during generation"
    try:
        suite.on_alarm(None, None)
    except BaseException:
        pass
    try:
        raise RuntimeError("a hook's error")
    except RuntimeError as error:
        try:
            suite.reraise_budget(error)
        except suite.BudgetReached as budget:
            assert budget.__cause__ is error
        else:
            raise AssertionError("the budget was not raised again")
