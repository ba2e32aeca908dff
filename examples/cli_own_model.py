"""The command line on your own model: train, prune, quantize, evaluate, benchmark.

`--model` takes `FILE.py:FUNCTION` (here `own_model.py:build_model`), `--dataset` a function
returning `{"train", "val", "test"}` DataLoaders. Loading a `.slim` file never imports code, so
an artifact of your own model is rebuilt on the instance `--factory` returns. This script runs
the commands below through the entry point of the `torchslim` executable, writing under
`runs/` in the current folder (each `--out` folder is emptied first, so it can be rerun).
Run it from the repository root: `python examples/cli_own_model.py` (about 20 s), or paste the
commands into a shell.
"""

import shlex
import shutil
from pathlib import Path

from torchslim.cli import main

COMMANDS = r"""
# --8<-- [start:commands]
torchslim train --model examples/own_model.py:build_model --dataset examples/own_model.py:loaders \
    --epochs 3 --optimizer adam --lr 0.01 --out runs/own
torchslim prune --model runs/own/model.slim --factory examples/own_model.py:build_model \
    --dataset examples/own_model.py:loaders --structured --ratio 0.5 --epochs 3 --lr 0.02 \
    --out runs/own-pruned
torchslim quantize --model runs/own-pruned/model.slim --factory examples/own_model.py:build_model \
    --dataset examples/own_model.py:loaders --method static --out runs/own-int8
torchslim evaluate runs/own-int8/model.slim --dataset examples/own_model.py:loaders --json
torchslim bench runs/own-int8/model.slim --json    # an int8 program loads on its own
# --8<-- [end:commands]
"""


def run(commands: str) -> None:
    """Run each `torchslim ...` line through the CLI's entry point (`examples/` found from here)."""
    root = Path(__file__).resolve().parent.parent
    for line in commands.replace("\\\n", " ").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        argv = [arg.replace("examples/", f"{root}/examples/") for arg in shlex.split(line)[1:]]
        if "--out" in argv:
            shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
        print("$", " ".join(line.split()), flush=True)
        if main(argv) != 0:
            raise SystemExit(f"command failed: {line}")


if __name__ == "__main__":
    run(COMMANDS)
