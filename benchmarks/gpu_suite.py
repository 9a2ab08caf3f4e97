"""Everything about the GPU path that the CPU cannot show, measured in one process on one GPU.

    python benchmarks/gpu_suite.py [--budget 300] [--out gpu_suite_out]      # on a CUDA machine
    python benchmarks/gpu_suite.py --smoke                                   # every code path, CPU, tiny

In order of importance, so that a run cut short by `--budget` still has the most useful part:
1. the suite's CUDA tests (`pytest -k cuda` over tests/: the chunked kernel on the GPU against the CPU
   reference, autocast, compiled vs eager, fused where it ships);
2. training steps for configs/8gb.yaml, 14gb.yaml and 24gb.yaml at their own batch and block sizes, each
   kernel (reference, chunked, fused if `kernels.resolve_kernel` accepts it): bf16-mixed eager, then
   generation, then bf16-mixed compiled, then 16-mixed eager and compiled. A few warm steps each:
   ms/step, tokens/s, MFU (bdh_lightning/throughput.py's dense peaks), torch.cuda.max_memory_allocated
   against the estimate's predicted peak, max_memory_reserved, and whether the run fits the config's
   VRAM label (8, 14, 24 GB: reserved + the CUDA context within label x 10^9 bytes). A setup whose
   predicted device memory exceeds the GPU is skipped and says so; an out-of-memory is a row, not a stop;
3. generation (the recurrent `Generator`, bf16 autocast) bytes/s at 100, 1,000 and 4,000 bytes of context.

At `--budget` seconds (an alarm) it stops whatever it is doing and keeps what it has. After every
measurement it rewrites OUT/results.json and OUT/results.md; at the end it prints the markdown.
`--smoke` runs every code path on the CPU, for one config at tiny sizes (compiled with the aot_eager
backend: dynamo and AOTAutograd, no C++ compiler) in under two minutes; tests/test_gpu_suite.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_step  # noqa: E402

from bdh_lightning.console import format_bytes  # noqa: E402
from bdh_lightning.errors import ConfigError  # noqa: E402
from bdh_lightning.estimate import estimate_memory  # noqa: E402
from bdh_lightning.kernels import resolve_kernel  # noqa: E402
from bdh_lightning.module import BDHLitModule  # noqa: E402

CONFIGS = {"8gb": 8, "14gb": 14, "24gb": 24}  # name -> the VRAM label in GB
# The CUDA context is outside torch's allocator (estimate.py's CUDA_CONTEXT_BYTES, the top of 300-600 MiB).
CONTEXT_BYTES = 600 * 2**20
SMOKE_MODEL = dict(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1)


class BudgetReached(KeyboardInterrupt):
    """Raised by the alarm at --budget seconds (a KeyboardInterrupt, so that pytest stops too)."""


BUDGET = {"reached": False}


def on_alarm(signum, frame):
    BUDGET["reached"] = True
    raise BudgetReached()


def reraise_budget(error: Exception | None = None) -> None:
    """The alarm can land where its exception is lost: in a finalizer (gc.collect in free_memory; Python prints
    and ignores it) or turned into another error by a library. The flag still says the budget is spent."""
    if BUDGET["reached"]:
        raise BudgetReached() from error


class Suite:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {"environment": environment(self.device, args), "tests": None, "train": [], "generation": [],
                        "stopped": None}  # fmt: skip
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(self.markdown())

    # -- 1. tests ---------------------------------------------------------------------------------
    def run_tests(self) -> None:
        import pytest

        class Outcomes:
            def __init__(self):
                self.reports = []

            def pytest_runtest_logreport(self, report):
                if report.when == "call" or report.outcome != "passed":
                    self.reports.append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                         "error": one_line(str(report.longrepr)) if report.failed else None})  # fmt: skip

        outcomes = Outcomes()
        where = REPO / "tests" / ("test_kernels.py" if self.args.smoke else "")
        selection = ["-k", "cuda and not test_gpu_suite", str(where)]
        start = time.monotonic()
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), *selection], plugins=[outcomes])
        self.results["tests"] = {
            "exit_code": int(code),
            "seconds": time.monotonic() - start,
            "reports": outcomes.reports,
        }
        if code == pytest.ExitCode.INTERRUPTED:
            raise BudgetReached()

    # -- 2. training steps ------------------------------------------------------------------------
    def configs(self):
        """(name, VRAM label, model settings, batch, block) of each config; --smoke: one, at tiny sizes."""
        for name, label in CONFIGS.items():
            model_kwargs, batch, block = train_step.read_config(REPO / "configs" / f"{name}.yaml")
            if self.args.smoke:
                yield f"{name} (smoke: tiny)", label, dict(SMOKE_MODEL), 2, 32
                return
            yield name, label, model_kwargs, batch, block

    def kernels(self) -> list[str]:
        kernels = ["reference", "chunked"]
        try:
            resolve_kernel("fused", self.device)
            kernels.append("fused")
        except ConfigError as error:
            self.note(f"fused not measured: {error}")
        return kernels

    def note(self, text: str) -> None:
        notes = self.results.setdefault("notes", [])
        if text not in notes:
            notes.append(text)
            print(f"note: {text}", flush=True)

    def train(self, precision: str, mode: str) -> None:
        for name, label, model_kwargs, batch, block in self.configs():
            for kernel in self.kernels():
                reraise_budget()
                row = self.train_row(name, label, model_kwargs, batch, block, precision, kernel, mode)
                self.results["train"].append(row)
                self.save()
                print(train_line(row), flush=True)

    def train_row(self, name, label, model_kwargs, batch, block, precision, kernel, mode) -> dict:
        from bdh_lightning.throughput import device_peak_flops

        device = self.device
        row = dict(config=name, label_gb=label, batch=batch, block=block, precision=precision, kernel=kernel, mode=mode)
        memory = estimate_memory({**model_kwargs, "kernel": kernel}, batch, block, precision, device.type)
        predicted = memory.kernels["chunked" if kernel == "fused" else kernel]  # fused keeps chunked's bytes
        row["predicted_peak_bytes"] = predicted.peak_bytes
        row["predicted_device_bytes"] = getattr(predicted, "device_bytes", None) or predicted.peak_bytes
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            if row["predicted_device_bytes"] > total:
                row["skipped"] = (f"predicted {format_bytes(row['predicted_device_bytes'])}, the GPU has "
                                  f"{format_bytes(total)}")  # fmt: skip
                return row
        setup = None
        try:
            idx = torch.randint(0, 256, (batch, block + 1), generator=torch.Generator().manual_seed(0)).to(device)
            free_memory(device)
            setup = train_step.build(model_kwargs, kernel, mode, idx, precision, backend=self.args.backend)
            row["first_step_s"] = train_step.timed(setup.step, device)  # compiles, for `compiled`
            setup.step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = train_step.timed(lambda: [setup.step() for _ in range(self.args.steps)], device) / self.args.steps
            row["ms_per_step"] = seconds * 1e3
            row["tokens_per_s"] = batch * block / seconds
            if mode == "compiled":
                row["compile_s"] = row["first_step_s"] - seconds
            if device.type == "cuda":
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                row["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            else:
                row["peak_bytes"] = train_step.memory_of(setup, idx, None)[1]
                row["reserved_bytes"] = row["peak_bytes"]
            row["fits_label"] = row["reserved_bytes"] + CONTEXT_BYTES <= label * 10**9
            row["peak_vs_predicted"] = row["peak_bytes"] / predicted.peak_bytes
            peak_flops, _ = device_peak_flops(device, precision)
            flops = BDHLitModule(**model_kwargs).training_flops(batch, block)
            row["mfu"] = flops / seconds / peak_flops if peak_flops else None
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = "out of memory: " + one_line(str(error))
        except BudgetReached:
            raise
        except Exception as error:  # one broken path is a row, not the end of the suite
            reraise_budget(error)
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {one_line(str(error))}"
        finally:
            setup = None  # let the model, its gradients and AdamW state go before the next setup
            free_memory(device)
        return row

    # -- 3. generation ----------------------------------------------------------------------------
    def generation(self) -> None:
        from bdh_lightning.generate import Generator
        from bdh_lightning.model import BDH, BDHConfig

        contexts = (10, 20, 40) if self.args.smoke else (100, 1000, 4000)
        steps = 5 if self.args.smoke else 50
        for name, _, model_kwargs, _, _ in self.configs():
            torch.manual_seed(0)
            model = BDH(BDHConfig.from_dict({**model_kwargs, "dropout": 0.0})).to(self.device).eval()
            for context in contexts:
                reraise_budget()
                row = dict(config=name, context=context, steps=steps)
                try:
                    with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16):
                        generator = Generator(model)
                        prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(1))
                        generator.prefill(prompt.to(self.device))
                        byte = torch.tensor([32], device=self.device)
                        generator.step(byte)  # warm-up
                        seconds = train_step.timed(lambda: [generator.step(byte) for _ in range(steps)], self.device)
                    row["bytes_per_s"] = steps / seconds
                except BudgetReached:
                    raise
                except Exception as error:
                    reraise_budget(error)
                    traceback.print_exc()
                    row["error"] = f"{type(error).__name__}: {one_line(str(error))}"
                self.results["generation"].append(row)
                self.save()
                print(f"generation {name} context {context}: " + (f"{row['bytes_per_s']:.1f} bytes/s" if "bytes_per_s" in row
                                                                   else row["error"]), flush=True)  # fmt: skip
            del model
            free_memory(self.device)

    # -- the report -------------------------------------------------------------------------------
    def markdown(self) -> str:
        r = self.results
        env = r["environment"]
        lines = [f"# gpu_suite: {env['device_name']}, torch {env['torch']}, {env['date']}", ""]
        if r["stopped"]:
            lines += [f"**Stopped early: {r['stopped']}** (what follows is what it had)", ""]
        for text in r.get("notes", []):
            lines.append(f"- note: {text}")
        if r["tests"] is not None:
            t = r["tests"]
            counts = {}
            for rep in t["reports"]:
                counts[rep["outcome"]] = counts.get(rep["outcome"], 0) + 1
            lines += ["", f"## CUDA tests: pytest exit code {t['exit_code']}, {t['seconds']:.0f} s, "
                          + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]  # fmt: skip
            lines += [f"- {rep['outcome']}: {rep['test']}" + (f": {rep['error']}" if rep["error"] else "")
                      for rep in t["reports"] if rep["outcome"] != "passed"]  # fmt: skip
        lines += ["", "## Training steps", "",
                  "| config | batch x block | precision | kernel | mode | ms/step | tokens/s | MFU | compile s | "
                  "max allocated | predicted peak | alloc/pred | max reserved | fits label |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for row in r["train"]:
            lines.append(table_row(row))
        lines += [
            "",
            "fits label: max reserved + 600 MiB CUDA context <= the config's label x 10^9 bytes.",
            "",
            "## Generation (recurrent, bf16 autocast)",
            "",
            "| config | context bytes | bytes/s |",
            "|---|---:|---:|",
        ]
        for row in r["generation"]:
            value = f"{row['bytes_per_s']:.1f}" if "bytes_per_s" in row else row.get("error", "-")
            lines.append(f"| {row['config']} | {row['context']} | {value} |")
        return "\n".join(lines) + "\n"


def table_row(row: dict) -> str:
    head = (
        f"| {row['config']} | {row['batch']} x {row['block']} | {row['precision']} | {row['kernel']} | {row['mode']} |"
    )
    if "skipped" in row or "error" in row:
        text = f"skipped: {row['skipped']}" if "skipped" in row else f"error: {row['error']}"
        return head + f" {text} | | | | | {format_bytes(row['predicted_peak_bytes'])} | | | |"
    mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
    compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-"
    return head + (f" {row['ms_per_step']:.1f} | {row['tokens_per_s']:,.0f} | {mfu} | {compile_s} | "
                   f"{format_bytes(row['peak_bytes'])} | {format_bytes(row['predicted_peak_bytes'])} | "
                   f"{row['peak_vs_predicted']:.2f} | {format_bytes(row['reserved_bytes'])} | "
                   f"{'yes' if row['fits_label'] else 'no'} |")  # fmt: skip


def train_line(row: dict) -> str:
    what = f"{row['config']} {row['precision']} {row['kernel']} {row['mode']}"
    if "skipped" in row or "error" in row:
        return f"{what}: " + (f"skipped ({row['skipped']})" if "skipped" in row else f"error ({row['error']})")
    return (f"{what}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
            f"peak {format_bytes(row['peak_bytes'])} (predicted {format_bytes(row['predicted_peak_bytes'])})")  # fmt: skip


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, args) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": str(device), "smoke": args.smoke, "budget_s": args.budget, "backend": args.backend,
           "threads": torch.get_num_threads(), "load_average": os.getloadavg()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, memory_bytes=props.total_memory, sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="Stop after this many seconds with what it has")
    parser.add_argument("--out", default="gpu_suite_out", help="Folder for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="Every code path on the CPU at tiny sizes")
    parser.add_argument("--steps", type=int, help="Timed steps per setup (default 3; smoke 1)")
    parser.add_argument("--backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    parser.add_argument("--skip_tests", action="store_true", help="Leave out the pytest stage")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.smoke else 3)
    args.backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device here; run it on a GPU machine, or --smoke for the CPU check", file=sys.stderr)
        return 2
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the CLI sets it (matmul precision "high")
        torch.set_float32_matmul_precision("high")
    suite = Suite(args)
    stages = [("CUDA tests", suite.run_tests)] if not args.skip_tests else []
    stages += [
        ("bf16-mixed eager", lambda: suite.train("bf16-mixed", "eager")),
        ("generation", suite.generation),
        ("bf16-mixed compiled", lambda: suite.train("bf16-mixed", "compiled")),
        ("16-mixed eager", lambda: suite.train("16-mixed", "eager")),
        ("16-mixed compiled", lambda: suite.train("16-mixed", "compiled")),
    ]
    BUDGET["reached"] = False
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget)
    stage = None
    try:
        for stage, run in stages:
            reraise_budget()
            print(f"== {stage} ({suite.elapsed():.0f} s into the {args.budget:.0f} s budget)", flush=True)
            run()
    except BudgetReached:
        suite.results["stopped"] = f"budget of {args.budget:.0f} s reached during {stage}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    suite.results["seconds"] = suite.elapsed()
    suite.save()
    print(suite.markdown())
    print(f"results: {suite.out / 'results.json'} and {suite.out / 'results.md'} ({suite.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
