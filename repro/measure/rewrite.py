"""CounterFact-style comparisons of the new and the true object after a prompt."""
from __future__ import annotations

import numpy as np
import torch

from ..editors.locate import encode_rows, logits_at
from ..models import LoadedModel


@torch.no_grad()
def target_nll(lm: LoadedModel, texts: list[str], targets: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean per-token negative log-likelihood of each ``target`` (with a leading space) after its
    text, one value per row."""
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} texts but {len(targets)} targets")
    out = []
    for i in range(0, len(texts), batch_size):
        b = encode_rows(lm, texts[i : i + batch_size], targets[i : i + batch_size])
        lp = logits_at(lm, b, b.loss_pos).gather(-1, b.labels.unsqueeze(-1)).squeeze(-1)
        out.append((-(lp * b.label_mask).sum(1) / b.label_mask.sum(1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def compare_targets(
    lm: LoadedModel, texts: list[str], target_new: list[str], target_true: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL of the new object, NLL of the true object) for each text, in one batched pass."""
    nll = target_nll(lm, texts + texts, list(target_new) + list(target_true))
    return nll[: len(texts)], nll[len(texts) :]


def prefers_new(nll_new: np.ndarray, nll_true: np.ndarray) -> np.ndarray:
    """CounterFact's success test: P(new) > P(true), i.e. a lower mean token NLL for the new object."""
    return np.asarray(nll_new) < np.asarray(nll_true)


def record_scores(lm: LoadedModel, records) -> dict[str, np.ndarray]:
    """CounterFact scores of each record on the current model, one value per record:
    ``es`` (rewrite prompt prefers the new object), ``ps`` (share of paraphrases that do) and
    ``ns`` (share of neighborhood prompts that still prefer the true object)."""
    texts, news, trues, owner, kind = [], [], [], [], []
    for i, rec in enumerate(records):
        rw = rec.requested_rewrite
        groups = {"es": [rw.prompt.format(rw.subject)], "ps": rec.paraphrase_prompts, "ns": rec.neighborhood_prompts}
        for name, prompts in groups.items():
            texts += prompts
            news += [rw.target_new] * len(prompts)
            trues += [rw.target_true] * len(prompts)
            owner += [i] * len(prompts)
            kind += [name] * len(prompts)
    nll_new, nll_true = compare_targets(lm, texts, news, trues)
    win = prefers_new(nll_new, nll_true)
    owner, kind = np.array(owner), np.array(kind)
    out = {}
    for name in ("es", "ps", "ns"):
        vals = np.full(len(records), np.nan)
        for i in range(len(records)):
            sel = (owner == i) & (kind == name)
            if sel.any():
                w = win[sel]
                vals[i] = (1 - w).mean() if name == "ns" else w.mean()
        out[name] = vals
    return out


def harmonic_mean(*values: float) -> float:
    """CounterFact's overall score S: the harmonic mean of ES, PS and NS (0 when any is 0)."""
    vals = np.asarray(values, dtype=float)
    return 0.0 if (vals <= 0).any() else float(len(vals) / (1.0 / vals).sum())
