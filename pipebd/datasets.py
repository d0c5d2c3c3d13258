"""Small labelled classification tasks that need no download, for codistillation runs (the CLI's
``pipebd codistill`` and ``bench/codistill.py``).

- ``synthetic``: Gaussian features whose labels are *sampled* from a fixed random two-layer
  network's softmax, so even the best model errs on some rows and a model that sees too little
  data stays short of it (room for distillation to help).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; the optional
  ``data`` extra), pixels scaled to [0, 1].

``split`` cuts either into a training ``TensorDataset`` and held-out ``(inputs, labels)``, the
form ``Codistillation.fit(eval_data=...)`` takes. Every function is a function of its seed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .checks import check_int
from .rng import check_seed

KINDS = ("synthetic", "digits")


def synthetic(rows: int, features: int = 32, classes: int = 10, seed: int = 7) -> tuple[Tensor, Tensor]:
    """``rows`` standard-normal inputs [rows, features] and int64 labels [rows] drawn from
    ``softmax(tanh(2 x W1) W2)`` of a random 256-wide network (with 32 features and 10 classes,
    its argmax is the drawn label on about 87% of the rows)."""
    rows, features, classes = (check_int(f"synthetic data: {name}", value, low) for name, value, low in
                               (("rows", rows, 1), ("features", features, 1), ("classes", classes, 2)))
    gen = torch.Generator().manual_seed(check_seed(seed))
    x = torch.randn(rows, features, generator=gen)
    w1 = torch.randn(features, 256, generator=gen) / features**0.5
    w2 = torch.randn(256, classes, generator=gen) * 10 / 256**0.5
    logits = torch.tanh(x @ w1 * 2) @ w2
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
    return x, y


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: inputs [1797, 64] in [0, 1] and labels [1797] (int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('the digits data needs scikit-learn: pip install -e ".[data]"') from None
    bunch = load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32) / 16.0, torch.tensor(bunch.target, dtype=torch.long)


def split(x: Tensor, y: Tensor, test_rows: int, seed: int = 1234) -> tuple[TensorDataset, tuple[Tensor, Tensor]]:
    """A seeded random ``test_rows`` of the rows held out: ``(TensorDataset(train), (x_test, y_test))``."""
    test_rows = check_int("test rows", test_rows, 1)
    if not test_rows < len(x):
        raise ValueError(f"test rows must be between 1 and {len(x) - 1} (the data has {len(x)} rows), "
                         f"got {test_rows}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_rows], perm[test_rows:]
    return TensorDataset(x[train], y[train]), (x[test], y[test])
