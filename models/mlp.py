"""A toy teacher/student pair of MLP blocks without batch statistics, small enough for
multi-process tests and exact-equivalence checks."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int


def _block(d_in: int, hidden: int, d_out: int, last: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)]
    if not last:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


IN_FEATURES = 16


def mlp_input_shape(in_features: int = IN_FEATURES, **_: object) -> tuple[int, ...]:
    """Per-sample input shape of ``mlp_pair(**same_kwargs)``."""
    return (in_features,)


def mlp_pair(num_blocks: int = 4, in_features: int = IN_FEATURES, width: int = 32, classes: int = 10,
             student_width: int = 12, seed: int = 0) -> tuple[list[nn.Module], list[nn.Module]]:
    """``num_blocks`` teacher blocks ``Linear-Tanh-Linear(-Tanh)`` and narrower student blocks
    with the same boundaries: input ``[in_features]``, then ``[width]``, the last ``[classes]``.
    Initialization is a function of ``seed``."""
    for name, value in (("num_blocks", num_blocks), ("in_features", in_features), ("width", width),
                        ("classes", classes), ("student_width", student_width)):
        check_int(name, value, 1)
    dims = [in_features] + [width] * (num_blocks - 1) + [classes]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = [_block(dims[i], 2 * width, dims[i + 1], i == num_blocks - 1) for i in range(num_blocks)]
        student = [_block(dims[i], student_width, dims[i + 1], i == num_blocks - 1) for i in range(num_blocks)]
    return teacher, student


def mlp_classifier(features: int, hidden: int = 128, classes: int = 10) -> nn.Sequential:
    """``Linear(features, hidden) - ReLU - Linear(hidden, classes)``: a model for codistillation
    (``pipebd codistill``, ``bench/codistill.py``). Initialized from torch's global generator,
    which ``Codistillation.fit`` seeds per model."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
