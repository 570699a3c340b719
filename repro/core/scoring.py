"""Prompt batching and scoring of target tokens after prompts: templates filled with a subject,
right-padded teacher-forcing batches with the subject's last token, log-probabilities at chosen
positions, and each row's mean target NLL.

The one implementation shared by the editors (value optimisation, FT-L/FT-M/LoRA, MEND and its
meta-training), the CounterFact measures and the post-training runs. It knows nothing of editors or
runners: it takes token ids and a :class:`~repro.core.models.LoadedModel`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from repro.core.models import LoadedModel


@dataclass
class PromptBatch:
    """Right-padded token ids with, per row, the subject's last token and the loss positions."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    subject_idx: torch.Tensor  # (B,)
    loss_pos: torch.Tensor  # (B, L): positions whose next-token logits predict the target
    labels: torch.Tensor  # (B, L): target token ids
    label_mask: torch.Tensor  # (B, L): 1 where a row has that many target tokens
    last_idx: torch.Tensor  # (B,): last real token of each row


def pad_rows(
    prompts: list[list[int]],
    targets: list[list[int]],
    pad_id: int,
    device: torch.device | str,
    subject_idx: list[int] | None = None,
) -> PromptBatch:
    """Right-padded batch of ``prompt + target[:-1]`` per row (teacher forcing: every target token
    but the last is fed to the model).

    Target token j of a row is predicted by the logits at position ``len(prompt) - 1 + j``
    (``loss_pos``, ``labels``, ``label_mask``); a row with an empty target gets an all-zero label
    mask. ``subject_idx`` defaults to each row's last prompt token.
    """
    rows = [list(p) + list(t[:-1]) for p, t in zip(prompts, targets, strict=True)]
    T = max(len(r) for r in rows)
    B, L = len(rows), max(1, max(len(t) for t in targets))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss_pos = torch.zeros((B, L), dtype=torch.long)
    labels = torch.zeros((B, L), dtype=torch.long)
    label_mask = torch.zeros((B, L))
    for b, (row, prompt, tgt) in enumerate(zip(rows, prompts, targets)):
        n = len(prompt)
        input_ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = 1
        if len(tgt):
            loss_pos[b, : len(tgt)] = torch.arange(n - 1, n - 1 + len(tgt))
            labels[b, : len(tgt)] = torch.tensor(list(tgt))
            label_mask[b, : len(tgt)] = 1
    if subject_idx is None:
        subject_idx = [len(p) - 1 for p in prompts]
    return PromptBatch(
        input_ids.to(device),
        attn.to(device),
        torch.tensor(subject_idx, device=device),
        loss_pos.to(device),
        labels.to(device),
        label_mask.to(device),
        (attn.sum(1) - 1).to(device),
    )


def logprobs_at(lm: LoadedModel, source, positions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, P, V), in float32, at ``positions`` (B, P) only: the unembedding is the
    costly part.

    ``source`` is either a batch (anything with ``input_ids`` and ``attention_mask``), run through
    the model's base (no KV cache), or the final hidden states (B, T, H) of one already run (e.g.
    with functionally edited weights).
    """
    if isinstance(source, torch.Tensor):
        hidden = source
    else:
        hidden = lm.spec.base_model(lm.model)(
            input_ids=source.input_ids, attention_mask=source.attention_mask, use_cache=False
        ).last_hidden_state
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return torch.log_softmax(lm.spec.logits(lm.model, picked).float(), dim=-1)


def row_nll(logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each row's target tokens, shape (B,).

    ``logp``: log-probabilities (B, L, V) with position j scoring ``labels[:, j]`` (teacher
    forcing, e.g. from :func:`logprobs_at` at ``loss_pos``), or (B, 1, V): one distribution scoring
    every target token (FT-L's "prompt_last" objective). ``mask`` (B, L) is 1 on a row's real
    target tokens; a row without any scores 0.
    """
    if logp.shape[1] == labels.shape[1]:
        tok_lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    elif logp.shape[1] == 1:
        tok_lp = logp[:, 0].gather(-1, labels)
    else:
        raise ValueError(f"log-probs at {logp.shape[1]} positions for {labels.shape[1]} target tokens")
    return -(tok_lp * mask).sum(1) / mask.sum(1).clamp(min=1)


def fill(template: str, subject: str) -> tuple[str, tuple[int, int]]:
    """Fill the single ``{}`` of a template with the subject; return the text and subject span."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
    start = template.index("{}")
    return template.replace("{}", subject), (start, start + len(subject))


def _subject_last_token(offsets: list[tuple[int, int]], span: tuple[int, int]) -> int:
    idx = [i for i, (a, b) in enumerate(offsets) if b > a and a < span[1] and b > span[0]]
    if not idx:
        raise ValueError(f"no token overlaps the subject span {span}")
    return idx[-1]


def target_ids(tok, target: str) -> list[int]:
    """Token ids of a target object as it follows a prompt (with its leading space)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def encode_rows(
    lm: LoadedModel,
    texts: list[str],
    targets: list[str | None],
    spans: list[tuple[int, int]] | None = None,
) -> PromptBatch:
    """Right-padded batch of ``text + all but the last target token`` per row.

    ``loss_pos``/``labels`` say where each target token is predicted; rows whose target is None
    get an all-zero label mask. With ``spans`` (character span of the subject in each text) the
    subject's last token index is filled in, else it is the last prompt token.
    """
    tok = lm.tokenizer
    prompts, subj, tgts = [], [], []
    for i, (text, target) in enumerate(zip(texts, targets, strict=True)):
        enc = tok(text, return_offsets_mapping=spans is not None)
        ids = list(enc["input_ids"])
        subj.append(_subject_last_token(enc["offset_mapping"], spans[i]) if spans else len(ids) - 1)
        prompts.append(ids)
        tgts.append(target_ids(tok, target) if target is not None else [])
    return pad_rows(prompts, tgts, tok.pad_token_id, lm.device, subj)


def make_batch(
    lm: LoadedModel, templates: list[str], subject: str, target: str | None = None, n_plain: int = 0
) -> PromptBatch:
    """The templates filled with ``subject``, each followed by the target (see :func:`encode_rows`).

    The last ``n_plain`` templates get no target, so that prompts with other losses can share one
    forward pass.
    """
    filled = [fill(t, subject) for t in templates]
    n_tgt = len(templates) - n_plain
    targets = [target if i < n_tgt else None for i in range(len(templates))]
    return encode_rows(lm, [f[0] for f in filled], targets, [f[1] for f in filled])
