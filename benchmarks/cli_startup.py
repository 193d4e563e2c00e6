"""How long the `raygpt` command takes to start, next to Ray's own `ray --help` as the baseline, in the same run:
wall seconds of `raygpt --help`, `raygpt --version` and `raygpt jobs list` against an unreachable job server (the
light commands: no torch, transformers or lm-eval), and `raygpt config schema` (imports the config classes), each the
median of `--rounds` runs alternating with `ray --help`; plus `python -X importtime` of the CLI module.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "raygpt --help": [str(BIN / "raygpt"), "--help"],
        "raygpt --version": [str(BIN / "raygpt"), "--version"],
        "raygpt jobs list (unreachable server)": [str(BIN / "raygpt"), "jobs", "list", "--address", "http://127.0.0.1:1"],
        "raygpt config schema": [str(BIN / "raygpt"), "config", "schema", "train"],
    }
    baseline = [str(BIN / "ray"), "--help"]
    times: dict[str, list[float]] = {name: [] for name in [*commands, "ray --help"]}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            times[name].append(wall(argv))
            times["ray --help"].append(wall(baseline))
    ray_s = statistics.median(times["ray --help"])
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; medians of "
          f"{args.rounds} rounds")
    print(f"{'command':40s} {'wall s':>8s} {'vs ray --help':>14s}")
    for name in [*commands, "ray --help"]:
        median = statistics.median(times[name])
        print(f"{name:40s} {median:8.3f} {median / ray_s:13.2f}×")
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "import cluster.cli"], cwd=REPO,
                           capture_output=True, text=True).stderr
    total = max(int(m) for m in re.findall(r"\|\s+(\d+) \|", trace))
    print(f"python -X importtime: cluster.cli imports in {total / 1e6:.3f} s cumulative")


if __name__ == "__main__":
    main()
