"""Composition, automatic policy search and scaling out, measured end to end.

Sections (run all, or pick with `--only`):
- `minilm`: all-MiniLM-L6-v2 through structured pruning + distillation + int8; latency at batch 32 /
  seq 128 against fp32 eager, bytes on disk, UCI probe accuracy.
- `auto-lenet5`: `torchslim auto` on LeNet-5 with `--target size=50 --max-drop 0.2`.
- `ray-scan`: the sensitivity scan with 1 and 2 Ray workers (wall-clock speedup).

Every ratio compares against a baseline measured in the same run (medians); model choices use
the validation split only. Run:
`python bench/end_to_end.py --out runs/bench-end-to-end [--only minilm auto-lenet5 ray-scan]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from distill_lowrank import SECTIONS, run_sections, section  # noqa: E402

# --------------------------------------------------------------------------- minilm

# --------------------------------------------------------------------------- auto-lenet5

# --------------------------------------------------------------------------- ray-scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-end-to-end")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    run_sections(parser.parse_args())


if __name__ == "__main__":
    main()
