"""Reusing the part of a forward pass that does not change between optimisation steps.

When a value optimisation adds a trainable vector inside decoder layer L (ROME: to the MLP output
of layer L) or to its output (MEMIT: the residual stream after layer L), nothing in layers below L
depends on the trainable vector, and the model's weights are frozen: their outputs are the same at
every step. :func:`frozen_prefix` runs the batch once, records each of those layers' outputs, and
for the duration of the context swaps the layers for stand-ins that return the recorded outputs
without computing anything. The model's own forward (embeddings, masks, position embeddings, the
remaining layers, the final norm) is untouched, so this works for any family whose decoder layers
sit in the ModuleList the architecture spec names.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from repro.core.hooks import StopForward, capture
from repro.core.models import LoadedModel


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns that layer's recorded output, ignores its inputs.

    :meth:`select` narrows what it returns to some rows (and the first positions) of the recorded
    batch, for a forward pass on that part of the batch only."""

    def __init__(self, original: torch.nn.Module, output):
        super().__init__()
        self.recorded = output
        self.output = output
        # attributes the model's forward reads off its layers (e.g. which attention mask to use)
        for name in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, *args, **kwargs):
        return self.output

    def select(self, rows: torch.Tensor | None, length: int | None = None) -> None:
        """Return rows ``rows`` and positions ``:length`` of the recorded output from now on (None:
        all of it). Indexed once here, so each later forward pays nothing for it."""
        self.output = self.recorded if rows is None else _take(self.recorded, rows, length)


def select_rows(stand_ins: list[torch.nn.Module], rows: torch.Tensor | None, length: int | None = None) -> None:
    """Narrow every stand-in of :func:`frozen_prefix` to ``rows`` (and positions ``:length``) of the
    recorded batch, to match a forward pass on ``input_ids[rows, :length]``; None restores all."""
    for s in stand_ins:
        s.select(rows, length)


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def _take(out, rows: torch.Tensor, length: int | None):
    if isinstance(out, torch.Tensor):
        return out[rows, :length] if out.dim() >= 2 else out[rows]
    if isinstance(out, tuple):
        return tuple(_take(o, rows, length) for o in out)
    return out


@contextmanager
def frozen_prefix(lm: LoadedModel, forward_kwargs: dict, n_layers: int) -> Iterator[list[torch.nn.Module]]:
    """Replace decoder layers ``0 .. n_layers-1`` by replays of their outputs on ``forward_kwargs``
    (the batch every step will use) while the context is open; yields the stand-ins, so that hooks
    meant for a replaced layer can be put on its stand-in. Only valid while the inputs and the
    weights of those layers stay fixed."""
    layers = lm.spec.layer_modules(lm.model)
    if not 0 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be within 0..{len(layers)}, got {n_layers}")
    if n_layers == 0:
        yield []
        return
    names = {str(i): layers[i] for i in range(n_layers)}
    with torch.no_grad(), capture(names, stop_after=str(n_layers - 1), first=False) as got:
        try:
            lm.model(**forward_kwargs)
        except StopForward:
            pass
    outputs = {i: _detach(got[str(i)]) for i in range(n_layers)}
    originals = [layers[i] for i in range(n_layers)]
    stand_ins = [_Replay(originals[i], outputs[i]) for i in range(n_layers)]
    try:
        for i, s in enumerate(stand_ins):
            layers[i] = s
        yield stand_ins
    finally:
        for i, m in enumerate(originals):
            layers[i] = m
