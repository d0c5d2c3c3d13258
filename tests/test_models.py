import pytest
import torch
from torch import nn

import pipebd
from pipebd.models import PAIRS, BasicBlock, InvertedResidual, cnn_pair, mlp_pair
from pipebd.models.cnn import stage_layout


@pytest.mark.parametrize("name, kwargs, boundaries", [
    ("mlp", {"num_blocks": 5, "in_features": 8, "width": 20, "classes": 3},
     [(8,), (20,), (20,), (20,), (20,), (3,)]),
    ("cnn", {"width": 8, "depth": 1, "classes": 7},
     [(3, 32, 32), (8, 32, 32), (16, 16, 16), (32, 8, 8), (7,)]),
])
def test_pairs_have_matching_boundaries(name, kwargs, boundaries):
    teacher, student = PAIRS[name].build(**kwargs)
    assert PAIRS[name].input_shape(**kwargs) == boundaries[0]
    assert len(teacher) == len(student) == len(boundaries) - 1 >= 4
    a = torch.randn(2, *boundaries[0])
    for i, (t, s) in enumerate(zip(teacher, student)):
        t.eval()
        out = t(a)
        assert tuple(out.shape[1:]) == boundaries[i + 1]
        assert s(a).shape == out.shape
        a = out


def test_student_is_smaller_than_teacher_and_init_follows_seed():
    teacher, student = cnn_pair()
    count = lambda blocks: sum(p.numel() for b in blocks for p in b.parameters())
    assert count(student) < count(teacher) / 3
    a, b = mlp_pair(seed=1), mlp_pair(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a[1][0].parameters(), b[1][0].parameters()))
    assert not torch.equal(next(mlp_pair(seed=2)[1][0].parameters()), next(a[1][0].parameters()))


def test_cnn_pair_distills_with_soft_targets():
    teacher, student = cnn_pair(width=8, depth=1)
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    distiller = pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
                                 final_loss=pipebd.SoftTargetLoss(temperature=4.0), device="cpu")
    report = distiller.fit(data, batch_size=16, steps=30, world_size=1)
    first, last = [h[0] for h in report.losses], report.final_losses()
    assert all(b < 0.9 * a for a, b in zip(first, last)), (first, last)
    model = distiller.student_model().eval()
    assert model(data[:2]).shape == (2, 10)


def test_stage_layout_cuts_early_resolutions_first():
    assert stage_layout(4) == [0, 1, 2, 3]
    assert stage_layout(6) == [0, 0, 1, 1, 2, 3]
    assert stage_layout(9) == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    for bad in (3, 0, 6.0, True, "6"):
        with pytest.raises(ValueError, match="blocks must be an integer >= 4"):
            cnn_pair(blocks=bad)


@pytest.mark.parametrize("pair, args, message", [
    (cnn_pair, dict(depth=0), "depth must be an integer >= 1, got 0"),
    (cnn_pair, dict(student_depth=0), "student_depth must be"),
    (cnn_pair, dict(width=1), "width must be an integer >= 2"),
    (cnn_pair, dict(expand=2.0), "expand must be an integer"),
    (mlp_pair, dict(num_blocks=0), "num_blocks must be an integer >= 1"),
    (mlp_pair, dict(width=0), "width must be"),
    (mlp_pair, dict(classes=True), "classes must be"),
])
def test_pairs_refuse_sizes_that_build_no_network(pair, args, message):
    with pytest.raises(ValueError, match=message):
        pair(**args)


def test_six_block_cnn_pair():
    teacher, student = cnn_pair(width=8, depth=2, blocks=6, classes=5)
    boundaries = [(3, 32, 32), (8, 32, 32), (8, 32, 32), (16, 16, 16), (16, 16, 16), (32, 8, 8), (5,)]
    a = torch.randn(2, *boundaries[0])
    for i, (t, s) in enumerate(zip(teacher, student)):
        t.eval()
        out = t(a)
        assert tuple(out.shape[1:]) == boundaries[i + 1] and s(a).shape == out.shape
        a = out
    # depth residual blocks in each block; only the first block has the stem, only the last the head
    assert [sum(isinstance(m, BasicBlock) for m in b) for b in teacher] == [2] * 6
    assert [sum(isinstance(m, InvertedResidual) for m in b) for b in student] == [1] * 6
    assert isinstance(teacher[0][0], nn.Conv2d) and not isinstance(teacher[1][0], nn.Conv2d)
    # the same seed draws the same stem in any layout (modules are created in order)
    four, _ = cnn_pair(width=8, depth=2, classes=5)
    assert torch.equal(four[0][0].weight, teacher[0][0].weight)
