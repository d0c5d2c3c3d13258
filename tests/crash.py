"""An injected crash for the checkpoint tests."""

from torch import nn


def crash_after(module: nn.Module, fail_at: int | None) -> nn.Module:
    """Make ``module`` raise "injected crash" on its training forward number ``fail_at + 1``
    (None: never). Its state dict is unchanged; eval-mode calls are not counted."""
    if fail_at is None:
        return module
    calls = [0]

    def hook(mod, args):
        if mod.training:
            calls[0] += 1
            if calls[0] > fail_at:
                raise RuntimeError("injected crash")

    module.register_forward_pre_hook(hook)
    return module
