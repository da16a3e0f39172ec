"""Webdataset streams for training and evaluation.

- :mod:`trainer.data.manifest`: the manifest, shard URLs and per-shard counts.
- :mod:`trainer.data.reading`: tar iteration, decoding, error accounting (inside loader workers).
- :mod:`trainer.data.canonical`: the canonical data order, the same on every world size.
- :mod:`trainer.data.train_stream`: the training stream in that order, exactly resumable on any allowed
  world size.
- :mod:`trainer.data.eval_stream`: one exact pass over a split, every sample once across ranks.

Rank and world size are parameters; nothing here reads RANK/WORLD_SIZE from the environment.
"""

from trainer.data.eval_stream import (
    EvalStream,
    batch_sizes,
    build_eval_stream,
    rank_segments,
    read_ranges,
    split_size,
)
from trainer.data.manifest import DatasetInfo, expand_shard_spec, load_manifest
from trainer.data.reading import DataError, OnError
from trainer.data.train_stream import MicroBatch, PartitionPosition, TrainStream, build_train_stream

__all__ = [
    "DataError",
    "DatasetInfo",
    "EvalStream",
    "OnError",
    "MicroBatch",
    "PartitionPosition",
    "TrainStream",
    "batch_sizes",
    "build_eval_stream",
    "build_train_stream",
    "expand_shard_spec",
    "load_manifest",
    "rank_segments",
    "read_ranges",
    "split_size",
]
