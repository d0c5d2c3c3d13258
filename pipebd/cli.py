"""Command line: ``pipebd run CONFIG [--set key=value ...]``, ``pipebd profile CONFIG``,
``pipebd check CONFIG`` and ``pipebd codistill CONFIG [--check]``.

Only the standard library is imported before the arguments are parsed: ``--help`` and
``--version`` answer without loading torch (seconds), and a Ctrl-C while it loads ends with one
line, as at any later moment. The commands themselves are in ``pipebd.commands``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__, interrupts

COMMANDS = (("run", "distill the model pair a config describes and print the report"),
            ("profile", "measure the blocks' costs and print them with the auto plan and the simulator's predictions"),
            ("check", "validate a run config and print it with every default filled in "
                      "(a codistill config: pipebd codistill CONFIG --check)"),
            ("codistill", "train n classifiers on a labelled task, each distilling from the others "
                          "(codistillation or online distillation), and print the report"))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipebd", description="Blockwise distillation with Pipe-BD.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS:
        shows = "pipebd codistill --check" if name == "codistill" else "pipebd check"
        epilog = (f"outputs besides the report: --set trace=PATH writes a Chrome trace (Perfetto), --set "
                  f"plot=PATH draws the timeline{' and accuracy curves' if name == 'codistill' else ''} "
                  f"(PNG or the suffix's format; the plot extra); `{shows}` lists every key"
                  if name in ("run", "codistill") else
                  "profiles are cached under $PIPEBD_CACHE_DIR (else $XDG_CACHE_HOME/pipebd or ~/.cache/pipebd), "
                  "keyed by the models, data, batch, world size and machine: delete the file to measure again"
                  if name == "profile" else None)
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        p.add_argument("config", nargs="?", help=f"YAML file; without one, the built-in defaults, which "
                                                 f"`{shows}` prints (configs/*.yaml set others)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set steps=10 --set "
                            + ("mode=online" if name == "codistill" else "'plan=[0-1]x1 | [2-3]x1'"))
        if name in ("run", "check", "codistill"):
            p.add_argument("--resume", action="store_true",
                           help="continue the run saved in checkpoint_dir (same as --set resume=true)")
        if name == "codistill":
            p.add_argument("--check", action="store_true",
                           help="validate the config and print it with every default filled in; train nothing")
    parser.add_argument("--version", action="version", version=f"pipebd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "resume", False):
        args.overrides.append("resume=true")
    # pipebd's own messages (INFO and up), one line each, through the root logger's handlers
    # where a caller has set some (else each would print twice); other libraries' loggers are
    # left as they are (a root logger at INFO would print torch's, such as its cache stats at exit).
    log, handler = logging.getLogger("pipebd"), None
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        return _command(args)
    except KeyboardInterrupt:   # the ranks are stopped by then (spawn_tasks' finally)
        print("pipebd: interrupted", file=sys.stderr)
        return 130
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(level)


def _command(args: argparse.Namespace) -> int:
    with interrupts.noted(hold=False):   # torch loads here: seconds
        from . import commands
        from .config import CodistillConfig, RunConfig, dump_config, load_config
        from .runtime.launch import WorkerError
        from .runtime.worker import NonFiniteLoss

    try:
        config = load_config(args.config, args.overrides,
                             CodistillConfig if args.command == "codistill" else RunConfig)
        if args.command == "codistill":
            if args.check:
                commands.check_codistill(config)
                print(dump_config(config), end="")
            else:
                commands.codistill(config)
        elif args.command == "check":
            commands.check(config)
            print(dump_config(config), end="")
        elif args.command == "profile":
            commands.profile(config)
        else:
            commands.run(config)
    except (ValueError, TypeError, NotImplementedError, OSError, ImportError) as err:
        print(f"pipebd: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        # The run diverged (hence 1): one line naming the stage, block and step, from a worker
        # too, whose traceback would say no more.
        print(f"pipebd: error: {getattr(err, 'headline', err)}", file=sys.stderr)
        return 1
    except WorkerError as err:
        # A failed run, not a bad config (hence 1): the message names the rank and step and holds
        # the worker's traceback; the parent's own would only show the call of fit.
        print(f"pipebd: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
