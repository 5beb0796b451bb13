"""Train a flavor's full width with fewer layers, to measure long sequences within a time budget.

    python scripts/train_reduced_depth.py LAYERS [run_train.sh arguments, e.g. --model.flavor 1B ...]

Registers `<flavor>-<LAYERS>L` for every flavor (same dims, heads, vocabulary; LAYERS blocks) and
runs the trainer on one process with `--model.flavor <flavor>-<LAYERS>L`. The memory estimate
scales with the layer count exactly as the model does, so a reduced-depth peak checks the same
formulas as the full model's (docs/performance.md, "Longest sequences").
"""

import dataclasses
import sys

from titan_cp import train
from titan_cp.models.llama3 import llama3_flavors


def register(layers: int) -> None:
    for name, args in list(llama3_flavors.items()):
        llama3_flavors[f"{name}-{layers}L"] = dataclasses.replace(args, n_layers=layers)


if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: train_reduced_depth.py LAYERS [trainer arguments]; LAYERS is a positive integer")
    register(int(sys.argv[1]))
    train.main(sys.argv[2:])
