"""Run every benchmark and print one table: `.venv/bin/python -m bench [--quick] [--postgres]`."""

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack

from bench import scenarios
from bench.harness import Bench

BENCHMARKS = {
    "ingest": scenarios.ingest,
    "speed": scenarios.speed_to_lead,
    "throughput": scenarios.throughput,
    "backlog": scenarios.backlog,
}


def machine() -> str:
    """nproc, memory and CPU model, as BENCHMARKS.md records them."""
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    memory = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.split()
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    total = memory[memory.index("Mem:") + 1] if "Mem:" in memory else "?"
    return f"{cores} cores, {total} RAM, {model}, Python {platform.python_version()}"


def table(rows: list[scenarios.Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| benchmark | case | result | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.bench} | {row.case} | {row.result} | {row.target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks; exit 0 when they ran (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run for CI (< 2 min)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    rows: list[scenarios.Row] = []
    started = time.monotonic()
    with ExitStack() as stack:
        bench = Bench(stack, postgres=args.postgres)
        for name, run in BENCHMARKS.items():
            if args.only and name not in args.only:
                continue
            began = time.monotonic()
            load_before = os.getloadavg()[0]
            new = run(bench, args.quick)
            # Other processes on the machine share its cores: the load says how much.
            load_after = os.getloadavg()[0]
            new.append(
                scenarios.Row(
                    name,
                    "machine load (1-min average, before/after)",
                    f"{load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores",
                )
            )
            rows.extend(new)
            # Printed as they come too, so a run cut short still shows what it measured.
            print(table(new), file=sys.stderr, flush=True)
            print(f"bench: {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr)
    store = "PostgreSQL" if args.postgres else "SQLite"
    print(f"machine: {machine()}; store: {store}; quick: {args.quick}")
    print(table(rows))
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
