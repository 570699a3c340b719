"""FT-L, FT-M and LoRA editing: the constraint, the loss, the merge, and one real edit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.data.counterfact import EditRequest, load_records
from repro.editors.finetune import FTL, FTM, edit_batch, edit_loss
from repro.editors.lora import LoRAEditor
from repro.data.splits import select_requests
from repro.measure.rewrite import compare_targets, prefers_new
from repro.core.paths import from_root

FACTS = from_root("data/facts/smollm2-135m.json")

REQS = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", 0),
    EditRequest("{} plays the position of", "Thomas Müller", "goaltender", "midfielder", 1),
]


@pytest.fixture
def tiny(tiny_lm):
    """tiny_lm with every weight put back after the test."""
    saved = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    yield tiny_lm
    with torch.no_grad():
        for n, p in tiny_lm.model.named_parameters():
            p.copy_(saved[n])


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _changed(lm, before):
    return sorted(n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n]))


def _nll(lm, reqs, objective):
    with torch.no_grad():
        return edit_loss(lm, edit_batch(lm, reqs), objective).mean().item()


# ------------------------------------------------------------------------------------- FT-L
def test_ftl_linf_bound_holds_and_is_active(tiny):
    eps = 1e-4
    editor = FTL.from_name(tiny, layer=2, norm_constraint=eps, lr=1e-2, steps=10, loss_stop=0.0)
    layer, mtype = editor.edited_matrices()[0]
    assert mtype == tiny.spec.mlp_out
    before = _weights(tiny)
    w0 = tiny.spec.weight(tiny.model, layer, mtype).clone()
    result = editor.apply(REQS)
    w1 = tiny.spec.weight(tiny.model, layer, mtype)
    dev = (w1 - w0).abs()
    tol = 4 * torch.finfo(w0.dtype).eps * w0.abs().max().item()  # rounding of w0 ± ε
    assert dev.max().item() <= eps + tol
    # lr 1e-2 >> ε: the clamp binds, many entries sit on the boundary
    assert (dev >= eps - tol).float().mean().item() > 0.1
    assert _changed(tiny, before) == [tiny.spec.matrix_path(layer, mtype) + ".weight"]
    assert torch.equal(result.deltas[f"{layer}:{mtype}"], w1 - w0)
    assert [i["steps"] for i in result.info] == [10, 10] and len(result.info) == 2


def test_ftl_bound_is_relative_to_weights_before_each_call(tiny):
    """A second call may move another ε: the ball is centred on the weights the call starts from."""
    eps = 1e-4
    editor = FTL.from_name(tiny, layer=1, norm_constraint=eps, lr=1e-2, steps=5, loss_stop=0.0)
    layer, mtype = editor.edited_matrices()[0]
    w0 = tiny.spec.weight(tiny.model, layer, mtype).clone()
    editor.apply(REQS[:1])
    w1 = tiny.spec.weight(tiny.model, layer, mtype).clone()
    editor.apply(REQS[:1])
    w2 = tiny.spec.weight(tiny.model, layer, mtype)
    tol = 1e-6
    assert (w2 - w1).abs().max().item() <= eps + tol
    assert (w2 - w0).abs().max().item() > eps + tol


def test_ftl_loss_reads_every_target_token_after_the_prompt(tiny):
    """prompt_last: every target token is scored under the one distribution after the prompt."""
    req = EditRequest("The capital of {} is", "Atlantis", "New Amsterdam City", "Paris", 0)
    text = req.prompt.format(req.subject)
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    tgt = tiny.tokenizer(" " + req.target_new, add_special_tokens=False)["input_ids"]
    assert len(tgt) > 1
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, -1].float(), -1)
    expected = -logp[tgt].mean().item()
    assert _nll(tiny, [req], "prompt_last") == pytest.approx(expected, rel=1e-5)
    assert _nll(tiny, [req], "teacher_forced") != pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------------------------------------- FT-M
def test_ftm_lowers_target_nll_and_changes_only_its_matrix(tiny):
    # the tiny random model predicts nearly uniformly over 49k tokens (NLL ≈ 10.8); one 64 × 32
    # matrix can move that by about 0.6
    editor = FTM.from_name(tiny, layer=1, lr=5e-2, steps=10)
    layer, mtype = editor.edited_matrices()[0]
    before = _weights(tiny)
    nll0 = _nll(tiny, REQS, "teacher_forced")
    result = editor.apply(REQS)
    nll1 = _nll(tiny, REQS, "teacher_forced")
    assert nll1 < nll0 - 0.3
    assert _changed(tiny, before) == [tiny.spec.matrix_path(layer, mtype) + ".weight"]
    for info in result.info:
        assert info["loss_last"] < info["loss_first"]
    assert np.mean([i["loss_last"] for i in result.info]) == pytest.approx(nll1, rel=1e-4)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert all(p.grad is None for p in tiny.model.parameters())


def test_ftm_loss_is_target_tokens_only(tiny):
    """FT-M's loss equals HF's cross-entropy with the prompt labels set to -100 (ignored) and
    differs from the loss that also scores the prompt tokens: prompt tokens are masked out."""
    req = EditRequest("The capital of {} is", "Atlantis", "New Amsterdam City", "Paris", 0)
    tok = tiny.tokenizer
    prompt = tok(req.prompt.format(req.subject))["input_ids"]
    tgt = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + tgt])
    masked = torch.tensor([[-100] * len(prompt) + tgt])
    with torch.no_grad():
        hf_masked = tiny.model(input_ids=ids, labels=masked).loss.item()
        hf_all = tiny.model(input_ids=ids, labels=ids).loss.item()
    ours = _nll(tiny, [req], "teacher_forced")
    assert ours == pytest.approx(hf_masked, rel=1e-5)
    assert ours != pytest.approx(hf_all, rel=1e-3)


def test_ftm_batch_loss_is_mean_of_request_losses(tiny):
    both = _nll(tiny, REQS, "teacher_forced")
    alone = [_nll(tiny, [r], "teacher_forced") for r in REQS]
    assert both == pytest.approx(np.mean(alone), rel=1e-5)


def test_ftm_is_deterministic(tiny):
    editor = FTM.from_name(tiny, layer=2, lr=5e-3, steps=5)
    w0 = tiny.spec.weight(tiny.model, 2, editor.mtype).clone()
    d1 = editor.apply(REQS).deltas
    with torch.no_grad():
        tiny.spec.weight(tiny.model, 2, editor.mtype).copy_(w0)
    d2 = editor.apply(REQS).deltas
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_hparams_come_from_yaml(smollm):
    ftl, ftm = FTL.from_name(smollm), FTM.from_name(smollm)
    assert ftl.hp.norm_constraint == 5e-4 and ftl.hp.steps == 25 and ftl.hp.lr == 5e-4
    assert ftm.hp.norm_constraint is None
    assert LoRAEditor.from_name(smollm).hp.rank == 8
    with pytest.raises(ValueError, match="norm_constraint"):
        FTL.from_name(smollm, norm_constraint=None)


# ------------------------------------------------------------------------------------- LoRA
def _peft_modules(model):
    return [n for n, m in model.named_modules() if "peft" in type(m).__module__ or "lora" in n.lower()]


def test_lora_merge_stack_and_deltas(tiny):
    model_id = id(tiny.model)
    modules_before = [(n, type(m)) for n, m in tiny.model.named_modules()]
    before = _weights(tiny)
    editor = LoRAEditor.from_name(tiny, layers=[1, 3], steps=5, lr=1e-2, loss_stop=0.0)
    keys = [f"{l}:{m}" for l, m in editor.edited_matrices()]
    w0 = {k: tiny.spec.weight(tiny.model, *editor._split_key(k)).clone() for k in keys}

    r1 = editor.apply(REQS[:1])
    f1 = editor.last_factors
    w1 = {k: tiny.spec.weight(tiny.model, *editor._split_key(k)).clone() for k in keys}
    for k in keys:
        a, b, scale = f1[k]
        assert scale == pytest.approx(32 / 8)
        assert a.shape[0] == 8 and b.shape[1] == 8
        assert b.abs().max() > 0  # trained: B starts at zero
        assert torch.allclose(w1[k], w0[k] + scale * b @ a, atol=1e-6)
        assert torch.allclose(r1.deltas[k], w1[k] - w0[k], atol=1e-7)
    # a plain model again: same object, same modules, no peft leftovers, frozen
    assert id(tiny.model) == model_id
    assert [(n, type(m)) for n, m in tiny.model.named_modules()] == modules_before
    assert not _peft_modules(tiny.model) and not hasattr(tiny.model, "peft_config")
    assert not any(p.requires_grad for p in tiny.model.parameters())
    edited = {tiny.spec.matrix_path(l, m) + ".weight" for l, m in editor.edited_matrices()}
    assert set(_changed(tiny, before)) == edited

    r2 = editor.apply(REQS[1:])
    for k in keys:
        w2 = tiny.spec.weight(tiny.model, *editor._split_key(k))
        assert torch.allclose(w2, w0[k] + r1.deltas[k] + r2.deltas[k], atol=1e-6)
        assert not torch.allclose(r2.deltas[k], r1.deltas[k])
    assert [i["steps"] for i in r2.info] == [5]


def test_lora_edit_lowers_target_nll_and_is_deterministic(tiny):
    editor = LoRAEditor.from_name(tiny, layers=[2], steps=10, lr=5e-2)
    w0 = tiny.spec.weight(tiny.model, 2, editor.mtype).clone()
    nll0 = _nll(tiny, REQS, "teacher_forced")
    d1 = editor.apply(REQS).deltas
    assert _nll(tiny, REQS, "teacher_forced") < nll0 - 0.3
    with torch.no_grad():
        tiny.spec.weight(tiny.model, 2, editor.mtype).copy_(w0)
    again = LoRAEditor.from_name(tiny, layers=[2], steps=10, lr=5e-2)
    d2 = again.apply(REQS).deltas
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_lora_unloads_when_training_fails(tiny, monkeypatch):
    import repro.editors.lora as lora_mod

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lora_mod, "train_on_edits", boom)
    before = _weights(tiny)
    editor = LoRAEditor.from_name(tiny, layers=[1])
    with pytest.raises(RuntimeError, match="boom"):
        editor.apply(REQS)
    assert not _peft_modules(tiny.model)
    assert _changed(tiny, before) == []
    assert not any(p.requires_grad for p in tiny.model.parameters())


# ------------------------------------------------------------------------ real model (SmolLM2)
def test_ftm_edits_real_facts(smollm, restore_weights):
    """FT-M with the default hyperparameters, each of 3 held-out facts edited alone: the new
    object must beat the true one on the rewrite prompt afterwards (it does not before)."""
    reqs = select_requests(load_records(FACTS), 3, seed=7, split="eval")
    editor = FTM.from_name(smollm)
    layer, mtype = editor.edited_matrices()[0]
    w0 = smollm.spec.weight(smollm.model, layer, mtype).clone()
    for req in reqs:
        new, true = compare_targets(smollm, [req.text], [req.target_new], [req.target_true])
        assert not prefers_new(new, true)[0]
        editor.apply([req])
        new, true = compare_targets(smollm, [req.text], [req.target_new], [req.target_true])
        assert prefers_new(new, true)[0], (req, new, true)
        with torch.no_grad():
            smollm.spec.weight(smollm.model, layer, mtype).copy_(w0)


# ------------------------------------------------------------- Conv1D matrices (GPT-2 family)
@pytest.fixture(scope="module")
def tiny_gpt2(tiny_lm):
    """A tiny random GPT-2 (Conv1D weights stored as (in, out)) with the same tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from repro.core.models import LoadedModel, spec_for

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_lm.tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return LoadedModel(name="tiny-gpt2", model=model, tokenizer=tiny_lm.tokenizer, spec=spec_for(model),
                       device=torch.device("cpu"))


@pytest.mark.parametrize("make", [
    lambda lm: FTM.from_name(lm, layer=1, lr=5e-2, steps=3),
    lambda lm: FTL.from_name(lm, layer=1, lr=5e-2, steps=3),
    lambda lm: LoRAEditor.from_name(lm, layers=[1], lr=5e-2, steps=3, loss_stop=0.0),
], ids=["ft-m", "ft-l", "lora"])
def test_deltas_are_out_by_in_for_transposed_weights(tiny_gpt2, make):
    lm = tiny_gpt2
    editor = make(lm)
    (layer, mtype), = editor.edited_matrices()
    assert mtype in lm.spec.transposed
    w0 = lm.spec.weight(lm.model, layer, mtype).clone()
    try:
        result = editor.apply(REQS)
        delta = result.deltas[f"{layer}:{mtype}"]
        assert delta.shape == w0.shape and delta.abs().max() > 0
        assert torch.allclose(delta, lm.spec.weight(lm.model, layer, mtype) - w0, atol=1e-7)
        if isinstance(editor, LoRAEditor):
            a, b, scale = editor.last_factors[f"{layer}:{mtype}"]
            assert torch.allclose(delta, scale * b @ a, atol=1e-6)
    finally:
        with torch.no_grad():
            lm.spec.weight(lm.model, layer, mtype).copy_(w0)
