"""`make bench`: every benchmark in its own process, their Markdown tables + the machine into BENCHMARKS.md.

Each benchmark measures its references in the same run (plain file copy for the converter, TensorFlow's
own decode + resize for the decoder and the loader), so the ratios are comparable even when the absolute
numbers move with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHES = (
    ("Converter: `lite-convert md` vs a plain copy of the same records", "benchmarks.convert_bench", []),
    ("Decode + resize per image: lite_train vs TensorFlow", "benchmarks.decode_bench", ["--images", "200"]),
    ("Episode loader", "benchmarks.loader_bench", []),
)


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = ap.parse_args(argv)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, module, extra in BENCHES:
            if args.only and module not in args.only:
                continue
            table = Path(tmp) / f"{module}.md"
            command = [sys.executable, "-m", module, *extra, "--out", str(table)]
            print(f"== {title}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)
            shown = " ".join(["python", "-m", module, *extra])
            sections.append(f"## {title}\n\n`{shown}`\n\n{table.read_text()}")
    header = (f"# Benchmarks\n\nWritten by `make bench` (`python -m benchmarks.run`) on "
              f"{datetime.date.today().isoformat()}.\n\nMachine: {_machine()}.\n\n"
              "Every table compares against its reference measured in the same run; absolute numbers move "
              "by 10-20 % between runs on this shared 2-core machine, ratios much less.\n\n")
    Path(args.out).write_text(header + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
