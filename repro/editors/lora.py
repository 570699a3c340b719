"""LoRA editing: train a low-rank adapter on the edit, then merge it into the weight.

For each configured layer the MLP output matrix W (out × in) gets a LoRA adapter (Hu et al.,
2022, via ``peft``): W x + (α/r)·B A x, with A (r × in) randomly initialised and B (out × r) zero,
so training starts from the unedited model. Only A and B are trained, with Adam on FT-M's loss
(teacher-forced NLL of the new object, prompt masked; see ``repro.editors.finetune``). The adapter
is then merged, W ← W + (α/r)·B A, and peft unloads its wrappers: the model is a plain model again
(same object, same modules) and the merged matrix's norm is what later measurements see.
Sequential calls each train and merge a fresh adapter, so their updates stack.

EasyEdit's LoRA baseline uses r 8, α 32, Adam lr 5e-3 for 30-70 steps on the attention
projections; here the adapter sits on the MLP output matrix, like the other editors of the study.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from repro.core.adapters import add_lora
from repro.core.models import LoadedModel
from repro.editors.base import Editor, EditResult, Request, refuse_fp16_training
from repro.editors.finetune import edit_batch, only_trainable, request_info, train_on_edits

ADAPTER = "edit"


@dataclass
class LoRAHyperParams:
    layers: list[int] = field(default_factory=list)
    mtype: str | None = None  # default: the family's MLP output matrix
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    steps: int = 30
    lr: float = 5e-3
    loss_stop: float = 1e-2
    seed: int = 0


class LoRAEditor(Editor):
    name = "lora"
    hparams_class = LoRAHyperParams

    def __init__(self, lm: LoadedModel, hparams: LoRAHyperParams):
        super().__init__(lm, hparams)
        refuse_fp16_training(self.name, lm)
        self.mtype = hparams.mtype or lm.spec.mlp_out
        if not hparams.layers:
            raise ValueError(f"lora needs at least one layer for {lm.name}")
        bad = [l for l in hparams.layers if not 0 <= l < lm.n_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{lm.n_layers - 1} for {lm.name}")
        self.calls = 0  # the adapter init of call i uses seed + i
        # (A, B, scaling) of the last call's adapters by "layer:mtype", captured before merging
        self.last_factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def edited_matrices(self) -> list[tuple[int, str]]:
        return [(l, self.mtype) for l in self.hp.layers]

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    def apply(self, requests: list[Request]) -> EditResult:
        hp, lm, spec = self.hp, self.lm, self.lm.spec
        if not requests:
            return EditResult(deltas={})
        keys = {spec.matrix_path(l, self.mtype): f"{l}:{self.mtype}" for l in hp.layers}
        before = {k: spec.weight(lm.model, *self._split_key(k)).detach().clone() for k in keys.values()}
        batch = edit_batch(lm, requests)
        flags = {p: p.requires_grad for p in lm.model.parameters()}
        model = lm.model
        wrapped = add_lora(lm, self.edited_matrices(), rank=hp.rank, alpha=hp.alpha, dropout=hp.dropout,
                           seed=hp.seed + self.calls, adapter=ADAPTER)
        merged = False
        try:
            factors = {}
            for path, key in keys.items():
                layer = model.get_submodule(path)
                factors[key] = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                float(layer.scaling[ADAPTER]))
            params = [t for a, b, _ in factors.values() for t in (a, b)]
            with only_trainable(model, params):
                log = train_on_edits(lm, params, batch, "teacher_forced", steps=hp.steps, lr=hp.lr,
                                     loss_stop=hp.loss_stop)
            self.last_factors = {k: (a.detach().clone(), b.detach().clone(), s) for k, (a, b, s) in factors.items()}
            unloaded = wrapped.merge_and_unload()
            merged = True
        finally:
            if not merged:
                unloaded = wrapped.unload()
            for p, flag in flags.items():
                p.requires_grad_(flag)
        if unloaded is not model:
            raise RuntimeError("peft's unload returned another model object than lm.model")
        self.calls += 1
        deltas = {k: (spec.weight(model, *self._split_key(k)).detach() - before[k]).contiguous() for k in keys.values()}
        return EditResult(deltas=deltas, info=request_info(log))

    @staticmethod
    def _split_key(key: str) -> tuple[int, str]:
        layer, mtype = key.split(":", 1)
        return int(layer), mtype
