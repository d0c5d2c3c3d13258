"""A ResNet-style teacher and a MobileNetV2-style student for 32x32 images, each cut into blocks
with matching boundaries (the split Pipe-BD and DNA use: one block per resolution).

Boundaries for ``width=w`` and the default four blocks: input ``[3, 32, 32]`` -> ``[w, 32, 32]``
-> ``[2w, 16, 16]`` -> ``[4w, 8, 8]`` -> ``[classes]``. With ``blocks > 4`` the earlier
resolutions are cut into more blocks first (six blocks: two at 32x32, two at 16x16, one each at
8x8 and 4x4, as DNA cuts its models into six cells); every block holds ``depth`` residual blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..checks import check_int


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


def stage_layout(blocks: int) -> list[int]:
    """The resolution stage (0-3) of each of ``blocks`` blocks: four stages, earlier ones cut
    into more blocks first (``6 -> [0, 0, 1, 1, 2, 3]``)."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 4:
        raise ValueError(f"blocks must be an integer >= 4 (one per resolution at least), got {blocks!r}")
    return [s for s in range(4) for _ in range(blocks // 4 + (s < blocks % 4))]


def _cut(layout: list[int], width: int, classes: int, depth: int, stem: Callable[[], list[nn.Module]],
         stem_channels: int, unit: Callable[[int, int, int], nn.Module]) -> list[nn.Module]:
    """One ``nn.Sequential`` per block of ``layout``, each of ``depth`` ``unit(c_in, c_out,
    stride)``; stage ``s`` has ``width << s`` channels, and its first unit halves the resolution
    (stage 0: takes the stem's ``stem_channels``). The first block starts with the stem, the last
    ends with the head. Modules are created in order, so a seed gives the same weights whatever
    the layout shares with another."""
    out = []
    for j, s in enumerate(layout):
        c = width << s
        if j == 0:
            layers, c_in, stride = stem(), stem_channels, 1
        elif layout[j - 1] != s:
            layers, c_in, stride = [], c // 2, 2
        else:
            layers, c_in, stride = [], c, 1
        layers += [unit(c_in if d == 0 else c, c, stride if d == 0 else 1) for d in range(depth)]
        if j == len(layout) - 1:
            layers.append(Head(c, classes))
        out.append(nn.Sequential(*layers))
    return out


def resnet_teacher(width: int = 32, classes: int = 10, depth: int = 3,
                   zero_init_residual: bool = False, blocks: int = 4) -> list[nn.Module]:
    """``blocks`` blocks of ``depth`` basic blocks each; the first has the stem, the last the head."""
    return _cut(stage_layout(blocks), width, classes, depth,
                lambda: [*_conv_bn(3, width), nn.ReLU(inplace=True)], width,
                lambda c_in, c_out, stride: BasicBlock(c_in, c_out, stride, zero_init_residual))


def mobilenet_student(width: int = 32, classes: int = 10, expand: int = 2, depth: int = 1,
                      blocks: int = 4) -> list[nn.Module]:
    """``blocks`` blocks of ``depth`` inverted residuals each, with the teacher's boundary shapes."""
    return _cut(stage_layout(blocks), width, classes, depth,
                lambda: [*_conv_bn(3, width // 2), nn.ReLU6(inplace=True)], width // 2,
                lambda c_in, c_out, stride: InvertedResidual(c_in, c_out, stride, expand))


def cnn_input_shape(**_: object) -> tuple[int, ...]:
    """Per-sample input shape of ``cnn_pair``: 32x32 RGB images."""
    return (3, 32, 32)


def cnn_pair(width: int = 32, classes: int = 10, depth: int = 3, expand: int = 2, student_depth: int = 1,
             seed: int = 0, blocks: int = 4) -> tuple[list[nn.Module], list[nn.Module]]:
    """The ResNet-style teacher (``depth`` basic blocks per block) and the lighter
    MobileNetV2-style student (``student_depth`` inverted residuals per block, expansion
    ``expand``), each cut into ``blocks`` blocks, initialized from ``seed``."""
    layout = stage_layout(blocks)    # bad input fails before any weights are drawn
    for name, value, low in (("width", width, 2), ("classes", classes, 1), ("depth", depth, 1),
                             ("expand", expand, 1), ("student_depth", student_depth, 1)):
        check_int(name, value, low)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (resnet_teacher(width, classes, depth, blocks=len(layout)),
                mobilenet_student(width, classes, expand, student_depth, blocks=len(layout)))
