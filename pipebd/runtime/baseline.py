"""The DNA-style baseline that Pipe-BD is measured against (Li et al., "Block-wisely Supervised
Neural Architecture Search with Knowledge Distillation", CVPR 2020).

Blocks are trained one after another, each data parallel over all ranks. For block j every rank
loads its slice of the batch and recomputes teacher blocks 0..j from the raw input, so teacher
block i runs ``N - i`` times per sample over the run and the data is loaded N times. Besides that
redundancy, which is the point of the comparison, the loop is as lean as the relay: one flat
gradient allreduce per step and no other synchronization.
"""

from __future__ import annotations

from .redistribute import slices
from .worker import RankRuntime


def run_baseline(rt: RankRuntime) -> None:
    job = rt.job
    lo, hi = slices(job.batch_size, job.plan.replicas[0])[rt.replica]
    # A resumed block continues where it stopped. One feed for the whole run: loader workers
    # keep loading across the block boundaries.
    todo = [(block, t) for block in range(job.num_blocks) for t in range(job.start_of(block), job.steps)]
    feed = rt.feed([t for _, t in todo], lo, hi)
    bar = rt.progress(len(todo), show=rt.rank == 0)
    for (block, t), (x, y) in zip(todo, feed):
        for i in range(block):
            x = rt.teacher_forward(i, x, t)
        target = rt.teacher_forward(block, x, t)
        grads = [rt.train_block(block, x, target, y, t)]
        rt.finish_step([block], grads, t)
        bar.update()
    bar.close()
