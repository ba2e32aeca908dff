"""A recipe on your own model: structured pruning, distillation, pruning, weight sharing, coding.

A recipe is a versioned YAML list of stages (every stage and key is listed on the docs'
Recipes page); `torchslim compress RECIPE --out DIR` runs it, checkpointing every stage, and
writes `DIR/model.slim`, `DIR/report.md|json` and plots. This script writes the recipe below to
`runs/own_model.yaml` and runs the commands below (see `cli_own_model.py`), writing under
`runs/` in the current folder. Run it from the repository root:
`python examples/recipe_own_model.py` (about 20 s).
"""

from pathlib import Path

from cli_own_model import run

RECIPE = """
# --8<-- [start:recipe]
version: 1
dataset: examples/own_model.py:loaders         # a built-in name, or FILE.py:FUNCTION
stages:
  - structured_prune: {ratio: 0.3, importance: l2}   # 30% of every channel group, removed
  - fine_tune: {epochs: 2, optimizer: adam, lr: 0.003, distill: {teacher: original, temperature: 4}}
  - prune: {sparsity: 0.5, targets: {exclude: [features.0]}}   # then half of the remaining weights
  - fine_tune: {epochs: 2, optimizer: adam, lr: 0.003}          # pruned weights stay zero
  - cluster: {bits: 5}                                          # 32 shared values per layer
  - fine_tune: {epochs: 1, optimizer: adam, lr: 0.001}          # trains the shared centroids
  - encode: {coder: auto}                                       # sparse index + codebook, entropy coded
# --8<-- [end:recipe]
"""

COMMANDS = r"""
# --8<-- [start:commands]
torchslim train --model examples/own_model.py:build_model --dataset examples/own_model.py:loaders \
    --epochs 3 --optimizer adam --lr 0.01 --out runs/own
torchslim compress runs/own_model.yaml --model runs/own/model.slim \
    --factory examples/own_model.py:build_model --out runs/own-recipe
# --8<-- [end:commands]
"""

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    Path("runs").mkdir(exist_ok=True)
    Path("runs/own_model.yaml").write_text(RECIPE.replace("examples/", f"{root}/examples/"))
    run(COMMANDS)
