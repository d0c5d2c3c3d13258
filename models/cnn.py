"""A ResNet-style teacher and a MobileNetV2-style student for 32x32 images, each cut into four
blocks with matching boundaries (the split Pipe-BD and DNA use: one block per resolution).

Boundaries for ``width=w``: input ``[3, 32, 32]`` -> ``[w, 32, 32]`` -> ``[2w, 16, 16]`` ->
``[4w, 8, 8]`` -> ``[classes]``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): two 3x3 convs with an identity or 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, zero_init_residual: bool = False):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(c_out, c_out, 3))
        if zero_init_residual:
            # Goyal et al.: each residual block starts as the identity.
            nn.init.zeros_(self.body[-1].weight)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al., 2018): 1x1 expand, 3x3 depthwise, 1x1 linear project."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(*_conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=True),
                                  *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                                  *_conv_bn(hidden, c_out, 1))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class Head(nn.Module):
    """Global average pool and a linear classifier."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def resnet_teacher(width: int = 32, classes: int = 10, depth: int = 3,
                   zero_init_residual: bool = False) -> list[nn.Module]:
    """Four blocks of ``depth`` basic blocks each; the first has the stem, the last the head."""
    w = width

    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [BasicBlock(c_in if d == 0 else c_out, c_out, stride if d == 0 else 1, zero_init_residual)
                for d in range(depth)]

    return [
        nn.Sequential(*_conv_bn(3, w), nn.ReLU(inplace=True), *stage(w, w, 1)),
        nn.Sequential(*stage(w, 2 * w, 2)),
        nn.Sequential(*stage(2 * w, 4 * w, 2)),
        nn.Sequential(*stage(4 * w, 8 * w, 2), Head(8 * w, classes)),
    ]


def mobilenet_student(width: int = 32, classes: int = 10, expand: int = 2, depth: int = 1) -> list[nn.Module]:
    """Four blocks of ``depth`` inverted residuals each, with the teacher's boundary shapes."""
    w = width

    def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [InvertedResidual(c_in if d == 0 else c_out, c_out, stride if d == 0 else 1, expand)
                for d in range(depth)]

    return [
        nn.Sequential(*_conv_bn(3, w // 2), nn.ReLU6(inplace=True), *stage(w // 2, w, 1)),
        nn.Sequential(*stage(w, 2 * w, 2)),
        nn.Sequential(*stage(2 * w, 4 * w, 2)),
        nn.Sequential(*stage(4 * w, 8 * w, 2), Head(8 * w, classes)),
    ]


def cnn_input_shape(**_: object) -> tuple[int, ...]:
    """Per-sample input shape of ``cnn_pair``: 32x32 RGB images."""
    return (3, 32, 32)


def cnn_pair(width: int = 32, classes: int = 10, depth: int = 3, expand: int = 2, student_depth: int = 1,
             seed: int = 0) -> tuple[list[nn.Module], list[nn.Module]]:
    """The ResNet-style teacher (``depth`` basic blocks per block) and the lighter
    MobileNetV2-style student (``student_depth`` inverted residuals per block, expansion
    ``expand``), initialized from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (resnet_teacher(width, classes, depth),
                mobilenet_student(width, classes, expand, student_depth))
