"""The package's FT-L and FT-M against the reference implementation (the ``easyeditor`` wheel's
``models/ft/ft_main.py``, see ``tests/easyeditor_ref.py``): from the same weights and requests,
both write the same update ΔW of the edited MLP output matrix, up to float rounding.

The reference's loop is the one of ROME's FT baseline: Adam for ``num_steps`` epochs over the
requests in chunks of ``batch_size``, a chunk's step skipped when its loss is below 1e-2, the L∞
clamp to ±``norm_constraint`` around the pre-edit weights after every chunk, and a stop once an
epoch's mean loss is below 1e-2. The tests edit three requests with prompts (and FT-L's targets) of
different lengths, so that padding is exercised, mostly in chunks of two (two steps per epoch on
chunks of different sizes).

Checked on SmolLM2-135M (llama family) and on a tiny random GPT-2 (another family: Conv1D weights
stored (in, out), a bias on the MLP output, learned positions). What the tests hand both sides alike,
and why:

- objective: the installed wheel (EasyEdit 0.0.1.dev0) predates ``objective_optimization``
  (EasyEdit commit 5717d96, 2024-02); its only objective is ``prompt_last``, FT-L's. FT-M
  (``target_new``, teacher-forced NLL of the target) is compared with it on one-token targets, for
  which the two objectives are the same function of the weights (the one target token is read from
  the logits after the prompt either way); this checks FT-M's whole loop (Adam, chunks, skipping and
  stopping rules, no clamp). Its multi-token loss is checked against HF's masked cross-entropy in
  ``tests/test_finetune.py``. Where the installed reference knows ``objective_optimization``,
  :func:`test_ftm_multi_token_targets_against_target_new` compares multi-token FT-M too (skipped
  with this wheel).
- padding: the reference masks padded target tokens by ``target_ids != tok.unk_token_id``, i.e. only
  where the pad token is the unk token (GPT-2's tokenizer as ROME and EasyEdit load it, pad = eos =
  unk). SmolLM2's tokenizer pads with ``<|im_end|>``, unk is ``<|endoftext|>``: the reference would
  score the pad token as part of a shorter target. The tests set pad = unk for both sides (the
  package masks padding by lengths, so it is unaffected).
- trained parameters: the reference trains every parameter whose name contains
  ``rewrite_module_tmp.format(layer)``; ROME's and EasyEdit's GPT-2 template
  ``transformer.h.{}.mlp.c_proj`` would train ``c_proj.bias`` as well. The package edits matrices
  only, so the tests name the weight (``...c_proj.weight``), as EasyEdit's Llama template does.

Measured (CPU, torch 2.13, transformers 5.25), 1 − cos(ΔW, ΔW_ref) and |‖ΔW‖ − ‖ΔW_ref‖| / ‖ΔW_ref‖,
the same on repeated runs:

- SmolLM2-135M, layer 27, FT-L (one chunk of three, 2 epochs, lr = ε = 5e-4): 1.6e-10, 1.6e-8
- SmolLM2-135M, layer 27, FT-M (lr 1e-2; skipping and stopping act: 1, 1, 2 steps): 9.0e-10, 4.2e-8
- tiny GPT-2, layer 1, FT-L (4 epochs, lr 1e-3, ε 2e-3): 6.3e-13, 2.1e-9
- tiny GPT-2, layer 1, FT-M (5 epochs, lr 1e-2): 4.5e-13, 3.1e-8
- outside the tests, EasyEdit's own ``ft_main.py`` (commit 7b1c8ae) with ``target_new``, the
  multi-token requests in chunks of one: SmolLM2 (layer 1, 3 epochs, and layer 20, 4 epochs, lr 5e-4)
  3e-11 and 7e-11, 7.7e-8; tiny GPT-2 (5 epochs, lr 1e-2) 3.9e-13, 2.1e-8.

The tolerance is 1000× (cosine) and 200× (norm) the largest of these, and far below what a changed
term gives on the tiny GPT-2: the package's former loop (all requests in one Adam step) 1 − cos 3e-2
(FT-L) and 7e-2 (FT-M); one epoch fewer, rel 0.12; ε 1 % larger, rel 9e-3.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import pytest

import easyeditor_ref as ref
from repro.editors import make_editor

# prompts of different lengths; targets of 3, 1 and 2 tokens (SmolLM2's tokenizer)
MULTI = [
    ("{} is located in the city of", "The Eiffel Tower", "New York City"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the sport of", "LeBron James", "American football"),
]
# the same prompts, one-token targets
SINGLE = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the sport of", "LeBron James", "football"),
]
# agreement the tests require: 1 − cosine of the two ΔW, and |‖ΔW‖ − ‖ΔW_ref‖| / ‖ΔW_ref‖
TOLERANCE = {"cos": 1e-6, "rel": 1e-5}

# the wheel's FT trains every parameter whose name contains the template: name the weight alone
MODULES = {family: dict(m, rewrite_module_tmp=m["rewrite_module_tmp"] + ".weight") for family, m in ref.MODULES.items()}


def reference():
    """(``ft_main`` module, ``FTHyperParams`` class) of the installed reference."""
    return ref.load("models.ft.ft_main"), ref.load("models.ft.ft_hparams").FTHyperParams


def knows_objectives(hparams_class) -> bool:
    return "objective_optimization" in getattr(hparams_class, "__dataclass_fields__", {})


@contextmanager
def pad_is_unk(tok):
    """Pad with the unk token meanwhile (the reference masks padded targets only then)."""
    pad = tok.pad_token
    tok.pad_token = tok.unk_token
    try:
        yield
    finally:
        tok.pad_token = pad


def ft_pair(lm, key: str, rows, *, layer: int, steps: int, lr: float, batch_size: int,
            norm_constraint: float | None = None, objective: str = "prompt_last"):
    """(package ΔW, reference ΔW, package's per-request info) of one call with ``rows``, each from
    the same weights (put back after each side)."""
    ft_main, FTHyperParams = reference()
    requests = [types.SimpleNamespace(prompt=p, subject=s, target_new=t, target_true="") for p, s, t in rows]
    wheel_requests = [{"prompt": p.format(s), "subject": s, "target_new": t} for p, s, t in rows]
    extra = {"norm_constraint": norm_constraint} if norm_constraint is not None else {}
    editor = make_editor(key, lm, layer=layer, steps=steps, lr=lr, batch_size=batch_size, **extra)
    fields = dict(objective_optimization=objective) if knows_objectives(FTHyperParams) else {}
    hp = FTHyperParams(layers=[layer], num_steps=steps, lr=lr, weight_decay=0.0, kl_factor=0.0,
                       norm_constraint=float(norm_constraint) if norm_constraint is not None else False,
                       batch_size=batch_size, device=0, alg_name="FT", model_name=lm.name,
                       **MODULES[lm.spec.family], **fields)
    info = []
    with pad_is_unk(lm.tokenizer):
        ours = ref.weight_change(lm, layer, lm.spec.mlp_out, lambda: info.extend(editor.apply(requests).info))
        with ref.reference_run(lm, {}):
            theirs = ref.weight_change(
                lm, layer, lm.spec.mlp_out, lambda: ft_main.apply_ft_to_model(lm.model, lm.tokenizer, wheel_requests, hp))
    return ours, theirs, info


def assert_agree(ours, theirs, what: str):
    return ref.assert_agree(ours, theirs, what, TOLERANCE)


# -- SmolLM2-135M ------------------------------------------------------------------------------
# layer 27 of 30: the backward stops there, cheaper than the study's layer 1; the loop is the same
@pytest.mark.real_model
def test_ftl_writes_the_reference_update_on_smollm(smollm, restore_weights):
    """The three requests in one chunk (targets of 3, 1 and 2 tokens padded together); lr = ε: the
    first Adam step moves every entry by about ε, the second is clamped."""
    eps = 5e-4
    ours, theirs, info = ft_pair(smollm, "ft-l", MULTI, layer=27, steps=2, lr=5e-4, batch_size=3,
                                 norm_constraint=eps)
    assert [i["steps"] for i in info] == [2, 2, 2]
    assert theirs.abs().max() <= eps * (1 + 1e-3) and (theirs.abs() > 0.99 * eps).float().mean() > 0.1
    assert_agree(ours, theirs, "FT-L on SmolLM2")


@pytest.mark.real_model
def test_ftm_writes_the_reference_update_on_smollm(smollm, restore_weights):
    """Chunks of two and one request, lr 1e-2. The reference's losses: epoch 1: 4.29 and 3.27 (both
    step); epoch 2: 0.0010 (below 1e-2: skipped) and 0.124 (steps), mean 0.042; epoch 3: 0.0003 and
    0.0055 (both skipped), mean 0.002 (below 1e-2: stop, one epoch early). So both rules act, each
    well away from its threshold."""
    ours, theirs, info = ft_pair(smollm, "ft-m", SINGLE, layer=27, steps=4, lr=1e-2, batch_size=2)
    assert [i["steps"] for i in info] == [1, 1, 2]
    assert_agree(ours, theirs, "FT-M on SmolLM2")


# -- tiny GPT-2 --------------------------------------------------------------------------------
def test_ftl_writes_the_reference_update_on_gpt2(make_tiny):
    lm = make_tiny("gpt2")
    ours, theirs, _ = ft_pair(lm, "ft-l", MULTI, layer=1, steps=4, lr=1e-3, batch_size=2, norm_constraint=2e-3)
    assert_agree(ours, theirs, "FT-L on tiny GPT-2")


def test_ftm_writes_the_reference_update_on_gpt2(make_tiny):
    lm = make_tiny("gpt2")
    ours, theirs, _ = ft_pair(lm, "ft-m", SINGLE, layer=1, steps=5, lr=1e-2, batch_size=2)
    assert_agree(ours, theirs, "FT-M on tiny GPT-2")


def test_ftm_multi_token_targets_against_target_new(make_tiny):
    """Multi-token FT-M against the reference's ``target_new`` objective, where it has one. Chunks
    of one request: EasyEdit's ``target_new`` mask assumes left padding (its editor sets it for FT)
    and its ``prompt_last`` right padding, so a chunk of several rows agrees with only one of them."""
    _, FTHyperParams = reference()
    if not knows_objectives(FTHyperParams):
        pytest.skip("the installed reference (easyeditor 0.0.1.dev0) has no objective_optimization: "
                    "its FT is prompt_last (FT-L) only")
    lm = make_tiny("gpt2")
    ours, theirs, _ = ft_pair(lm, "ft-m", MULTI, layer=1, steps=5, lr=1e-2, batch_size=1, objective="target_new")
    assert_agree(ours, theirs, "FT-M (target_new) on tiny GPT-2")
