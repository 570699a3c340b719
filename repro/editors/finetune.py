"""Fine-tuning editors: FT-L and FT-M train one MLP output matrix directly on the edit.

Both run Adam on the weight of ``lm.spec.mlp_out`` (or ``mtype``) at ``layer``; every other
weight stays frozen. They differ in the loss and in a constraint:

* **FT-L** (constrained fine-tuning, the baseline of ROME, Meng et al. 2022, after Zhu et al.
  2020): the "prompt_last" objective. Every token of the new object is scored under the single
  next-token distribution that follows the prompt, and their log-probabilities are averaged; the
  target tokens are never fed to the model. After each Adam step every weight is clamped to within
  ε of its value before the edit call (an L∞ ball around the original matrix, ``norm_constraint``).
* **FT-M** (Zhang et al. 2024, EasyEdit's "target_new" objective): teacher-forced cross-entropy,
  each target token predicted from the prompt plus the preceding target tokens, prompt tokens
  masked out of the loss; no constraint.

The training loop is the reference's (``execute_ft`` of EasyEdit's ``models/ft/ft_main.py`` and of
ROME's ``baselines/ft/ft_main.py``): up to ``steps`` epochs; in each, the requests of a call in
chunks of ``batch_size``, one Adam step per chunk on the mean over its requests of each request's
mean token NLL, skipped when that loss is below ``loss_stop`` (the reference's hard-coded 1e-2),
each chunk followed by the clamp; after an epoch, training stops once the mean of the chunk losses
(weighted by their sizes) is below ``loss_stop``. With one chunk (the default ``batch_size`` 64 and
the study's one request per call) that is: at most ``steps`` Adam steps, stopping at the first loss
below ``loss_stop``. ``tests/test_reference_ft.py`` checks the update against the reference's.
Kept apart from the reference by design (see the comments in ``hparams/ft-l.yaml`` and
``ft-m.yaml``): padded target tokens are masked by lengths (the reference masks ``unk`` tokens,
right only where pad = unk), targets are tokenized without special tokens (the reference would score
a BOS), prompt and target are tokenized apart for FT-M (EasyEdit tokenizes them as one string, the
same ids for every SmolLM2 fact), only the matrix is trained (the reference's GPT-2 template also
trains the MLP output bias), and log-probabilities are taken in float32 (the same for float32
models; the reference uses the model's dtype).

The same training loop (:func:`train_on_edits`) and losses (:func:`edit_loss`) serve the LoRA
editor (``repro.editors.lora``), which trains a low-rank adapter instead of the matrix itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from repro.core.models import LoadedModel
from repro.core.scoring import PromptBatch, encode_rows, logprobs_at, row_nll
from repro.editors.base import Editor, EditResult, Request, refuse_fp16_training

OBJECTIVES = ("prompt_last", "teacher_forced")


# --------------------------------------------------------------------------------------------
# Losses and the training loop (shared with the LoRA editor)
# --------------------------------------------------------------------------------------------
def edit_batch(lm: LoadedModel, requests: list[Request]) -> PromptBatch:
    """Each request's rewrite prompt followed by its new object (see ``encode_rows``)."""
    return encode_rows(lm, [r.prompt.format(r.subject) for r in requests], [r.target_new for r in requests])


def edit_loss(lm: LoadedModel, batch: PromptBatch, objective: str) -> torch.Tensor:
    """Mean token NLL of each row's target, shape (B,).

    ``teacher_forced``: target token t is read from the logits at the position before it (prompt
    and earlier target tokens as context); only target positions enter the loss.
    ``prompt_last``: every target token is read from the logits at the last prompt position.
    """
    if objective == "teacher_forced":
        logp = logprobs_at(lm, batch, batch.loss_pos)  # (B, L, V)
    elif objective == "prompt_last":
        # loss_pos[:, 0] is the last prompt token; causal attention makes its logits independent
        # of the target tokens that follow it in the batch
        logp = logprobs_at(lm, batch, batch.loss_pos[:, :1])  # (B, 1, V): scores every target token
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    return row_nll(logp, batch.labels, batch.label_mask)


@dataclass
class TrainLog:
    steps: list[int]  # per request: the optimizer steps taken on its chunk
    loss_first: list[float]  # per request, at its chunk's first evaluation (before any step on it)
    loss_last: list[float]  # per request, after the last step


@contextmanager
def only_trainable(model: torch.nn.Module, params: Iterable[torch.Tensor]):
    """Gradients for ``params`` only, inside the block; every ``requires_grad`` flag and the
    ``.grad`` of the trained tensors are restored on exit (also on error)."""
    params = list(params)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(flags.get(p, False))
        for p, flag in flags.items():
            p.requires_grad_(flag)


def train_on_edits(
    lm: LoadedModel,
    params: list[torch.Tensor],
    batch: PromptBatch | Sequence[PromptBatch],
    objective: str,
    *,
    steps: int,
    lr: float,
    loss_stop: float,
    after_step: Callable[[], None] | None = None,
    weight_decay: float = 0.0,
) -> TrainLog:
    """Adam on ``params`` (which must require grad) minimising :func:`edit_loss`, the reference's
    loop (``execute_ft``): up to ``steps`` epochs over the chunks of ``batch`` (one PromptBatch, or a
    sequence of them); per chunk, the mean of its rows' losses, an Adam step on it unless that loss
    is below ``loss_stop``, then ``after_step`` (under no_grad, e.g. a projection; it also runs
    after a skipped step, as the reference's clamp does). After each epoch, stop once the mean of
    the chunk losses weighted by their numbers of rows is below ``loss_stop``. With one chunk:
    stop after ``steps`` updates or at the first loss below ``loss_stop``."""
    chunks = [batch] if isinstance(batch, PromptBatch) else list(batch)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    first: list[list[float] | None] = [None] * len(chunks)
    last: list[list[float] | None] = [None] * len(chunks)
    taken = [0] * len(chunks)
    stale = [False] * len(chunks)  # stepped on since its loss was last evaluated
    for _ in range(steps):
        total, rows = 0.0, 0
        for i, chunk in enumerate(chunks):
            opt.zero_grad(set_to_none=True)
            per_row = edit_loss(lm, chunk, objective)
            loss = per_row.mean()
            values = per_row.detach().cpu().tolist()
            if first[i] is None:
                first[i] = values
            last[i], stale[i] = values, False
            total += loss.item() * len(values)
            rows += len(values)
            if loss.item() >= loss_stop:
                loss.backward()
                opt.step()
                taken[i] += 1
                stale = [True] * len(chunks)  # the step moved every chunk's loss
            if after_step is not None:
                with torch.no_grad():
                    after_step()
        if total / rows < loss_stop:
            break
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            if stale[i] or last[i] is None:
                last[i] = edit_loss(lm, chunk, objective).cpu().tolist()
                if first[i] is None:
                    first[i] = last[i]
    return TrainLog(
        [t for t, v in zip(taken, last) for _ in v],
        [x for v in first for x in v],
        [x for v in last for x in v],
    )


def request_info(log: TrainLog) -> list[dict[str, Any]]:
    """Per-request diagnostics of one training run (``v_steps`` is the runner's column for the
    number of optimisation steps)."""
    return [
        {"steps": n, "v_steps": n, "loss_first": a, "loss_last": b}
        for n, a, b in zip(log.steps, log.loss_first, log.loss_last, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# FT-M and FT-L
# --------------------------------------------------------------------------------------------
@dataclass
class FTHyperParams:
    layer: int
    mtype: str | None = None  # default: the family's MLP output matrix
    steps: int = 25  # epochs over the call's requests (the reference's num_steps)
    lr: float = 5e-4
    loss_stop: float = 1e-2  # skip a chunk's step below this loss, stop once an epoch's mean is below it
    norm_constraint: float | None = None  # L∞ radius ε around the pre-edit weights; None: none
    batch_size: int = 64  # requests per Adam step (the reference's chunks; its default is 64)
    weight_decay: float = 0.0  # Adam's L2 weight decay (the reference's; 0 in every published config)


class FTM(Editor):
    """Fine-tune one MLP output matrix on the teacher-forced NLL of the new object (FT-M)."""

    name = "ft-m"
    hparams_class = FTHyperParams
    objective = "teacher_forced"

    def __init__(self, lm: LoadedModel, hparams: FTHyperParams):
        super().__init__(lm, hparams)
        refuse_fp16_training(self.name, lm)
        self.mtype = hparams.mtype or lm.spec.mlp_out
        if not 0 <= hparams.layer < lm.n_layers:
            raise ValueError(f"layer {hparams.layer} outside 0..{lm.n_layers - 1} for {lm.name}")
        if hparams.norm_constraint is not None and hparams.norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be positive or None, not {hparams.norm_constraint}")
        bs = hparams.batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"{self.name} hyperparameter batch_size={bs!r}: must be an integer >= 1")
        wd = hparams.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0 <= wd < float("inf"):
            raise ValueError(f"{self.name} hyperparameter weight_decay={wd!r}: must be a finite number >= 0")

    def edited_matrices(self) -> list[tuple[int, str]]:
        return [(self.hp.layer, self.mtype)]

    def apply(self, requests: list[Request]) -> EditResult:
        hp, lm = self.hp, self.lm
        if not requests:
            return EditResult(deltas={})
        param = lm.spec.matrix_module(lm.model, hp.layer, self.mtype).weight
        w0 = param.detach().clone()
        after_step = None
        if hp.norm_constraint is not None:
            low, high = w0 - hp.norm_constraint, w0 + hp.norm_constraint

            def after_step():
                param.copy_(torch.clamp(param, low, high))

        chunks = [edit_batch(lm, requests[i : i + hp.batch_size]) for i in range(0, len(requests), hp.batch_size)]
        with only_trainable(lm.model, [param]):
            log = train_on_edits(
                lm, [param], chunks, self.objective, steps=hp.steps, lr=hp.lr,
                loss_stop=hp.loss_stop, after_step=after_step, weight_decay=hp.weight_decay,
            )
        with torch.no_grad():
            delta = param.detach() - w0
            if self.mtype in lm.spec.transposed:
                delta = delta.T
        return EditResult(deltas={f"{hp.layer}:{self.mtype}": delta.contiguous()}, info=request_info(log))


class FTL(FTM):
    """Fine-tune one MLP output matrix on the "prompt_last" NLL, each weight kept within ε of
    its pre-edit value (FT-L). ``norm_constraint`` (ε) is required."""

    name = "ft-l"
    objective = "prompt_last"

    def __init__(self, lm: LoadedModel, hparams: FTHyperParams):
        if hparams.norm_constraint is None:
            raise ValueError("FT-L needs norm_constraint (the L∞ radius ε)")
        super().__init__(lm, hparams)
