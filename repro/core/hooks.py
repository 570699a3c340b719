"""Reading and changing what a module receives or returns during a forward pass."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are captured."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture(
    modules: dict[str, torch.nn.Module], what: str = "output", stop_after: str | None = None,
    first: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (first) input or output tensor of each named module into the yielded dict.

    With ``stop_after`` set to one of the names, the forward pass is cut short right after that
    module runs by raising :class:`StopForward`, which the caller catches. With ``first=False`` the
    whole input tuple or output (a tuple or a model output object) is recorded as it is.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', not {what!r}")
    pick = _first if first else (lambda x: x)
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            store[name] = pick(args) if what == "input" else pick(out)
            if name == stop_after:
                raise StopForward

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (first) output by ``fn(output)`` while the context is open."""

    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
