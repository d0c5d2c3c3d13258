"""YAML run configurations for the CLI: a file plus ``key.path=value`` overrides, validated up
front. Unknown keys and values of the wrong type are errors that name the key.

A run config (``RunConfig``) describes a model pair from ``pipebd.models``, a dataset, the
optimizer and losses, and the ``Distiller.fit`` arguments; ``configs/default.yaml`` shows every
key. A codistillation config (``CodistillConfig``) describes n classifiers, a labelled task from
``pipebd.datasets`` and the ``Codistillation`` arguments; see ``configs/codistill.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
import re
import types
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from .losses import SoftTargetLoss
from .plan import Plan

log = logging.getLogger("pipebd")


@dataclass
class ModelConfig:
    pair: str = "cnn"                                       # a name in pipebd.models.PAIRS
    args: dict = field(default_factory=dict)                # keyword arguments of the pair function


@dataclass
class DataConfig:
    kind: str = "synthetic"                                 # standard-normal inputs of the pair's input shape
    samples: int = 2048                                     # rows of data
    seed: int = 0                                           # seeds the data (the run's order: the top-level seed)


@dataclass
class OptimizerConfig:
    name: str = "sgd"                                       # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9                                   # sgd only
    weight_decay: float = 0.0

    def build(self) -> Any:
        """A picklable callable ``params -> optimizer``."""
        if not 0 < self.lr < math.inf:      # a rate of 0 trains nothing and reports success
            raise ValueError(f"optimizer.lr must be > 0 and finite, got {self.lr}")
        for key in ("momentum", "weight_decay"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"optimizer.{key} must be >= 0 and finite, got {getattr(self, key)}")
        if self.name != "sgd" and self.momentum != OptimizerConfig.momentum:
            log.warning("pipebd: optimizer.momentum=%g is not used by %s (sgd only)", self.momentum, self.name)
        if self.name == "sgd":
            return functools.partial(torch.optim.SGD, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if self.name not in classes:
            raise ValueError(f"optimizer.name must be one of sgd, adam, adamw, got {self.name!r}")
        return functools.partial(classes[self.name], lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class FinalLossConfig:
    temperature: float = 4.0
    alpha: float = 0.0                                      # weight of the hard-label cross-entropy
    backend: str = "auto"                                   # auto | triton | torch


@dataclass
class PlanConfig:
    stages: list = field(default_factory=list)
    replicas: list | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    block_loss: str = "mse"
    final_loss: FinalLossConfig | None = None
    batch_size: int = 64
    steps: int = 30
    world_size: int = 1
    strategy: str = "pipebd"
    plan: PlanConfig | str | None = None                    # null, "auto", "[0-1]x1 | [2-3]x2" or {stages, replicas}
    seed: int = 0
    device: str | None = None
    max_inflight: int = 2
    sync_batchnorm: bool = False                            # BatchNorm statistics over a replicated stage's batch
    num_workers: int = 0                                    # DataLoader workers per loading rank (0: inline)
    timeout: float = 600.0                                  # seconds any one wait may take before fit fails
    trace: str | None = None                                # write a Chrome trace here
    plot: str | None = None                                 # draw the timeline and stage breakdown here (PNG)
    checkpoint_dir: str | None = None                       # save each block's state here
    checkpoint_every: int | None = None                     # steps between saves (null: step 0 and the last only)
    resume: bool = False                                    # continue the run saved in checkpoint_dir

    def fit_plan(self) -> Plan | str | None:
        if isinstance(self.plan, PlanConfig):
            return Plan(self.plan.stages, self.plan.replicas)
        if isinstance(self.plan, str) and self.plan != "auto":
            return Plan.parse(self.plan)
        return self.plan

    def build_final_loss(self) -> SoftTargetLoss | None:
        f = self.final_loss
        if f is None:
            return None
        try:
            return SoftTargetLoss(f.temperature, alpha=f.alpha, backend=f.backend)
        except ValueError as err:    # "temperature must be ...": say where it is set
            raise ValueError(f"final_loss.{err}") from None


@dataclass
class ClassifierConfig:
    kind: str = "mlp"                                       # pipebd.models.mlp_classifier
    hidden: int = 128


@dataclass
class TaskDataConfig:
    kind: str = "synthetic"                                 # synthetic | digits (pipebd.datasets)
    samples: int = 20480                                    # synthetic: rows, before the test rows are held out
    features: int = 32                                      # synthetic only
    classes: int = 10                                       # synthetic only
    test_fraction: float = 0.2                              # held out for the accuracy columns
    seed: int = 7                                           # synthetic: draws the rows and labels


@dataclass
class CodistillConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    warmup_steps: int = 0                                   # linear warmup from 0.1x the rate (pipebd.lr.warmup)
    cosine: bool = False                                    # cosine decay to 0 over the run (times the warmup)
    n: int = 2                                              # models
    mode: str = "codistill"                                 # codistill | online
    alpha: float = 1.0
    temperature: float = 2.0
    burn_in: int = 0
    exchange_every: int = 50
    backend: str = "auto"                                   # the soft-target kernel: auto | triton | torch
    batch_size: int = 64                                    # per model
    steps: int = 500
    world_size: int = 1                                     # 1, or a multiple of n
    seed: int = 0
    device: str | None = None
    eval_every: int | None = None                           # null: after the last step only
    sync_batchnorm: bool = False
    num_workers: int = 0
    timeout: float = 600.0                                  # seconds any one wait may take before fit fails
    trace: str | None = None
    plot: str | None = None                                 # draw the timeline and accuracy curves here (PNG)
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False


# Keys of a codistill config that a run config does not have.
_CODISTILL_ONLY = {f.name for f in dataclasses.fields(CodistillConfig)} - {f.name for f in dataclasses.fields(RunConfig)}
_RUN_ONLY = {f.name for f in dataclasses.fields(RunConfig)} - {f.name for f in dataclasses.fields(CodistillConfig)}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, which PyYAML lets the
    last one win silently (a second ``lr:`` in a long config file would quietly replace the first).
    Keys brought in by a merge (``<<: *base``) may still be overridden. Each mapping is checked
    as written, before a merge rewrites it in place (a merged node is flattened where it is
    first merged, which may come before it is built)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, Hashable) and key in lines:
                    raise ValueError(f"duplicate key {key!r} on line {line} (first on line {lines[key]})")
                lines[key] = line
        super().flatten_mapping(node)


def load_config(path: str | None = None, overrides: list[str] = (), kind: type = RunConfig) -> Any:
    """Read ``path`` (or start from the defaults) and apply ``key.path=value`` overrides, whose
    values are parsed as YAML (``steps=10``, ``plan=auto``, ``final_loss.temperature=2``), or
    taken as the plain string when they are not valid YAML (``plan=[0]x1 | [1-3]x2``). ``kind``:
    the config class, ``RunConfig`` (``pipebd run``) or ``CodistillConfig`` (``pipebd codistill``)."""
    raw: dict = {}
    not_yaml = {}     # key -> why its override value, taken as a plain string, is not YAML
    if path is not None:
        if os.path.isdir(path):
            raise ValueError(f"config file {path!r} is a directory")
        with open(path) as f:
            try:
                raw = yaml.load(f, _Loader) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML: {err}") from None
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:     # absent, or null in the file (plan: null): a new section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        for earlier in [k for k in not_yaml if k == key or k.startswith(key + ".")]:
            del not_yaml[earlier]     # replaced by this override
        try:
            node[leaf] = yaml.load(value, _Loader)
        except yaml.YAMLError as err:
            node[leaf] = value      # not YAML (e.g. plan=[0]x1 | [1-3]x2): the plain string
            not_yaml[key] = getattr(err, "problem", None) or str(err).splitlines()[0]
        except ValueError as err:
            raise ValueError(f"override {item!r}: {err}") from None
    try:
        config = _build(kind, raw, "")
    except ValueError as err:
        for key, why in not_yaml.items():     # a string where a list or mapping was meant: say why
            if str(err).startswith(f"config key '{key}' must be"):
                raise ValueError(f"{err} (not valid YAML: {why})") from None
        model = raw.get("model")
        if kind is RunConfig and (set(raw) & _CODISTILL_ONLY or (isinstance(model, dict) and "kind" in model)):
            raise ValueError(f"{err} (a codistill config? pipebd codistill {path or 'CONFIG'} --check)") from None
        if kind is CodistillConfig and (set(raw) & _RUN_ONLY or (isinstance(model, dict) and "pair" in model)):
            raise ValueError(f"{err} (a run config? pipebd check {path or 'CONFIG'})") from None
        raise
    for key in ("trace", "plot", "checkpoint_dir"):      # "~/runs/t.json" means the home directory, as in a shell
        if getattr(config, key):
            setattr(config, key, os.path.expanduser(getattr(config, key)))
    return config


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"config key '{where or '<top>'}' must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ValueError(f"unknown config key '{path}'{hint}")
        values[key] = _convert(hints[key], value, path)
    return cls(**values)


# A decimal number. PyYAML reads YAML 1.1, whose floats need a dot and a signed exponent, so
# 1e-3, 5E-2 and 1.5e3 arrive as strings; float keys take them. Not nan or inf (nor 1e999):
# those are .nan and .inf in YAML, as before.
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(hint: Any, value: Any, path: str) -> Any:
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"config key '{path}' must not be null")
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return _build(option, value, path)
        base = get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _DECIMAL.fullmatch(value) and math.isfinite(float(value)):
            return float(value)
        if base in (int, str, dict, list, bool) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return value
    expected = " or ".join("a mapping" if dataclasses.is_dataclass(o) else getattr(o, "__name__", str(o))
                           for o in options if o is not type(None))
    hint = ""
    if path == "plan" and isinstance(value, list):    # YAML reads [0-3] and [[0, 1], [2, 3]] as lists
        hint = " (quote a plan string, plan: '[0-1]x1 | [2-3]x1', or give plan.stages and plan.replicas)"
    raise ValueError(f"config key '{path}' must be {expected}, got {value!r}{hint}")


def dump_config(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
