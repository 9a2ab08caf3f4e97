"""Mutation testing of the library's core with mutmut 3: how many deliberately broken copies the tests catch.

    python benchmarks/mutation.py                      # every module below, one after another
    python benchmarks/mutation.py layer module         # some of them
    python benchmarks/mutation.py layer --max-children 2

For each module, a scratch copy of the project is made under mutants/<module>/ (git ignores mutants/), with a
[tool.mutmut] section that mutates only bdh_lightning/<module>.py and runs only that module's fast tests (no
subprocess runs: they would take hours). mutmut changes one operator, constant or call at a time ("mutants"),
runs the tests that reach the changed function, and records whether some test failed (killed) or all passed
(survived). The score per module is killed / (mutants - equivalent ones), where EQUIVALENT lists the mutants
that compute the same thing as the original (no test can kill them; docs/testing.md says why for each).
Survivors' diffs are written to mutants/<module>/survivors.txt. Needs `pip install mutmut==3.8.1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each module's fast tests: in-process only, seconds each. A test file per module, plus the suites that check
# the module's math against the spec oracle.
TESTS = {
    "layer": ["tests/test_layer.py", "tests/test_model.py"],
    "model": ["tests/test_model.py", "tests/test_layer.py"],
    "module": ["tests/test_module.py", "tests/test_streams.py"],  # test_streams: carried state, linear decay, AGC
    "checkpoints": ["tests/test_checkpoints.py"],
    "kernels": ["tests/test_kernels.py", "tests/test_layer.py"],
    "data": ["tests/test_data.py"],
}
# pytest -k expressions leaving out the slow end-to-end tests of a module's files (subprocess runs).
DESELECT = {
    "data": "not subprocess and not cli and not fit",
}

# Functions left unmutated, with why: BDHLitModule.__init__ calls save_hyperparameters(), which reads the
# arguments from its caller's frame; under mutmut's trampoline that frame is the trampoline's, and every test
# would fail on the unmutated code. What it builds is checked by test_module.py and mutated in model.py.
NOT_MUTATED = {"module": ["BDHLitModule.__init__"]}

# Mutants that cannot change what the code computes or reports, by name, with the reason (docs/testing.md).
EQUIVALENT: dict[str, str] = {}


def write_config(work: Path, module: str) -> None:
    selection = [*TESTS[module], "-x", "-q", "-p", "no:cacheprovider"]
    if module in DESELECT:
        selection += ["-k", DESELECT[module]]
    text = (REPO / "pyproject.toml").read_text()
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["bdh_lightning"]\n'
        f'only_mutate = ["bdh_lightning/{module}.py"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}\n"
        "timeout_multiplier = 5.0\n"
    )
    (work / "pyproject.toml").write_text(text)


def prepare(module: str) -> Path:
    work = REPO / "mutants" / module
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "bdh_lightning", work / "bdh_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    write_config(work, module)
    for qualified in NOT_MUTATED.get(module, []):
        skip_function(work / "bdh_lightning" / f"{module}.py", qualified.rsplit(".", 1)[-1])
    return work


def skip_function(path: Path, name: str) -> None:
    """Mark `def name(...)` with mutmut's `# pragma: no mutate block` (on the line ending its signature)."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"def {name}("))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":") and not lines[i].lstrip().startswith("#"))
    lines[end] = lines[end].rstrip("\n") + "  # pragma: no mutate block\n"
    path.write_text("".join(lines))


def results(work: Path, module: str) -> dict[str, str]:
    """{mutant name: status} from mutmut's record of the run."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / "bdh_lightning" / f"{module}.py.meta").read_text())
    return {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}


def score(statuses: dict[str, str]) -> dict:
    equivalent = [name for name in statuses if name in EQUIVALENT]
    counted = {name: s for name, s in statuses.items() if name not in EQUIVALENT}
    killed = sum(s in ("killed", "timeout", "segfault") for s in counted.values())
    survived = sorted(name for name, s in counted.items() if s not in ("killed", "timeout", "segfault"))
    return {
        "mutants": len(statuses),
        "equivalent": len(equivalent),
        "killed": killed,
        "survived": survived,
        "score": killed / len(counted) if counted else 1.0,
    }


SHOW = """
import json, sys
from pathlib import Path
from mutmut.mutation.diff_apply import get_diff_for_mutant
names, source, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.write_text("".join(f"# {name}\\n{get_diff_for_mutant(name, path=source)}\\n\\n" for name in names))
"""


def write_survivors(work: Path, module: str, names: list[str], env: dict) -> None:
    """The diff of every surviving mutant, in one process (`mutmut show` per mutant costs an interpreter each)."""
    subprocess.run([sys.executable, "-c", SHOW, json.dumps(names), f"bdh_lightning/{module}.py", str(work / "survivors.txt")],
                   cwd=work, env=env, check=True)  # fmt: skip


def run_module(module: str, max_children: int) -> dict:
    work = prepare(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    start = time.monotonic()
    log = (work / "mutmut.log").open("w")
    code = subprocess.call([*mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if code != 0:
        print(f"{module}: mutmut exited {code}; see {work / 'mutmut.log'}", file=sys.stderr)
    summary = {"module": module, "seconds": round(seconds), **score(results(work, module))}
    write_survivors(work, module, summary["survived"], env)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def report(module: str) -> dict:
    """The score of an earlier run from its records (`--report`), survivors' diffs rewritten."""
    work = REPO / "mutants" / module
    summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").exists() else {"seconds": 0}
    summary = {"module": module, "seconds": summary["seconds"], **score(results(work, module))}
    write_survivors(work, module, summary["survived"], {**os.environ})
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS), choices=list(TESTS))
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (1 on a shared 2-core machine)")
    parser.add_argument("--report", action="store_true", help="only print the scores of the last run (after EQUIVALENT edits)")
    args = parser.parse_args()
    rows = [report(m) if args.report else run_module(m, args.max_children) for m in args.modules]
    print(f"{'module':<12} {'mutants':>7} {'equiv.':>6} {'killed':>6} {'survived':>8} {'score':>6} {'time':>7}")
    for r in rows:
        print(f"{r['module']:<12} {r['mutants']:>7} {r['equivalent']:>6} {r['killed']:>6} {len(r['survived']):>8} "
              f"{r['score']:>6.1%} {r['seconds'] / 60:>6.1f}m")  # fmt: skip


if __name__ == "__main__":
    main()
