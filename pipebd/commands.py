"""What the commands of ``pipebd.cli`` do with a loaded config: build the model pair or the
codistillation, check it, run it, profile it, and write its outputs."""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from . import checkpoint, datasets, outputs
from .api import Distiller
from .report import Report
from .codistill import Codistillation, CodistillReport
from .checks import check_device
from .config import CodistillConfig, RunConfig
from .runtime.launch import check_timeout


def build(config: RunConfig) -> tuple[Distiller, TensorDataset]:
    """The Distiller and dataset a config describes."""
    if config.data.kind != "synthetic":
        raise ValueError(f"data.kind must be 'synthetic', got {config.data.kind!r}")
    if config.data.samples < 1:
        raise ValueError(f"data.samples must be >= 1, got {config.data.samples}")
    if config.final_loss is not None and config.final_loss.alpha > 0:
        raise ValueError(f"final_loss.alpha={config.final_loss.alpha:g} mixes in a cross-entropy on labels, but "
                         f"synthetic data has none; use alpha 0 here (the Python API takes (x, y) items)")
    check_config_device(config.device)   # first: the backend check reads it
    if config.final_loss is not None:
        check_backend("final_loss.backend", config.final_loss.backend, config.device)
    check_timeout(config.timeout)
    check_seeds(config)
    teacher, student, shape = build_pair(config)
    gen = torch.Generator().manual_seed(config.data.seed)
    try:
        dataset = TensorDataset(torch.randn(config.data.samples, *shape, generator=gen))
    except (RuntimeError, OverflowError, MemoryError) as err:   # more memory than there is, or no int64
        raise ValueError(f"data.samples={config.data.samples} synthetic inputs of shape {tuple(shape)} cannot be "
                         f"made: {str(err).splitlines()[0]}") from None
    distiller = Distiller(teacher, student, optimizer=config.optimizer.build(), block_loss=config.block_loss,
                          final_loss=config.build_final_loss(), device=config.device)
    return distiller, dataset


def check_seeds(config: RunConfig | CodistillConfig) -> None:
    """The seeds seed torch generators, which take 64 bits."""
    for key, seed in (("seed", config.seed), ("data.seed", config.data.seed)):
        if not -(2 ** 63) <= seed < 2 ** 64:
            raise ValueError(f"config key '{key}' must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}")


def check_config_device(device: str | None) -> None:
    """The config's device: a CPU or CUDA device (what the runtime runs on), naming the key."""
    if device is None:
        return
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        hint = " (null, the default, picks cuda when there is one)" if str(device).lower() in ("none", "auto") else ""
        raise ValueError(f"config key 'device' must be cpu, cuda or cuda:N, got {device!r}{hint}")
    check_device(device)   # cuda:x


def check_backend(key: str, backend: str, device: str | None) -> None:
    """Refuse the Triton kernels on a device they cannot run on, up front: otherwise the first
    loss call fails, deep in a shape probe or a worker after the burn-in."""
    device = check_device(device)
    if backend == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{key}=triton runs on CUDA (device is {device}); on a CPU use auto or torch, "
                         f"or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")


def build_pair(config: RunConfig) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """Teacher, student and per-sample input shape of ``model.pair`` built with ``model.args``.
    Whatever the pair function raises comes from those args (a negative width is a RuntimeError
    deep in torch), so it becomes a ValueError that names them; the warnings of a build that
    fails (zero-element tensors, say) are dropped as noise before its error."""
    from pipebd.models import PAIRS

    name, args = config.model.pair, config.model.args
    if name not in PAIRS:
        raise ValueError(f"model.pair must be one of {sorted(PAIRS)}, got {name!r}")
    if "seed" in args:
        raise ValueError("model.args.seed: the models are initialized from the top-level seed (which also "
                         "orders the batches); set seed instead")
    with warnings.catch_warnings(record=True) as caught:
        try:
            teacher, student = PAIRS[name].build(**args, seed=config.seed)
            shape = PAIRS[name].input_shape(**args)
        except Exception as err:
            hint = ""
            if isinstance(err, TypeError) and "unexpected keyword argument" in str(err):
                hint = (f" (model.args are the arguments of model.pair {name!r}; for its defaults: "
                        f"--set 'model.args={{}}')")
            raise ValueError(f"model.args {args} do not build model.pair {name!r}: {err}{hint}") from err
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return teacher, student, shape


def check_outputs(config: RunConfig | CodistillConfig) -> None:
    """Refuse, before any training, an output that could not be written after it (the run's time
    would be lost with it): a path that is a directory, a directory that cannot be created or
    written in, a plot without matplotlib or in a format it cannot write, a trace and a plot at
    one path, a checkpoint_dir that cannot be written in; as ``pipebd.outputs.refusal`` says.
    Leaves nothing behind (folders are made as the outputs are written)."""
    files = [p for p in (config.trace, config.plot) if p and outputs.is_file(p)]
    if len(files) == 2 and os.path.realpath(files[0]) == os.path.realpath(files[1]):
        raise ValueError(f"config keys 'trace' and 'plot' name the same file {config.plot!r}: the plot would "
                         f"overwrite the trace")
    for key in ("trace", "plot"):
        path = getattr(config, key)
        reason = path and outputs.refusal(path)
        if reason:
            raise ValueError(f"config key '{key}': cannot write {path!r}: {reason}")
    if config.checkpoint_dir:
        folder = os.path.abspath(config.checkpoint_dir)
        while not os.path.exists(folder):      # where its first new folder would be made
            folder = os.path.dirname(folder)
        if os.path.isdir(folder):
            try:
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as err:
                raise ValueError(f"config key 'checkpoint_dir': cannot write in {config.checkpoint_dir!r}: "
                                 f"{err.strerror or err} ({folder})") from None
    if config.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("config key 'plot': plotting needs matplotlib: pip install 'pipebd[plot]'")
        from .plot import image_format
        try:
            image_format(config.plot)
        except ValueError as err:
            raise ValueError(f"config key 'plot': {err}") from None


def check(config: RunConfig) -> tuple[Distiller, TensorDataset]:
    """Refuse what ``pipebd run`` would refuse, without running: the config's values, then
    fit's own checks of them (plan against world size, batch against replicas, shapes), the
    run saved in ``checkpoint_dir`` (``checkpoint.read``: a run there without ``resume``, or
    one that does not fit), and the outputs. Returns what ``build`` does."""
    distiller, dataset = build(config)
    distiller._job(dataset, config.batch_size, config.steps, config.world_size, config.strategy, config.fit_plan(),
                   config.seed, config.max_inflight, None, False, config.timeout, config.sync_batchnorm,
                   config.num_workers)
    directory, _ = checkpoint.options(config.checkpoint_dir, config.checkpoint_every, config.resume)
    key = checkpoint.RunKey(distiller.num_blocks, config.batch_size, config.seed, len(dataset))
    checkpoint.read(directory, key, config.steps, config.resume)
    check_outputs(config)
    return distiller, dataset


def run(config: RunConfig) -> None:
    distiller, dataset = build(config)
    check_outputs(config)
    report = distiller.fit(dataset, batch_size=config.batch_size, steps=config.steps,
                           world_size=config.world_size, strategy=config.strategy, plan=config.fit_plan(),
                           seed=config.seed, max_inflight=config.max_inflight,
                           checkpoint_dir=config.checkpoint_dir, checkpoint_every=config.checkpoint_every,
                           resume=config.resume, sync_batchnorm=config.sync_batchnorm,
                           num_workers=config.num_workers, timeout=config.timeout)
    print(report)
    write_outputs(report, config)


def _simulated(label: str, simulation: Callable[[], Any]) -> None:
    try:
        print(f"{label}: {simulation()}")
    except ValueError as err:   # a plan fit refuses (a replica without a row, say)
        print(f"{label}: not simulated, as fit would refuse it: {err}")


def profile(config: RunConfig) -> None:
    """Print the block profile, the auto plan and the simulator's predictions for the config's
    world size and steps, next to the config's plan, one block range per rank and the baseline."""
    from .plan import Plan, default_plan
    from .planner import auto_plan
    from .simulator import simulate, simulate_baseline

    distiller, dataset = check(config)      # the config it profiles is one that would run
    steps, max_inflight = config.steps, config.max_inflight
    prof = distiller.profile(dataset, config.batch_size, config.world_size, sync_batchnorm=config.sync_batchnorm,
                             num_workers=config.num_workers, timeout=config.timeout)
    print(prof)
    best = auto_plan(prof, config.world_size)
    idle = config.world_size - best.plan.ranks_used
    print(f"auto: {best}" + (f"; it leaves {idle} of {config.world_size} ranks idle"
                             if idle else ""))
    configured = config.fit_plan()
    # Simulated: the auto plan, the config's own, one block range per rank and the baseline;
    # each plan once, and one fit would refuse is said so.
    shown: list = []
    candidates = [("auto plan", best.plan)] + ([("the config's plan", configured)] if isinstance(configured, Plan)
                                               else [])
    candidates.append(("one block range per rank", default_plan(distiller.num_blocks, config.world_size)))
    for label, plan in candidates:
        if plan not in shown:
            shown.append(plan)
            _simulated(label, lambda: simulate(prof, plan, steps, max_inflight))
    _simulated("baseline", lambda: simulate_baseline(prof, config.world_size, steps))
    if config.trace or config.plot:
        print("(profile runs no training, so it writes no trace or plot)")


def build_codistill(config: CodistillConfig) -> tuple[Codistillation, TensorDataset, tuple[Tensor, Tensor]]:
    """The Codistillation, training set and held-out ``(inputs, labels)`` a codistill config describes."""
    d = config.data
    if d.kind not in datasets.KINDS:
        raise ValueError(f"data.kind must be one of {', '.join(datasets.KINDS)}, got {d.kind!r}")
    if config.model.kind != "mlp":
        raise ValueError(f"model.kind must be 'mlp', got {config.model.kind!r}")
    if config.model.hidden < 1:
        raise ValueError(f"model.hidden must be >= 1, got {config.model.hidden}")
    if not 0 < d.test_fraction < 1:
        raise ValueError(f"data.test_fraction must be between 0 and 1, got {d.test_fraction}")
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    check_config_device(config.device)   # first: the backend check reads it
    check_backend("backend", config.backend, config.device)
    check_timeout(config.timeout)
    check_seeds(config)
    try:
        x, y = datasets.synthetic(d.samples, d.features, d.classes, d.seed) if d.kind == "synthetic" else datasets.digits()
    except (RuntimeError, OverflowError, MemoryError) as err:   # more memory than there is, or no int64
        raise ValueError(f"data.samples={d.samples} rows of data.features={d.features} cannot be made: "
                         f"{str(err).splitlines()[0]}") from None
    test_rows = max(1, round(len(x) * d.test_fraction))
    if test_rows >= len(x):
        raise ValueError(f"data.samples={len(x)} leaves no training rows once data.test_fraction={d.test_fraction} "
                         f"({test_rows} rows) is held out")
    train, test = datasets.split(x, y, test_rows=test_rows)
    classes = d.classes if d.kind == "synthetic" else int(y.max()) + 1
    model = functools.partial(_classifier, x.shape[1], config.model.hidden, classes)
    schedule = None
    if config.warmup_steps or config.cosine:
        schedule = functools.partial(_schedule, warmup_steps=config.warmup_steps,
                                     cosine_steps=config.steps if config.cosine else 0)
    cd = Codistillation(model, config.n, optimizer=config.optimizer.build(), scheduler=schedule, alpha=config.alpha,
                        temperature=config.temperature, burn_in=config.burn_in, exchange_every=config.exchange_every,
                        mode=config.mode, backend=config.backend, device=config.device)
    return cd, train, test


def _classifier(features: int, hidden: int, classes: int, index: int) -> nn.Module:
    from pipebd.models import mlp_classifier

    return mlp_classifier(features, hidden, classes)


def _schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, cosine_steps: int) -> object:
    from .lr import warmup

    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_steps) if cosine_steps else None
    return warmup(optimizer, warmup_steps, then=cosine) if warmup_steps else cosine


def _check_cosine_resume(config: CodistillConfig) -> None:
    """Refuse to resume a ``cosine`` run for more steps than its decay spans: the checkpoint's
    schedule is kept, and past its end CosineAnnealingLR's rate rises again."""
    if not (config.cosine and config.resume and config.checkpoint_dir):
        return
    state = checkpoint.saved_model_state(config.checkpoint_dir, 0)
    spans = _find_key(state.get("scheduler") if state else None, "T_max")
    if isinstance(spans, int) and config.steps > spans:
        raise ValueError(f"cosine: true decays the learning rate over the first run's steps={spans}, and a resume "
                         f"keeps that schedule (past its end the rate would rise again): resume with steps <= "
                         f"{spans}, or start afresh in another checkpoint_dir to train for steps={config.steps}")


def _find_key(tree: Any, key: str) -> Any:
    """The first value of ``key`` in nested dicts and lists (a scheduler's state), else None."""
    if isinstance(tree, dict) and key in tree:
        return tree[key]
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else ()
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def check_codistill(config: CodistillConfig) -> None:
    """``check`` for a codistill config: its values, then ``Codistillation.fit``'s checks of them,
    the run saved in ``checkpoint_dir`` (as ``check``: one there without ``resume``, or one that
    does not fit; settings that differ from it are warned about, as the run would) and the
    cosine schedule it would resume, and the outputs."""
    cd, train, test = build_codistill(config)
    job = cd._job(train, config.batch_size, config.steps, config.world_size, config.seed, test, config.eval_every,
                  False, None, False, config.timeout, config.sync_batchnorm, config.num_workers)
    directory, _ = checkpoint.options(config.checkpoint_dir, config.checkpoint_every, config.resume)
    _, states = checkpoint.read_codistill(directory, job.checkpoint_key(), config.steps, config.resume, job.distillation, warn=True)
    checkpoint.check(states, job.models, job.optimizer, job.scheduler, what="model")
    _check_cosine_resume(config)
    check_outputs(config)


def codistill(config: CodistillConfig) -> None:
    cd, train, test = build_codistill(config)
    check_outputs(config)
    _check_cosine_resume(config)
    report = cd.fit(train, batch_size=config.batch_size, steps=config.steps, world_size=config.world_size,
                    seed=config.seed, eval_data=test, eval_every=config.eval_every,
                    checkpoint_dir=config.checkpoint_dir, checkpoint_every=config.checkpoint_every,
                    resume=config.resume, sync_batchnorm=config.sync_batchnorm, num_workers=config.num_workers,
                    timeout=config.timeout)
    print(f"{len(train)} training rows, accuracy on {len(test[1])} held-out rows")
    print(report)
    write_outputs(report, config)


def write_outputs(report: Report | CodistillReport, config: RunConfig | CodistillConfig) -> None:
    """Write the trace and plot the config asks for (checked by ``check_outputs`` before training),
    creating missing folders; OSError naming each that failed, after trying both."""
    files = (("trace", config.trace, report.save_trace, " (open in https://ui.perfetto.dev or chrome://tracing)"),
             ("plot", config.plot, report.plot, ""))
    failed = []
    for what, path, write, note in files:
        if path:
            try:
                write(path)
            except (OSError, RuntimeError) as err:   # checked before training, but the system may have changed
                failed.append(f"config key '{what}': cannot write {path!r}: {err}")
                continue
            print(f"{what} written to {path}{note}")
    if failed:   # after trying each: one that fails does not cost the other
        raise OSError("; ".join(failed))
