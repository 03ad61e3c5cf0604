"""`make bench`: every benchmark module in its own process, their Markdown tables + the machine into BENCHMARKS.md.

The modules are listed once, in `BENCHES`. Each is run as `python -m <module> [args] --out <table.md>` and
must write its Markdown there. A module that is not in the tree yet gets a "not run: ..." section (so the
gap shows in BENCHMARKS.md); a module that fails or writes no table gets a "FAILED: ..." section, the other
sections are still written, and the run exits 1. `--quick` (`make bench-quick`) runs every module with its
smoke-test arguments (tiny sizes, numbers meaningless) and writes bench-out/BENCHMARKS.quick.md unless `--out`
says otherwise.

Each benchmark measures its references in the same run (plain file copy for the converter, TensorFlow's
own decode + resize for the decoder and the loader), so the ratios are comparable even when the absolute
numbers move with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["Bench", "BENCHES", "emit", "main"]

_REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Bench:
    """One section of BENCHMARKS.md."""

    title: str  # section heading
    module: str  # run as `python -m module ... --out FILE`
    args: tuple[str, ...] = ()  # arguments of the full run (`make bench`)
    quick_args: tuple[str, ...] = ("--quick",)  # arguments of `--quick` (a smoke test of the module's rows)


BENCHES = (
    Bench("Converter: `lite-convert md` vs a plain copy of the same records", "benchmarks.convert_bench",
          quick_args=("--classes", "4", "--per-class", "10", "--size", "20000", "--tiny-samples", "20000")),
    Bench("Decode + resize per image on photographs: lite_train vs TensorFlow", "benchmarks.decode_bench"),
    Bench("Episode loader on photographs", "benchmarks.loader_bench"),
    Bench("Training", "benchmarks.train_bench"),
    Bench("Training speed vs the previous release", "benchmarks.speed_bench"),
    Bench("Threads: default torch threads vs torch's own, with 0/1/2 loader workers", "benchmarks.threads_bench"),
    Bench("Training on a GPU (224 px)", "benchmarks.gpu_bench", args=("--recorded", "benchmarks/gpu_results.md"),
          quick_args=("--quick", "--recorded", "benchmarks/gpu_results.md")),
    Bench("VTAB conversion: `lite-convert vtab` vs a plain read of the same TFDS records",
          "benchmarks.vtab_convert_bench"),
    Bench("VTAB evaluation: `lite-train eval-vtab` query stream vs the decode+resize bound",
          "benchmarks.eval_vtab_bench"),
)


def emit(text: str, out: str | None) -> str:
    """A benchmark module's Markdown: written to `out` (what `run_bench` reads back), else printed."""
    if out:
        Path(out).write_text(text)
    else:
        print(text)
    return text


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    versions = []
    for package in ("torch", "numpy", "simplejpeg", "pillow", "pyarrow", "tensorflow-cpu"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} absent")
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; " + ", ".join(versions))


def run_bench(bench: Bench, quick: bool, tmp: Path) -> tuple[str, bool]:
    """(Markdown section, ok) of one module."""
    args = bench.quick_args if quick else bench.args
    shown = " ".join(["python", "-m", bench.module, *args])
    head = f"## {bench.title}\n\n`{shown}`\n\n"
    if importlib.util.find_spec(bench.module) is None:
        path = bench.module.replace(".", "/") + ".py"
        return head + f"not run: `{path}` is not in this tree.\n", True
    table = tmp / f"{bench.module}.md"
    command = [sys.executable, "-m", bench.module, *args, "--out", str(table)]
    print(f"== {bench.title}: {shown}", flush=True)
    code = subprocess.run(command, cwd=_REPO).returncode
    if code != 0:
        return head + f"FAILED: exited {code} (its output is in the log of this run).\n", False
    if not table.is_file():
        return head + "FAILED: exited 0 but wrote no table.\n", False
    return head + table.read_text(), True


def main(argv: list[str] | None = None, benches: tuple[Bench, ...] = BENCHES) -> int:
    """Runs the benchmarks, writes the report; returns the exit status (1 when a module failed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default: BENCHMARKS.md, or bench-out/BENCHMARKS.quick.md with --quick")
    ap.add_argument("--only", nargs="*", help="module names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs, in seconds")
    args = ap.parse_args(argv)
    out = Path(args.out or (_REPO / "bench-out" / "BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md"))
    unknown = set(args.only or ()) - {b.module for b in benches}
    if unknown:
        ap.error(f"unknown modules {sorted(unknown)}; known: {', '.join(b.module for b in benches)}")
    sections, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for bench in benches:
            if args.only and bench.module not in args.only:
                continue
            section, ok = run_bench(bench, args.quick, Path(tmp))
            sections.append(section)
            if not ok:
                failed.append(bench.module)
    kind = ("a QUICK smoke run (`python -m benchmarks.run --quick`): tiny sizes, the numbers mean nothing"
            if args.quick else "`make bench` (`python -m benchmarks.run`)")
    header = (f"# Benchmarks\n\nWritten by {kind} on {datetime.date.today().isoformat()}.\n\n"
              f"Machine: {_machine()}.\n\n"
              "Every table compares against its reference measured in the same run; absolute numbers move "
              "by 10-20 % between runs on this shared 2-core machine, ratios much less.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(header + "\n".join(sections))
    os.replace(tmp_out, out)
    print(f"wrote {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
