"""A memory estimate printed before a run starts: what the model, the editor's statistics, the
optimiser and the kept keys will hold, so that a run too large for a device fails in the head of
its user rather than after an hour. Activations (which depend on prompt lengths and batch) are
not included."""
from __future__ import annotations

import torch

GiB = 1024**3


def _numel_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def estimate(lm, editor) -> dict[str, int]:
    """Bytes by part: ``weights`` (the model as loaded), ``statistics`` (fp64 second moments, and
    AlphaEdit's fp64 null-space projectors, one per edited matrix), ``optimiser`` (gradients and
    Adam's two fp32 moments of what is trained: the matrix for FT-L/FT-M, the adapters for LoRA,
    the fp32 δ of each request for locate-and-edit), ``kept_keys`` (what an editor carries along of earlier
    edits' keys: their fp64 Gram matrix, whatever the number of edits) and ``hypernetwork`` (MEND)."""
    from repro.editors.finetune import FTM
    from repro.editors.lora import LoRAEditor
    from repro.editors.memit import MEMIT, AlphaEdit
    from repro.editors.mend import MEND
    from repro.editors.rome import ROME

    spec, model = lm.spec, lm.model
    shapes = [tuple(spec.weight(model, l, m).shape) for l, m in editor.edited_matrices()]  # (out, in)
    parts = dict(weights=_numel_bytes(model), statistics=0, optimiser=0, kept_keys=0, hypernetwork=0)
    if isinstance(editor, (ROME, MEMIT)):
        parts["statistics"] = sum(d_in * d_in * 8 for _, d_in in shapes)
        if isinstance(editor, AlphaEdit):
            parts["statistics"] *= 2
        if getattr(editor, "keeps_keys", False):
            parts["kept_keys"] = sum(d_in * d_in * 8 for _, d_in in shapes)  # their fp64 Gram K_p K_pᵀ
        parts["optimiser"] = max(d_out for d_out, _ in shapes) * 4 * 3 * getattr(editor.hp, "batch_values_max", 1)
    elif isinstance(editor, FTM):
        parts["optimiser"] = sum(o * i for o, i in shapes) * (4 + 4 + 4)
    elif isinstance(editor, LoRAEditor):
        parts["optimiser"] = sum(editor.hp.rank * (o + i) for o, i in shapes) * (4 + 4 + 4 + 4)
    elif isinstance(editor, MEND):
        net = getattr(editor, "net", None)
        parts["hypernetwork"] = _numel_bytes(net) if isinstance(net, torch.nn.Module) else 0
    return parts


def describe(parts: dict[str, int], lm) -> str:
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    shown = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f} GiB" for k, v in parts.items() if v or k == "weights")
    return (f"memory estimate ({lm.name}, {dtype}, {lm.device}): {shown}; total {sum(parts.values()) / GiB:.2f} GiB "
            f"plus activations")
