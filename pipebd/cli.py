"""Command line: ``pipebd run CONFIG [--set key=value ...]``, ``pipebd profile CONFIG`` and
``pipebd check CONFIG``."""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch.utils.data import TensorDataset

from .api import Distiller
from .config import RunConfig, dump_config, load_config


def build(config: RunConfig) -> tuple[Distiller, TensorDataset]:
    """The Distiller and dataset a config describes."""
    from pipebd.models import PAIRS

    if config.model.pair not in PAIRS:
        raise ValueError(f"model.pair must be one of {sorted(PAIRS)}, got {config.model.pair!r}")
    if config.data.kind != "synthetic":
        raise ValueError(f"data.kind must be 'synthetic', got {config.data.kind!r}")
    if config.data.samples < 1:
        raise ValueError(f"data.samples must be >= 1, got {config.data.samples}")
    pair = PAIRS[config.model.pair]
    teacher, student = pair.build(**config.model.args, seed=config.seed)
    shape = pair.input_shape(**config.model.args)
    gen = torch.Generator().manual_seed(config.data.seed)
    dataset = TensorDataset(torch.randn(config.data.samples, *shape, generator=gen))
    distiller = Distiller(teacher, student, optimizer=config.build_optimizer(), block_loss=config.block_loss,
                          final_loss=config.build_final_loss(), device=config.device)
    return distiller, dataset


def run(config: RunConfig) -> None:
    distiller, dataset = build(config)
    report = distiller.fit(dataset, batch_size=config.batch_size, steps=config.steps,
                           world_size=config.world_size, strategy=config.strategy, plan=config.fit_plan(),
                           seed=config.seed, max_inflight=config.max_inflight,
                           checkpoint_dir=config.checkpoint_dir, checkpoint_every=config.checkpoint_every,
                           resume=config.resume, sync_batchnorm=config.sync_batchnorm,
                           num_workers=config.num_workers)
    print(report)
    if config.trace:
        report.save_trace(config.trace)
        print(f"trace written to {config.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if config.plot:
        report.plot(config.plot)
        print(f"plot written to {config.plot}")


def profile(config: RunConfig) -> None:
    """Print the block profile, the auto plan and the simulator's predictions for the config's
    world size and steps, next to one block range per rank and the baseline."""
    from .plan import default_plan
    from .planner import auto_plan
    from .simulator import simulate, simulate_baseline

    distiller, dataset = build(config)
    prof = distiller.profile(dataset, config.batch_size, config.world_size, sync_batchnorm=config.sync_batchnorm,
                             num_workers=config.num_workers)
    print(prof)
    best = auto_plan(prof, config.world_size)
    print(f"auto: {best}")
    for sim in (simulate(prof, best.plan, config.steps, config.max_inflight),
                simulate(prof, default_plan(distiller.num_blocks, config.world_size), config.steps, config.max_inflight),
                simulate_baseline(prof, config.world_size, config.steps)):
        print(sim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipebd", description="Blockwise distillation with Pipe-BD.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "distill the model pair a config describes and print the report"),
                            ("profile", "measure the blocks' costs and print them with the auto plan and the "
                                        "simulator's predictions"),
                            ("check", "validate a config and print it with every default filled in")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", help="YAML file (default: built-in defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set steps=10 --set plan.replicas=[1,3]")
        if name == "run":
            p.add_argument("--resume", action="store_true",
                           help="continue the run saved in checkpoint_dir (same as --set resume=true)")
    args = parser.parse_args(argv)
    if getattr(args, "resume", False):
        args.overrides.append("resume=true")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "check":
            build(config)
            print(dump_config(config), end="")
        elif args.command == "profile":
            profile(config)
        else:
            run(config)
    except (ValueError, TypeError, NotImplementedError, OSError, ImportError) as err:
        print(f"pipebd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
