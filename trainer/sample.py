"""Sample images from a trained model, on one process or many, resumable after a kill.

    python trainer/sample.py runs/quickstart --num-samples 64 --method ddim --steps 50
    torchrun --nproc-per-node 8 trainer/sample.py runs/cifar10 --num-samples 50000 --method ddpm --steps 250
    deepspeed --num_gpus 8 trainer/sample.py runs/cifar10 --num-samples 50000 --method ddim --steps 50
    python cluster/submit.py --config configs/cifar10_hybrid.yaml --nodes 2 --entry sample \\
        --entry-args "runs/cifar10 --num-samples 50000 --method ddim --steps 50"
    python trainer/sample.py runs/digits_cond --guidance-scale 3 --class-label 7

The samples are cut into parts of fixed content seeded per part, so they do not depend on the number of
ranks; a rerun after a kill redoes only the missing parts. The work is done by
:mod:`trainer.evaluation.sampling`.
"""

from __future__ import annotations

import trainer  # noqa: F401  (first: a script run drops trainer/ from sys.path, see trainer/__init__.py)

# isort: split
import sys

from trainer.evaluation.sampling import main


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
