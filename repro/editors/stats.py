"""Second-moment statistics C = E[k kᵀ] of a weight matrix's inputs over general text.

Locate-and-edit editors (ROME, MEMIT, ...) weight their updates by C⁻¹ so that the edit disturbs
the outputs for typical inputs as little as possible. Statistics are cached on disk per
(model, matrix, layer, corpus, token count) under ``$NORMGROWTH_CACHE/stats``.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from tqdm import tqdm

from repro.core.hooks import StopForward, capture
from repro.core.models import LoadedModel, cache_dir


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
    return slug if len(slug) < 60 else slug[:40] + "-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def stats_path(model_name: str, mtype: str, layer: int, corpus: str, n_tokens: int,
               dtype: torch.dtype = torch.float32) -> Path:
    """The cache file; statistics of a model run in another precision than fp32 are kept apart
    (their keys come from that precision's forward pass)."""
    tag = "" if dtype == torch.float32 else "_" + str(dtype).removeprefix("torch.")
    return cache_dir() / "stats" / _slug(model_name) / f"{mtype}_L{layer}_{_slug(corpus)}_{n_tokens}{tag}.pt"


def _model_dtype(lm: LoadedModel) -> torch.dtype:
    return next(lm.model.parameters()).dtype


def _load_corpus(corpus: str) -> list[str]:
    from repro.data.text import load_text  # local import: the data package is heavier than this module

    if corpus != "wiki_train":
        raise ValueError(f"unknown corpus {corpus!r}; known: 'wiki_train' (or pass texts=...)")
    return load_text("train")


@torch.no_grad()
def collect_second_moments(
    lm: LoadedModel,
    layers: list[int],
    mtype: str,
    texts: list[str],
    n_tokens: int,
    max_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Uncentred second moment of the inputs of matrix ``mtype`` at each layer, float64.

    Paragraphs are tokenized, truncated to ``max_len`` tokens and run in batches until
    ``n_tokens`` non-padding tokens are seen; each pass stops right after the last layer needed.
    """
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    model, tok, spec = lm.model, lm.tokenizer, lm.spec
    modules = {str(l): spec.matrix_module(model, l, mtype) for l in layers}
    last = str(max(layers))
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    bar = tqdm(total=n_tokens, desc=f"second moment {mtype} L{layers}", unit="tok", disable=not progress)
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        mask = enc["attention_mask"].bool()
        with capture(modules, what="input", stop_after=last) as got:
            try:
                model(**enc)
            except StopForward:
                pass
        take = min(int(mask.sum()), n_tokens - seen)
        for name, x in got.items():
            k = x[mask][:take].double()
            acc = sums.setdefault(int(name), torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device))
            acc += k.T @ k
        seen += take
        bar.update(take)
        if seen >= n_tokens:
            break
    bar.close()
    if seen < n_tokens:
        raise ValueError(f"corpus too small: {seen} tokens < n_tokens={n_tokens}")
    return {l: s / seen for l, s in sums.items()}


def second_moment(
    lm: LoadedModel,
    layer: int,
    mtype: str | None = None,
    corpus: str = "wiki_train",
    n_tokens: int = 100_000,
    texts: list[str] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """C for one layer's matrix (default: the MLP output matrix), from the disk cache when present.

    Returned as float64 on the device of the matrix (the model's device, unless the model is
    placed over several devices). ``texts`` overrides the named corpus (the cache
    key then uses ``corpus`` as given, so name it).
    """
    mtype = mtype or lm.spec.mlp_out
    path = stats_path(lm.name, mtype, layer, corpus, n_tokens, _model_dtype(lm))
    if path.exists():
        return torch.load(path, map_location=lm.spec.weight(lm.model, layer, mtype).device).double()
    texts = texts if texts is not None else _load_corpus(corpus)
    C = collect_second_moments(lm, [layer], mtype, texts, n_tokens, progress=progress)[layer]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(C.float().cpu(), tmp)
    os.replace(tmp, path)
    return C.float().double()  # same rounding as a cached load, so first and later runs agree


def second_moments(
    lm: LoadedModel,
    layers: list[int],
    mtype: str | None = None,
    corpus: str = "wiki_train",
    n_tokens: int = 100_000,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """:func:`second_moment` for several layers; the missing ones are collected in one pass."""
    mtype = mtype or lm.spec.mlp_out
    missing = [l for l in layers if not stats_path(lm.name, mtype, l, corpus, n_tokens, _model_dtype(lm)).exists()]
    if missing:
        fresh = collect_second_moments(lm, missing, mtype, _load_corpus(corpus), n_tokens, progress=progress)
        for layer, C in fresh.items():
            path = stats_path(lm.name, mtype, layer, corpus, n_tokens, _model_dtype(lm))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(C.float().cpu(), tmp)
            os.replace(tmp, path)
    return {l: second_moment(lm, l, mtype, corpus, n_tokens, progress=progress) for l in layers}
