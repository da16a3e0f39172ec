"""Evaluate a trained model: bits/dim on held-out shards, and sample quality against reference statistics.

    python trainer/evaluate.py runs/quickstart --split val                       # bits/dim (= bpd)
    torchrun --nproc-per-node 8 trainer/evaluate.py bpd runs/cifar10 --split val
    python trainer/evaluate.py stats --data data/cifar10 --split train --features inception --out ref.npz
    python trainer/evaluate.py quality runs/cifar10/samples/step500000_ddim_50_n50000_seed0 --ref ref.npz

``bpd`` (:mod:`trainer.evaluation.bpd`): the full variational bound over all T steps for every image of a
split, the same on any number of ranks, resumable. ``stats``: features of a dataset's images (a feature
network: ``--features``) stored as an ``.npz`` of reference statistics. ``quality``: FID, sFID, Inception
Score, precision/recall and KID of a ``samples.npz`` against such a reference
(:mod:`trainer.evaluation.scoring`).
"""

from __future__ import annotations

import trainer  # noqa: F401  (first: a script run drops trainer/ from sys.path, see trainer/__init__.py)

# isort: split
import sys

COMMANDS = ("bpd", "stats", "quality")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "bpd"
    if command == "bpd":
        from trainer.evaluation import bpd

        return bpd.main(argv)
    from trainer.evaluation import scoring

    return scoring.main(command, argv)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
