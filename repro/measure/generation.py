"""Generation entropy (CounterFact's fluency measure): how repetitive a model's free text becomes.

Definition (as in ROME's evaluation): split the text into words, count its n-grams for n = 2 and
3, take the entropy (log base 2) of each n-gram frequency distribution, H_2 and H_3, and average
them with weights 2/3 and 4/3: GE = (2/3 · H_2 + 4/3 · H_3) / 2. A text that loops on one phrase
scores low; varied text scores high (about log2 of its length).

Words come from :func:`word_tokenize`, a re-implementation of the conventions of NLTK's
``word_tokenize`` (Penn Treebank style: punctuation split off words, clitics such as ``n't``,
``'s``, ``'ll`` split, sentence-final periods split, abbreviations such as ``Mr.`` kept whole).
NLTK is not a dependency; the splitter agrees with it on ordinary prose, and where it differs
(Punkt's learned abbreviation list, rare quote forms) it differs the same way for every model, so
comparisons between checkpoints are unaffected.

As in ROME, the text scored is the prompt followed by its continuation (``include_prompt``),
normalised to NFKD with blank lines joined. Unlike ROME (top-k sampling, 100 tokens in all), the
continuation here is greedy (deterministic) and ``max_new_tokens`` long, ending early at EOS.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from repro.core.models import LoadedModel

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

# a trailing period after one of these is part of the word, not the end of a sentence
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp no vol fig gen col lt sgt capt gov sen rep "
    "rev hon mt ft jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e a.m p.m u.s u.k".split()
)

_RULES: list[tuple[re.Pattern, str]] = [
    # opening double quotes -> ``, closing -> ''
    (re.compile(r'^"'), " `` "),
    (re.compile(r'([\s(\[{<])"'), r"\1 `` "),
    (re.compile(r'"'), " '' "),
    # ellipses and the always-separate punctuation
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&?!]"), r" \g<0> "),
    # commas and colons, except inside numbers (1,000 and 10:30)
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
    # clitics and closing single quotes
    (re.compile(r"(?i)([^'\s])('s|'m|'d|')(?=\s|$)"), r"\1 \2 "),
    (re.compile(r"(?i)([^'\s])('ll|'re|'ve|n't)(?=\s|$)"), r"\1 \2 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(got)(ta)\b"), r"\1 \2"),
]


def _split_period(token: str, last: bool) -> list[str]:
    """Split a sentence-final period off a word, unless the word is an abbreviation or initial;
    the text's last period is always split (as the Treebank tokenizer does)."""
    if len(token) < 2 or not token.endswith(".") or token.endswith(".."):
        return [token]
    stem = token[:-1]
    if not last and (stem.lower() in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()) or "." in stem):
        return [token]  # "Mr.", "J.", "U.S."
    return [stem, "."]


def word_tokenize(text: str) -> list[str]:
    """Penn-Treebank-style word tokens of ``text`` (NLTK ``word_tokenize`` conventions)."""
    s = text
    for pattern, repl in _RULES:
        s = pattern.sub(repl, s)
    toks = s.split()
    return [piece for i, tok in enumerate(toks) for piece in _split_period(tok, i == len(toks) - 1)]


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(
    tokens_or_text: str | Sequence[str],
    orders: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Weighted mean of the n-gram entropies (bits) of a text or of a list of word tokens:
    mean_i(weights[i] · H_{orders[i]}); an order with no n-grams (too short a text) counts as 0."""
    if len(orders) != len(weights):
        raise ValueError(f"{len(orders)} orders but {len(weights)} weights")
    tokens = word_tokenize(tokens_or_text) if isinstance(tokens_or_text, str) else list(tokens_or_text)
    values = []
    for n, w in zip(orders, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        values.append(w * _entropy_bits(grams))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_greedy(
    lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 100, batch_size: int = 16
) -> list[str]:
    """The greedy continuation of each prompt (text after the prompt, special tokens dropped),
    batched with left padding on the model's device; generation stops at EOS."""
    from transformers import GenerationConfig

    tok, model = lm.tokenizer, lm.model
    eos = tok.eos_token_id
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos, eos_token_id=eos,
    )
    side = tok.padding_side
    out: list[str] = []
    try:
        tok.padding_side = "left"
        for b0 in range(0, len(prompts), batch_size):
            batch = list(prompts[b0 : b0 + batch_size])
            enc = tok(batch, return_tensors="pt", padding=True).to(lm.device)
            gen = model.generate(**enc, generation_config=cfg)
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generation_entropy(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    batch_size: int = 16,
    include_prompt: bool = True,
    return_texts: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[str]]:
    """CounterFact generation entropy of each prompt's greedy continuation (see the module doc);
    with ``return_texts`` also the scored texts."""
    conts = generate_greedy(lm, prompts, max_new_tokens, batch_size)
    texts = [_clean(p + c if include_prompt else c) for p, c in zip(prompts, conts)]
    ent = np.array([ngram_entropy(t) for t in texts], dtype=float)
    return (ent, texts) if return_texts else ent
