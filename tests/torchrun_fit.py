"""Run under torchrun by test_torchrun.py: every rank calls fit (SPMD) and saves what it got.

Each rank builds its models from a different seed on purpose: fit must start all ranks from
rank 0's weights, as DDP does. ``argv[2]`` is "auto" or a plan in ``Plan.parse`` form; optional
``argv[3:6]``: a checkpoint directory, the steps, and "resume" or "new". ``NUM_WORKERS`` in the
environment: loader processes per loading rank; ``LR``: the learning rate.
"""

import os
import sys

import torch

import pipebd
from pipebd.models import mlp_pair

if __name__ == "__main__":
    out, plan = sys.argv[1], sys.argv[2] if sys.argv[2] == "auto" else pipebd.Plan.parse(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    teacher, student = mlp_pair(num_blocks=5, seed=rank)
    lr = float(os.environ["LR"])
    distiller = pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
                                 device="cpu")
    data = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    def modes():
        return [(m.training, [p.requires_grad for p in m.parameters(recurse=False)])
                for block in teacher + student for m in block.modules()]

    given = modes()
    checkpoints = {}
    if len(sys.argv) > 3:
        checkpoints = dict(checkpoint_dir=sys.argv[3], steps=int(sys.argv[4]), resume=sys.argv[5] == "resume")
    report = distiller.fit(data, batch_size=7, world_size=world, plan=plan, seed=3, timeout=60,
                           num_workers=int(os.environ.get("NUM_WORKERS", "0")), **{"steps": 20, **checkpoints})
    torch.save({"weights": [p.detach() for p in distiller.student_model().parameters()],
                "teacher_block_runs": report.teacher_block_runs, "plan": report.plan.describe(),
                "modes_kept": modes() == given},
               f"{out}.{rank}")
