"""Run under torchrun by test_torchrun.py: every rank calls Codistillation.fit (SPMD) and saves
the trained models. Ranks other than 0 perturb their initial weights on purpose: fit must start
every rank from rank 0's models. Optional ``argv[3:6]``: a checkpoint directory, the steps, and
"resume" or "new". Each rank writes its models to ``OUT.RANK`` and the report's ``start`` (the
step a resumed run continued after) to ``OUT.RANK.start``."""

import os
import sys

import torch

import pipebd
from test_codistill import BATCH, K, STEPS, dataset, initial_models, sgd

if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    models = initial_models(2)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(rank)
    cd = pipebd.Codistillation(models, optimizer=sgd, alpha=0.7, temperature=2.0, burn_in=10, exchange_every=K,
                               mode=mode, backend="torch", device="cpu")
    checkpoints = {}
    if len(sys.argv) > 3:
        checkpoints = dict(checkpoint_dir=sys.argv[3], steps=int(sys.argv[4]), resume=sys.argv[5] == "resume")
    report = cd.fit(dataset(), batch_size=BATCH, world_size=world, seed=3, timeout=60,
                    **{"steps": STEPS, **checkpoints})
    torch.save([[p.detach() for p in m.parameters()] for m in cd.models], f"{out}.{rank}")
    with open(f"{out}.{rank}.start", "w") as f:      # the step the run resumed after (0: fresh)
        f.write(str(report.start))
