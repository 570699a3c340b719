"""Downstream abilities of a (possibly edited) model: few-shot classification, recall of facts that
were never edited, and perplexity on held-out Wikipedia text.

Few-shot scoring
    Each test example is classified by the log-likelihood of each label's verbalizer (e.g.
    " positive") after ``prefix + separator + query``: the **sum** of the verbalizer's token
    log-probabilities, i.e. log P(verbalizer | prompt) (``reduce="mean"`` divides by its token
    count instead). The prefix (instruction and demonstrations) is the same for every example: it
    is encoded once per call and its key/value cache is reused, expanded over each batch, for every
    example and label. Scores are defined on the token sequence ``ids(prefix) + ids(suffix) +
    ids(verbalizer)``, each part tokenized on its own; the task templates put the cut right before a
    newline, where the tokenizers of the supported families do not merge across the cut.

Calibration
    Small models copy the labels of the last demonstrations, so plain argmax accuracy depends
    heavily on the order of the demonstrations. The headline ``accuracy`` is therefore
    batch-calibrated (:func:`batch_calibrate`: each label's probability divided by its mean over
    the scored examples, no gold label used); the plain argmax accuracy is reported beside it
    (``*_raw``).

Special tokens
    Where the tokenizer starts every text with special tokens (Gemma's ``<bos>``), the prompt
    starts with them once (they open the cached prefix) and each perplexity window starts with
    them; SmolLM2's and GPT-2's tokenizers add none.

Rows
    Labels whose verbalizers share all tokens but the last (e.g. single-token verbalizers) are read
    from one row: the row holds the example and the shared tokens, and each label's last token is
    read from the same next-token distribution. Single-token verbalizers thus cost one row per
    example, not one per label.

Every tensor goes to ``lm.device``; batches are right-padded by hand (the tokenizer's padding side
and pad token do not matter) with explicit position ids.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch

from repro.data.tasks import FewShotTask
from repro.core.models import LoadedModel, cache_kwargs, returned_cache
from repro.measure.rewrite import compare_targets

log = logging.getLogger(__name__)

# Default perplexity sizes: held-out tokens and window length (repro.measure.checkpoint's
# MeasureParams sets those of a run's checkpoints).
PPL_TOKENS = 2048
PPL_CTX = 256


# --------------------------------------------------------------------------------------------
# Few-shot classification
# --------------------------------------------------------------------------------------------
def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


def start_ids(tok) -> list[int]:
    """The special tokens the tokenizer puts before every text by default (e.g. ``[<bos>]``), or []."""
    plain = _ids(tok, "a")
    full = list(tok("a")["input_ids"])
    n = len(full) - len(plain)
    return full[:n] if n > 0 and full[n:n + len(plain)] == plain else []


def _verbalizer_ids(tok, task: FewShotTask) -> list[list[int]]:
    out = []
    for label in task.labels:
        ids = _ids(tok, task.verbalizers[label])
        if not ids:
            raise ValueError(f"task {task.name!r}: verbalizer {task.verbalizers[label]!r} tokenizes to nothing")
        out.append(ids)
    return out


def _forward_hidden(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, past=None, past_len: int = 0):
    """Final hidden states (and the cache) of right-padded rows that continue ``past``."""
    n, t = ids.shape
    pos = torch.arange(past_len, past_len + t, device=lm.device).unsqueeze(0).expand(n, -1)
    if past_len:
        mask = torch.cat([torch.ones(n, past_len, dtype=mask.dtype, device=lm.device), mask], dim=1)
    base = lm.spec.base_model(lm.model)
    out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(base, past))
    return out.last_hidden_state, returned_cache(out)


@torch.no_grad()
def encode_prefix(lm: LoadedModel, prefix_ids: list[int]):
    """The key/value cache of the prefix (batch of one); None for an empty prefix."""
    if not prefix_ids:
        return None
    ids = torch.tensor([prefix_ids], device=lm.device)
    _, cache = _forward_hidden(lm, ids, torch.ones_like(ids))
    return cache


def expand_cache(cache, n: int):
    """A copy of a batch-of-one cache expanded (as views) to ``n`` rows; ``cache`` is left as it is.

    Each cache layer is copied shallowly (keeping its counters, e.g. a sliding-window layer's
    cumulative length) and its key/value tensors replaced by expanded views: the next forward
    pass concatenates new states onto them, which allocates new tensors and never writes into
    the shared prefix.
    """
    if cache is None:
        return None
    if not hasattr(cache, "layers"):
        raise TypeError(f"unsupported cache type {type(cache).__name__} (expected a transformers Cache "
                        "with .layers, transformers >= 4.56)")
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            layer.values = layer.values.expand(n, *layer.values.shape[1:])
        new.layers.append(layer)
    return new


def _rows_for(suffix: list[int], verb_ids: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int, list[int]]]]:
    """Rows for one example and, per label, (row index, position of its first token's prediction,
    its token ids). A row is the suffix plus all but the last token of a verbalizer, shared by the
    labels that need the same tokens."""
    rows: list[list[int]] = []
    keys: dict[tuple[int, ...], int] = {}
    reads = []
    for ids in verb_ids:
        key = tuple(ids[:-1])
        if key not in keys:
            keys[key] = len(rows)
            rows.append(suffix + list(key))
        reads.append((keys[key], len(suffix) - 1, ids))
    return rows, reads


@torch.no_grad()
def label_logprobs(
    lm: LoadedModel,
    task: FewShotTask,
    n_test: int | None = None,
    batch_size: int = 32,
    reduce: str = "sum",
    cache_prefix: bool = True,
) -> np.ndarray:
    """(n_test, n_labels) log-likelihood of each label's verbalizer for the first ``n_test`` test
    examples: the sum (``reduce="sum"``) or mean (``"mean"``) of its token log-probabilities.

    ``batch_size`` counts rows (one per example for single-token verbalizers). With
    ``cache_prefix=False`` each row re-encodes the whole prompt (slow; for checking the cache).
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")
    examples = task.test[:n_test] if n_test is not None else task.test
    if not examples:
        raise ValueError(f"task {task.name!r}: no test examples selected (n_test={n_test})")
    tok = lm.tokenizer
    verb = _verbalizer_ids(tok, task)
    prefix = start_ids(tok) + _ids(tok, task.prefix())
    rows, reads = [], []  # reads[e][l] = (global row, pos, ids)
    for ex in examples:
        r, rd = _rows_for(_ids(tok, task.suffix(ex.text)), verb)
        reads.append([(len(rows) + i, pos, ids) for i, pos, ids in rd])
        rows += r
    if not cache_prefix:  # the same token sequences, prefix re-encoded in every row
        reads = [[(i, pos + len(prefix), ids) for i, pos, ids in rd] for rd in reads]
        rows = [prefix + r for r in rows]
        prefix = []
    cache = encode_prefix(lm, prefix)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # per row: the positions to read and the token ids they predict
    need: list[list[tuple[int, int]]] = [[] for _ in rows]
    for rd in reads:
        for i, pos, ids in rd:
            need[i] += [(pos + j, t) for j, t in enumerate(ids)]
    row_lp: list[dict[tuple[int, int], float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n, t = len(chunk), max(len(r) for r in chunk)
        ids = torch.full((n, t), pad, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        hidden, _ = _forward_hidden(lm, ids.to(lm.device), mask.to(lm.device), expand_cache(cache, n), len(prefix))
        # unembed only the positions read
        flat = [(b, p, tgt) for b in range(n) for p, tgt in need[start + b]]
        bi = torch.tensor([f[0] for f in flat], device=lm.device)
        pi = torch.tensor([f[1] for f in flat], device=lm.device)
        ti = torch.tensor([f[2] for f in flat], device=lm.device)
        lp = torch.log_softmax(lm.spec.logits(lm.model, hidden[bi, pi]).float(), dim=-1)
        got = lp.gather(-1, ti.unsqueeze(-1)).squeeze(-1).cpu().tolist()
        for b in range(n):
            row_lp.append({})
        for (b, p, tgt), v in zip(flat, got):
            row_lp[start + b][(p, tgt)] = v
    out = np.zeros((len(examples), len(task.labels)))
    for e, rd in enumerate(reads):
        for lab, (i, pos, ids) in enumerate(rd):
            vals = [row_lp[i][(pos + j, t)] for j, t in enumerate(ids)]
            out[e, lab] = sum(vals) / (len(vals) if reduce == "mean" else 1)
    return out


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    """Unweighted mean over labels of F1 (a label never predicted nor present counts 0)."""
    f1 = []
    for c in range(n_labels):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1))


def batch_calibrate(scores: np.ndarray) -> np.ndarray:
    """Batch calibration (Zhou et al., ICLR 2024): log p(y|x) - log mean_x p(y|x), with p(.|x) the
    label scores normalised over the labels of each example. It removes the prompt's prior towards
    some labels (small models copy the labels of the last demonstrations) without using any gold
    label; it assumes the scored examples are not dominated by one class (our test lists are
    balanced)."""
    scores = np.asarray(scores, dtype=float)
    logp = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    prior = np.logaddexp.reduce(logp, axis=0, keepdims=True) - np.log(len(logp))
    return logp - prior


def classification_scores(scores: np.ndarray, task: FewShotTask) -> dict[str, float]:
    """Scores of the argmax label of ``scores`` (n, n_labels) against the gold labels of the first
    n test examples: ``accuracy`` and ``macro_f1`` after :func:`batch_calibrate`, ``accuracy_raw``
    and ``macro_f1_raw`` without it, the task's ``chance`` level and ``n``."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[1] != len(task.labels) or not 0 < len(scores) <= len(task.test):
        raise ValueError(f"scores of shape {scores.shape} do not fit task {task.name!r} "
                         f"({len(task.labels)} labels, {len(task.test)} test examples)")
    gold = np.array([task.labels.index(e.label) for e in task.test[: len(scores)]])
    raw = scores.argmax(1)
    cal = batch_calibrate(scores).argmax(1)
    return {
        "accuracy": float((cal == gold).mean()),
        "macro_f1": macro_f1(gold, cal, len(task.labels)),
        "accuracy_raw": float((raw == gold).mean()),
        "macro_f1_raw": macro_f1(gold, raw, len(task.labels)),
        "chance": task.chance,
        "n": float(len(scores)),
    }


def few_shot_accuracy(
    lm: LoadedModel, task: FewShotTask, n_test: int | None = None, batch_size: int = 32, reduce: str = "sum"
) -> dict[str, float]:
    """Few-shot classification of the task's first ``n_test`` held-out examples (all when None):
    labels scored by verbalizer log-likelihood (:func:`label_logprobs`); ``accuracy`` and
    ``macro_f1`` batch-calibrated, ``accuracy_raw`` and ``macro_f1_raw`` plain argmax, ``chance``
    (1 / number of labels: the test lists are balanced) and ``n``."""
    return classification_scores(label_logprobs(lm, task, n_test, batch_size, reduce), task)


# --------------------------------------------------------------------------------------------
# Recall of facts that were never edited
# --------------------------------------------------------------------------------------------
def fact_recall(lm: LoadedModel, records: Sequence) -> dict[str, float]:
    """Recall of facts (``Record``s) that were never edited (a run picks them with
    ``repro.data.splits.held_out_records``). On each record's rewrite prompt: ``recall``, the share where the true object is preferred to
    the counterfactual new object (lower mean token NLL, CounterFact's convention), and
    ``true_nll``, the mean over records of the true object's mean token NLL."""
    if not records:
        raise ValueError("fact_recall needs at least one record")
    texts = [r.requested_rewrite.prompt.format(r.requested_rewrite.subject) for r in records]
    nll_new, nll_true = compare_targets(
        lm, texts, [r.requested_rewrite.target_new for r in records], [r.requested_rewrite.target_true for r in records]
    )
    return {"recall": float(np.mean(nll_true < nll_new)), "true_nll": float(np.mean(nll_true))}


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------
def text_chunks(tok, texts: Sequence[str], max_tokens: int = PPL_TOKENS, ctx: int = PPL_CTX) -> torch.Tensor:
    """(n_chunks, ctx) token ids: the texts in order, each followed by a blank line, concatenated
    and cut into non-overlapping windows of ``ctx`` tokens, at most ``max_tokens`` tokens in all
    (whole windows only; a single shorter window when the texts hold fewer than ``ctx``). Where
    the tokenizer opens texts with special tokens (:func:`start_ids`), each window starts with
    them in addition."""
    if ctx < 2 or max_tokens < 2:
        raise ValueError(f"ctx and max_tokens must be at least 2, got {ctx}, {max_tokens}")
    stream: list[int] = []
    for text in texts:
        stream += _ids(tok, text + "\n\n")
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ValueError("the texts hold fewer than 2 tokens")
    start = start_ids(tok)
    if len(stream) < ctx:
        return torch.tensor([start + stream])
    n = len(stream) // ctx
    windows = torch.tensor(stream[: n * ctx]).view(n, ctx)
    return torch.cat([torch.tensor([start] * n, dtype=torch.long).view(n, len(start)), windows], dim=1)


@torch.no_grad()
def token_nll(lm: LoadedModel, chunks: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """(sum of next-token NLLs, number of predicted tokens) over the windows; the first token of
    each window is context only (so with a leading ``<bos>`` every text token is predicted)."""
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        ids = chunks[start : start + batch_size].to(lm.device)
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        logits, target = logits[:, :-1], ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += target.numel()
    return total, count


def perplexity(
    lm: LoadedModel, texts: Sequence[str], max_tokens: int = PPL_TOKENS, ctx: int = PPL_CTX, batch_size: int = 4
) -> float:
    """Token-weighted perplexity exp(Σ NLL / N) over the windows of :func:`text_chunks`."""
    total, count = token_nll(lm, text_chunks(lm.tokenizer, texts, max_tokens, ctx), batch_size)
    return float(np.exp(total / count))
