"""Start-up time of the `torchslim` command: `--help` and `CMD --help` against `import torch`.

Help and argument errors must not import torch (target: <= 0.3 s on an idle machine). Each
command is run as a fresh process, interleaved with the others, `--rounds` times; medians and the
min-max are printed.

    python bench/cli_startup.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "torchslim --help": [shutil.which("torchslim") or "torchslim", "--help"],
    "torchslim quantize --help": [shutil.which("torchslim") or "torchslim", "quantize", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:40s} median {statistics.median(values):.3f} s  "
              f"(min {min(values):.3f}, max {max(values):.3f}, {len(values)} runs)")


if __name__ == "__main__":
    main()
