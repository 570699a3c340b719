"""The package's ROME and MEMIT against the reference implementation (the ``easyeditor`` wheel, see
``tests/easyeditor_ref.py``): from the same weights, context templates, second moment C and
requests, both write the same update ΔW, up to float rounding.

Checked on SmolLM2-135M (llama family) and on a tiny random GPT-2 (another family: transposed
Conv1D weights, a bias on the MLP output, learned positions). Where the two differ by design, the
test hands both the same input rather than hiding the difference:

- context templates: the reference samples its own from the model; both get the same list (ROME:
  "{}" + 10 prefixes of ≤5 tokens + 10 of ≤10; MEMIT: "{}" + 5 of ≤10, its two kinds);
- C: the reference downloads Wikipedia; both get the package's C of the edited layer;
- precision: the reference inverts C in float32 (ROME) where the package solves in float64, so
  ROME agrees to float32 rounding, MEMIT (float64 on both sides) closer.

Measured (CPU, torch 2.13, transformers 5.25; the published step counts, 20 for ROME and 25 for
MEMIT): on SmolLM2-135M, ROME layer 1 over all six requests below, 1 − cos ≤ 2e-11 and relative
norm difference ≤ 6.5e-7; MEMIT layers 3-5, two batches of three, 1 − cos ≤ 3e-12 and ≤ 1.1e-7 on
every layer. On the tiny GPT-2 (8 steps): ROME 1 − cos ≤ 2e-9, ≤ 1.9e-6; MEMIT 1 − cos ≤ 4e-8,
≤ 2.7e-5. ``TOLERANCE`` keeps a margin of about four over the worst of these. To stay cheap the
SmolLM2 tests take fewer steps and requests than that measurement; the comparison is the same.
"""
from __future__ import annotations

import types

import pytest
import torch

import easyeditor_ref as ref
from repro.editors import make_editor

REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the sport of", "LeBron James", "football"),
    ("{}, which is headquartered in", "Toyota", "Berlin"),
    ("The capital of {} is", "Norway", "Lisbon"),
    ("{} was written in the language of", "The Odyssey", "Japanese"),
]
# agreement the tests require: cosine of the two ΔW and |‖ΔW‖ − ‖ΔW_ref‖| / ‖ΔW_ref‖
TOLERANCE = {"cos": 1e-6, "rel": 1e-4}

# where a family's unembedding lives when it is tied to the input embedding (no own lm_head weight)
TIED = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}
VALUE = dict(v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625)


def request(i: int):
    prompt, subject, target = REQUESTS[i]
    return types.SimpleNamespace(prompt=prompt, subject=subject, target_new=target, target_true="")


def wheel_request(i: int) -> dict:
    prompt, subject, target = REQUESTS[i]
    return {"prompt": prompt, "subject": subject, "target_new": target}


def lm_head(lm) -> str:
    """The unembedding the wheel reads its logits from (the tied embedding where there is no own lm_head)."""
    names = dict(lm.model.named_parameters())
    return "lm_head" if "lm_head.weight" in names else TIED[lm.spec.family]


def wheel_hparams(cls, lm, **fields):
    modules = dict(ref.MODULES[lm.spec.family], lm_head_module=lm_head(lm))
    return cls(alg_name=cls.__name__.removesuffix("HyperParams"), fact_token="subject_last", v_loss_layer=lm.n_layers - 1, mom2_dataset="wikipedia",
               mom2_n_samples=0, mom2_dtype="float32", device=0, model_name=lm.name, stats_dir="",
               **modules, **VALUE, **fields)


def assert_agree(ours, theirs, what: str):
    return ref.assert_agree(ours, theirs, what, TOLERANCE)


# -- ROME ------------------------------------------------------------------------------------
def rome_pair(lm, layer: int, stats_tokens: int, indices, steps: int = 20):
    """(package ΔW, reference ΔW) for each request, each from the unedited weights."""
    rome_main = ref.load("models.rome.rome_main")
    ROMEHyperParams = ref.load("models.rome.rome_hparams").ROMEHyperParams
    editor = make_editor("rome", lm, layer=layer, v_steps=steps, stats_tokens=stats_tokens)
    mtype = editor.mtype
    templates = editor.templates  # "{}" + 10 short + 10 long prefixes, sampled once by the package
    C = editor.C
    hp = wheel_hparams(ROMEHyperParams, lm, layers=[layer], v_num_grad_steps=steps, clamp_norm_factor=4.0,
                       mom2_adjustment=True, context_template_length_params=[[5, 10], [10, 10]])
    rome_main.CONTEXT_TEMPLATES_CACHE = list(templates)
    pairs = []
    try:
        for i in indices:
            ours = ref.weight_change(lm, layer, mtype, lambda: editor.apply([request(i)]))
            with ref.reference_run(lm, {ref.MODULES[lm.spec.family]["rewrite_module_tmp"].format(layer): C}):
                theirs = ref.weight_change(lm, layer, mtype,
                                       lambda: rome_main.apply_rome_to_model(lm.model, lm.tokenizer, [wheel_request(i)], hp))
            pairs.append((ours, theirs))
    finally:
        rome_main.CONTEXT_TEMPLATES_CACHE = None
    return pairs


@pytest.mark.real_model
def test_rome_writes_the_reference_update_on_smollm(smollm, restore_weights):
    for i, (ours, theirs) in enumerate(rome_pair(smollm, 1, 20_000, [3], steps=8)):
        assert_agree(ours, theirs, f"ROME, request {i}")


def test_rome_writes_the_reference_update_on_gpt2(make_tiny):
    lm = make_tiny("gpt2", n_positions=512)
    for i, (ours, theirs) in enumerate(rome_pair(lm, 1, 2_000, range(3), steps=8)):
        assert_agree(ours, theirs, f"ROME on tiny GPT-2, request {i}")


# -- MEMIT -----------------------------------------------------------------------------------
def memit_pair(lm, layers: list[int], stats_tokens: int, batches: list[list[int]], steps: int = 25,
               mom2_weight: float = 1500.0):
    """(package ΔW per layer, reference ΔW per layer) for each batch in turn; every batch starts from
    the weights the package's previous batches left (so a later batch is compared on equal weights)."""
    memit_main = ref.load("models.memit.memit_main")
    MEMITHyperParams = ref.load("models.memit.memit_hparams").MEMITHyperParams
    editor = make_editor("memit", lm, layers=layers, v_steps=steps, stats_tokens=stats_tokens,
                         mom2_weight=mom2_weight, batch_values=False)
    mtype = editor.mtype
    moments = {ref.MODULES[lm.spec.family]["rewrite_module_tmp"].format(l): editor.C(l) for l in layers}
    hp = wheel_hparams(MEMITHyperParams, lm, layers=layers, layer_selection="all", v_num_grad_steps=steps,
                       clamp_norm_factor=0.75, mom2_adjustment=True, mom2_update_weight=mom2_weight)
    templates = editor.templates  # "{}" + 5 prefixes of ≤10 tokens
    memit_main.CONTEXT_TEMPLATES_CACHE = [[templates[0]], list(templates[1:])]
    out = []
    try:
        for batch in batches:
            Ws = [lm.spec.weight(lm.model, l, mtype) for l in layers]
            start = [W.detach().clone() for W in Ws]
            with ref.reference_run(lm, moments):
                memit_main.apply_memit_to_model(lm.model, lm.tokenizer, [wheel_request(i) for i in batch], hp)
            theirs = [(W.detach() - s).double() for W, s in zip(Ws, start)]
            with torch.no_grad():
                for W, s in zip(Ws, start):
                    W.copy_(s)
            editor.apply([request(i) for i in batch])  # left in place: the next batch starts here
            ours = [(W.detach() - s).double() for W, s in zip(Ws, start)]
            out.append((ours, theirs))
    finally:
        memit_main.CONTEXT_TEMPLATES_CACHE = None
    return out


@pytest.mark.real_model
def test_memit_writes_the_reference_update_on_smollm(smollm, restore_weights):
    """Two batches of two edits in sequence on layers 3-5 (z at layer 5)."""
    for b, (ours, theirs) in enumerate(memit_pair(smollm, [3, 4, 5], 20_000, [[0, 1], [2, 3]], steps=8)):
        for layer, o, t in zip([3, 4, 5], ours, theirs):
            assert_agree(o, t, f"MEMIT batch {b}, layer {layer}")


def test_memit_writes_the_reference_update_on_gpt2(make_tiny):
    lm = make_tiny("gpt2", n_positions=512)
    for b, (ours, theirs) in enumerate(memit_pair(lm, [1, 2], 2_000, [[0, 1], [2, 3]], steps=8, mom2_weight=10.0)):
        for layer, o, t in zip([1, 2], ours, theirs):
            assert_agree(o, t, f"MEMIT on tiny GPT-2, batch {b}, layer {layer}")
