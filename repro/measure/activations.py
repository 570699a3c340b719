"""Activations of a model on a fixed probe set, their norms, and how far they move under editing.

Sites collected at every decoder layer ``l`` (each token of the probe set is one row):

- ``resid``: the residual stream after the layer, i.e. the decoder layer's output
  (``hidden_states[l + 1]`` of ``output_hidden_states=True``, except at the last layer where
  Hugging Face reports the final-normed state instead).
- ``attn``, ``mlp``: what the attention and the MLP block *add* to the residual stream, so that
  ``resid_l = resid_{l-1} + attn_l + mlp_l`` in the pre-norm families (llama, gpt2, gptj). The spec
  says which module writes it (:meth:`repro.core.models.ArchSpec.residual_write_path`): the block itself
  for llama/gpt2/gptj (taking the first element where the module returns a tuple, e.g.
  ``(attn_output, attn_weights)``); for gemma2/3 the output of ``post_attention_layernorm`` /
  ``post_feedforward_layernorm``, because Gemma normalises a block's output before adding it and
  the raw block output (whose scale the post-norm discards) is not what reaches the stream.

For chosen edited matrices ``(layer, mtype)`` the input and output of that matrix are collected too,
as sites ``"<mtype>_in"`` and ``"<mtype>_out"`` (NaN at layers where that matrix was not asked for).

Padding is never collected. The first token of every text is skipped by default
(``skip_first``). SmolLM2's tokenizer adds no BOS token, yet its first position is an attention
sink all the same: on 88 probe texts (64 rewrite prompts, 24 Wikipedia paragraphs, 1774 tokens) its
residual-stream norm is 3-8x the other tokens' at layers 1-8 and, once layer 11's MLP writes a
vector 740x its usual output into it, about 23,000 against 140-630 for the other tokens at layers
11-27 (100-160x), still 7-14x at the last two layers; its MLP output is 12-80x the others' at
layers 9, 28 and 29. Kept, one such token per text would dominate the mean norms, the principal
subspaces and CKA. The second token is ordinary (0.8-1.15x). :func:`first_token_ratio` repeats
the measurement on any model.

The model is run without its unembedding (the transformer body only): nothing here needs logits.
"""
from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from repro.core.hooks import capture
from repro.core.models import LoadedModel, get_module
from repro.measure.subspace import Reference

STREAM_SITES = ("resid", "attn", "mlp")
EDIT_KIND, GENERAL_KIND = "edit", "general"


# --------------------------------------------------------------------------------------------
# The probe set
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSet:
    """Fixed probe texts and the kind of each (``"edit"``: a rewrite prompt, ``"general"``: text)."""

    texts: tuple[str, ...]
    kinds: tuple[str, ...]

    def __post_init__(self):
        if len(self.texts) != len(self.kinds):
            raise ValueError(f"{len(self.texts)} texts but {len(self.kinds)} kinds")

    def __len__(self) -> int:
        return len(self.texts)


def _truncate_words(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def probe_texts(
    records,
    wiki_texts: Sequence[str],
    n_edit: int = 32,
    n_general: int = 16,
    seed: int = 0,
    max_chars: int = 300,
) -> ProbeSet:
    """The fixed probe set: the rewrite prompts (subject filled in, no target) of ``n_edit`` of the
    edited ``records`` (all of them when fewer; a seeded sample, in record order, when more),
    followed by ``n_general`` seeded paragraphs of ``wiki_texts`` (e.g. ``load_text("test")``)
    cut at a word boundary to ``max_chars`` characters. The token budget is set again, per text,
    by ``max_length`` in :func:`collect_activations`.
    """
    rng = random.Random(seed)
    records = list(records)
    if len(records) > n_edit:
        keep = sorted(rng.sample(range(len(records)), n_edit))
        records = [records[i] for i in keep]
    edit = [r.requested_rewrite.prompt.format(r.requested_rewrite.subject) for r in records]
    paras = [p for p in wiki_texts if p.strip()]
    pick = sorted(rng.sample(range(len(paras)), min(n_general, len(paras))))
    general = [_truncate_words(paras[i], max_chars) for i in pick]
    return ProbeSet(tuple(edit + general), (EDIT_KIND,) * len(edit) + (GENERAL_KIND,) * len(general))


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------
def matrix_site(mtype: str, side: str) -> str:
    """Name of the site holding the input (``side="in"``) or output (``"out"``) of a matrix type."""
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', not {side!r}")
    return f"{mtype}_{side}"


@dataclass
class Activations:
    """Per-token activations of one model on one probe set (float32, CPU).

    ``streams[site]`` is (n_layers, n_tokens, d) for ``resid``/``attn``/``mlp``;
    ``matrices[(layer, mtype)]`` is ``{"in": (n_tokens, d_in), "out": (n_tokens, d_out)}``.
    Row ``i`` of every tensor is the same token: text ``text_index[i]`` at ``position[i]``.
    """

    streams: dict[str, torch.Tensor]
    matrices: dict[tuple[int, str], dict[str, torch.Tensor]]
    text_index: np.ndarray
    position: np.ndarray
    kind: np.ndarray  # (n_tokens,) str: the probe kind of the token's text
    skip_first: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return next(iter(self.streams.values())).shape[0]

    @property
    def n_tokens(self) -> int:
        return len(self.text_index)

    @property
    def sites(self) -> list[str]:
        """Stream sites, then one ``_in``/``_out`` pair per edited matrix type."""
        mtypes = sorted({m for _, m in self.matrices})
        return list(self.streams) + [matrix_site(m, s) for m in mtypes for s in ("in", "out")]

    def get(self, site: str, layer: int) -> torch.Tensor | None:
        """The (n_tokens, d) activations at a site and layer; None where not collected."""
        if site in self.streams:
            return self.streams[site][layer]
        mtype, _, side = site.rpartition("_")
        entry = self.matrices.get((layer, mtype))
        return None if entry is None else entry[side]


def _encode(lm: LoadedModel, texts: Sequence[str], max_length: int) -> list[list[int]]:
    tok = lm.tokenizer
    rows = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a probe text tokenizes to nothing")
    return rows


@torch.no_grad()
def collect_activations(
    lm: LoadedModel,
    texts: ProbeSet | Sequence[str],
    edited: Sequence[tuple[int, str]] = (),
    max_length: int = 32,
    skip_first: bool = True,
    batch_size: int = 16,
) -> Activations:
    """Run the probe texts (each truncated to ``max_length`` tokens, right-padded in batches) and
    keep, for every real token (minus each text's first when ``skip_first``), the residual stream,
    attention and MLP contributions of every layer, and the input and output of each ``edited``
    matrix ``(layer, mtype)``."""
    kinds = list(texts.kinds) if isinstance(texts, ProbeSet) else ["text"] * len(texts)
    texts = list(texts.texts) if isinstance(texts, ProbeSet) else list(texts)
    spec, model, dev = lm.spec, lm.model, lm.device
    n_layers = lm.n_layers
    edited = sorted({(int(l), str(m)) for l, m in edited})
    rows = _encode(lm, texts, max_length)
    first = 1 if skip_first else 0
    # a one-token text contributes no rows when its first token is skipped
    text_index = np.concatenate([np.full(len(r) - first, i, dtype=np.int64) for i, r in enumerate(rows)])
    position = np.concatenate([np.arange(first, len(r), dtype=np.int64) for r in rows])
    n_tok = len(text_index)
    if n_tok == 0:
        raise ValueError("the probe texts leave no tokens to collect")

    stream_mods = {
        "resid": {l: get_module(model, spec.submodule_path(l, "layer")) for l in range(n_layers)},
        "attn": {l: get_module(model, spec.residual_write_path(l, "attn")) for l in range(n_layers)},
        "mlp": {l: get_module(model, spec.residual_write_path(l, "mlp")) for l in range(n_layers)},
    }
    mat_mods = {(l, m): spec.matrix_module(model, l, m) for l, m in edited}

    streams: dict[str, torch.Tensor] = {}
    matrices: dict[tuple[int, str], dict[str, torch.Tensor]] = {key: {} for key in edited}
    base = spec.base_model(model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    start = 0
    with ExitStack() as stack:
        stores = {
            site: stack.enter_context(capture({str(l): m for l, m in mods.items()}, "output"))
            for site, mods in stream_mods.items()
        }
        names = {key: f"{key[0]}:{key[1]}" for key in edited}
        mat_in = stack.enter_context(capture({names[k]: m for k, m in mat_mods.items()}, "input"))
        mat_out = stack.enter_context(capture({names[k]: m for k, m in mat_mods.items()}, "output"))
        for b0 in range(0, len(rows), batch_size):
            batch = rows[b0 : b0 + batch_size]
            T = max(len(r) for r in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            keep = mask.bool()
            keep[:, :first] = False
            keep = keep.to(dev)
            n = int(keep.sum())
            sl = slice(start, start + n)
            for site, store in stores.items():
                for l in range(n_layers):
                    h = store[str(l)][keep].float().cpu()
                    if site not in streams:
                        streams[site] = torch.empty((n_layers, n_tok, h.shape[-1]), dtype=torch.float32)
                    streams[site][l, sl] = h
            for key in edited:
                for side, store in (("in", mat_in), ("out", mat_out)):
                    h = store[names[key]][keep].float().cpu()
                    if side not in matrices[key]:
                        matrices[key][side] = torch.empty((n_tok, h.shape[-1]), dtype=torch.float32)
                    matrices[key][side][sl] = h
            start += n
    assert start == n_tok
    return Activations(
        streams=streams,
        matrices=matrices,
        text_index=text_index,
        position=position,
        kind=np.asarray(kinds, dtype=str)[text_index],
        skip_first=skip_first,
        meta={"max_length": max_length, "n_texts": len(rows)},
    )


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------
def _row_norms(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(h.double(), dim=-1)


def activation_norms(acts: Activations) -> xr.Dataset:
    """Norms of the activations, float64:

    - ``norm`` (site, layer): mean over probe tokens of the L2 norm of the token's vector at that
      site (NaN for matrix sites at layers where the matrix was not collected);
    - ``share`` (block, layer), block ∈ {attn, mlp}: mean over tokens of
      ‖block_out_t‖ / ‖resid_t‖, where ``resid_t`` is the residual stream after the same layer
      (the stream the block has written into), i.e. how large the block's write is relative to the
      stream it becomes part of.
    """
    sites, L = acts.sites, acts.n_layers
    norm = np.full((len(sites), L), np.nan)
    for i, site in enumerate(sites):
        for l in range(L):
            h = acts.get(site, l)
            if h is not None and h.shape[0]:
                norm[i, l] = _row_norms(h).mean().item()
    blocks = [b for b in ("attn", "mlp") if b in acts.streams]
    share = np.full((len(blocks), L), np.nan)
    for i, b in enumerate(blocks):
        for l in range(L):
            r = _row_norms(acts.streams["resid"][l])
            share[i, l] = (_row_norms(acts.streams[b][l]) / r.clamp_min(1e-12)).mean().item()
    return xr.Dataset(
        {
            "norm": (("site", "layer"), norm, {"long_name": "mean L2 norm per token"}),
            "share": (("block", "layer"), share,
                      {"long_name": "mean over tokens of |block output| / |residual stream after the layer|"}),
        },
        coords={"site": sites, "layer": np.arange(L), "block": blocks},
        attrs={"n_tokens": acts.n_tokens, "skip_first": int(acts.skip_first)},
    )


# --------------------------------------------------------------------------------------------
# Comparison with the unedited model
# --------------------------------------------------------------------------------------------
def pca_points(n_tokens: int, n_points: int, seed: int = 0) -> np.ndarray:
    """A fixed, sorted, seeded subset of ``n_points`` token rows (all of them when fewer)."""
    if n_points >= n_tokens:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, size=n_points, replace=False))


@dataclass
class ActivationReference:
    """The unedited model's activations with the per-(site, layer) comparison bases precomputed."""

    acts: Activations
    k: int
    points: np.ndarray  # token rows shown in the PCA picture
    refs: dict[tuple[str, int], Reference]


def prepare_reference(ref: Activations, k: int = 10, pca_subset: int | Sequence[int] = 256) -> ActivationReference:
    """Precompute the reference side of :func:`compare_activations` once per run.

    ``pca_subset``: the number of token rows to show in the PCA picture (a seeded sample), or
    the row indices themselves.
    """
    if isinstance(pca_subset, (int, np.integer)):
        points = pca_points(ref.n_tokens, int(pca_subset))
    else:
        points = np.asarray(pca_subset, dtype=int)
        if points.size and (points.min() < 0 or points.max() >= ref.n_tokens):
            raise ValueError(f"pca_subset indices must lie in [0, {ref.n_tokens})")
    refs = {}
    for site in ref.sites:
        for l in range(ref.n_layers):
            h = ref.get(site, l)
            if h is not None:
                refs[(site, l)] = Reference.of(h, k)
    return ActivationReference(ref, k, points, refs)


def compare_activations(
    ref: Activations | ActivationReference,
    acts: Activations,
    k: int | None = None,
    pca_subset: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """How far ``acts`` has moved from the reference (unedited) activations on the same probe tokens.

    Per (site, layer), float64, NaN where a site was not collected at that layer:

    - ``angles`` (site, layer, angle): the k principal angles (radians, ascending) between the top-k
      principal subspaces of the two clouds (mean-centred);
    - ``overlap`` (site, layer): mean cos² of those angles;
    - ``cka`` (site, layer): linear CKA of the matched tokens;
    - ``cosine`` (site, layer): mean cosine similarity of matched token vectors;
    - ``pca_ref``, ``pca`` (site, layer, point, pc): 2-D coordinates of a fixed token subset, of
      the reference and of ``acts``, both in the reference's PCA basis (first two components).

    ``ref`` may be the raw reference activations (then ``k`` defaults to 10 and ``pca_subset`` to
    256 points) or :func:`prepare_reference`'s result, which saves recomputing the reference side
    at every checkpoint.
    """
    if not isinstance(ref, ActivationReference):
        ref = prepare_reference(ref, 10 if k is None else k, 256 if pca_subset is None else pca_subset)
    elif k is not None and k != ref.k:
        raise ValueError(f"k={k} but the prepared reference has k={ref.k}")
    elif pca_subset is not None:
        raise ValueError("the PCA points are fixed by the prepared reference; pass pca_subset to prepare_reference")
    base = ref.acts
    if not (np.array_equal(base.text_index, acts.text_index) and np.array_equal(base.position, acts.position)):
        raise ValueError("the activations are not on the same probe tokens as the reference")
    sites, L, K, P = base.sites, base.n_layers, ref.k, len(ref.points)
    angle = np.full((len(sites), L, K), np.nan)
    overlap, cka, cosine = (np.full((len(sites), L), np.nan) for _ in range(3))
    pca_ref = np.full((len(sites), L, P, 2), np.nan)
    pca_cur = np.full((len(sites), L, P, 2), np.nan)
    for i, site in enumerate(sites):
        for l in range(L):
            r = ref.refs.get((site, l))
            h = acts.get(site, l)
            if r is None or h is None:
                continue
            res = r.compare(h)
            angle[i, l] = res["angles"]
            overlap[i, l], cka[i, l], cosine[i, l] = res["overlap"], res["cka"], res["cosine"]
            pca_ref[i, l] = r.project(r.X[ref.points])
            pca_cur[i, l] = r.project(h[ref.points])
    pts = ref.points
    return xr.Dataset(
        {
            "angles": (("site", "layer", "angle"), angle, {"units": "rad", "long_name": "principal angles"}),
            "overlap": (("site", "layer"), overlap, {"long_name": "mean cos^2 of the principal angles"}),
            "cka": (("site", "layer"), cka, {"long_name": "linear CKA"}),
            "cosine": (("site", "layer"), cosine, {"long_name": "mean cosine of matched tokens"}),
            "pca_ref": (("site", "layer", "point", "pc"), pca_ref),
            "pca": (("site", "layer", "point", "pc"), pca_cur),
        },
        coords={
            "site": sites,
            "layer": np.arange(L),
            "angle": np.arange(K),
            "point": pts,
            "pc": [1, 2],
            "point_text": ("point", base.text_index[pts]),
            "point_position": ("point", base.position[pts]),
            "point_kind": ("point", base.kind[pts].astype(str)),
        },
        attrs={"k": K, "n_tokens": base.n_tokens},
    )


def first_token_ratio(lm: LoadedModel, texts: Sequence[str], max_length: int = 32) -> np.ndarray:
    """Per layer: mean residual-stream norm of each text's first token over that of the other
    tokens (what the ``skip_first`` default rests on)."""
    acts = collect_activations(lm, texts, max_length=max_length, skip_first=False)
    r = torch.linalg.vector_norm(acts.streams["resid"].double(), dim=-1)  # (L, n_tokens)
    first = torch.as_tensor(acts.position == 0)
    return (r[:, first].mean(1) / r[:, ~first].mean(1)).numpy()
