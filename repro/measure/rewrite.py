"""CounterFact-style comparisons of the new and the true object after a prompt."""
from __future__ import annotations

import numpy as np
import torch

from repro.core.models import LoadedModel
from repro.core.scoring import encode_rows, logprobs_at, row_nll, target_ids


@torch.no_grad()
def target_nll(lm: LoadedModel, texts: list[str], targets: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean per-token negative log-likelihood of each ``target`` (with a leading space) after its
    text, one value per row."""
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} texts but {len(targets)} targets")
    out = []
    for i in range(0, len(texts), batch_size):
        b = encode_rows(lm, texts[i : i + batch_size], targets[i : i + batch_size])
        out.append(row_nll(logprobs_at(lm, b, b.loss_pos), b.labels, b.label_mask).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def compare_targets(
    lm: LoadedModel, texts: list[str], target_new: list[str], target_true: list[str], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL of the new object, NLL of the true object) for each text.

    Where both objects are one token each (most CounterFact-style pairs), one forward pass of the
    prompt gives both: the two log-probabilities are read at its last position. Other rows are
    teacher-forced once per object (:func:`target_nll`). Same numbers as scoring every row with
    :func:`target_nll`, at about half the cost.
    """
    if not len(texts) == len(target_new) == len(target_true):
        raise ValueError(f"{len(texts)} texts, {len(target_new)} new and {len(target_true)} true targets")
    tok = lm.tokenizer
    ids_new = [target_ids(tok, t) for t in target_new]
    ids_true = [target_ids(tok, t) for t in target_true]
    single = [i for i in range(len(texts)) if len(ids_new[i]) == 1 and len(ids_true[i]) == 1]
    multi = [i for i in range(len(texts)) if not (len(ids_new[i]) == 1 and len(ids_true[i]) == 1)]
    nll_new, nll_true = np.zeros(len(texts)), np.zeros(len(texts))
    for start in range(0, len(single), batch_size):
        rows = single[start : start + batch_size]
        b = encode_rows(lm, [texts[i] for i in rows], [None] * len(rows))
        lp = logprobs_at(lm, b, b.subject_idx.unsqueeze(1))[:, 0]  # (B, V) at each prompt's last token
        pair = torch.tensor([[ids_new[i][0], ids_true[i][0]] for i in rows], device=lp.device)
        got = -lp.gather(1, pair).cpu().numpy()
        nll_new[rows], nll_true[rows] = got[:, 0], got[:, 1]
    if multi:
        nll = target_nll(lm, [texts[i] for i in multi] * 2,
                         [target_new[i] for i in multi] + [target_true[i] for i in multi], batch_size)
        nll_new[multi], nll_true[multi] = nll[: len(multi)], nll[len(multi) :]
    return nll_new, nll_true


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
