"""`CallContext`: a context manager entered around every call of chosen modules, through hooks.

Used for settings that must hold while a model computes but that the engine should not know
about (the attention kernel, where autograd keeps saved activations). Entering in a forward
pre-hook and leaving in a forward hook that runs even when the call raises keeps the
context exactly as long as the call; nested hooked calls stack their contexts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass
class CallContext:
    """Enters ``make()`` before each call of the hooked modules and leaves it after the call."""

    make: Callable[[], contextlib.AbstractContextManager]
    entered: int = 0  # calls covered so far (read by tests and logs)
    _open: list = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def install(self, modules: Sequence[nn.Module]) -> CallContext:
        """Hook ``modules``' calls; returns self."""
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))
        return self

    def _enter(self, _module: nn.Module, _inputs: object) -> None:
        context = self.make()
        context.__enter__()
        self._open.append(context)
        self.entered += 1

    def _exit(self, _module: nn.Module, _inputs: object, _output: object) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        """Unhook the modules."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
