"""Seeded weights for the improved-diffusion reference cases, redrawn identically by the generator script
(which runs improved-diffusion's code) and by the tests (which never import it): only the parameter names
and shapes are committed, not megabytes of random numbers.

Every tensor is redrawn (a fresh model's output convolutions are zero, which would hide mapping errors):
parameter i of the state dict, in its order, is ``randn(shape)`` from ``Generator().manual_seed(seed·10⁵ + i)``,
scaled 1/√fan_in for weights of two or more dimensions, 1 + 0.1·randn for normalisation scales and 0.1·randn
for the other 1-D tensors (biases), which keeps activations of order one through the network.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch


def redraw(shapes: list[tuple[str, list[int]]], seed: int) -> OrderedDict[str, torch.Tensor]:
    """The reference case's weights: ``[(name, shape), ...]`` in state-dict order → name → float32 tensor."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (name, shape) in enumerate(shapes):
        gen = torch.Generator().manual_seed(seed * 100_000 + i)
        draw = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        if len(shape) >= 2:
            value = draw / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".weight"):
            value = 1.0 + 0.1 * draw
        else:
            value = 0.1 * draw
        out[name] = value
    return out
