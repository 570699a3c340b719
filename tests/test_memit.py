"""MEMIT, EMMET, AlphaEdit and ENCORE plumbing on a tiny random model (the closed forms themselves
are tested on random matrices in test_linalg.py), and MPES / a batch edit on SmolLM2-135M."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.data.counterfact import EditRequest, load_records
from repro.editors import make_editor
from repro.editors.locate import optimize_value
from repro.core.scoring import make_batch
from repro.data.splits import select_requests
from repro.measure.rewrite import compare_targets, prefers_new
from repro.core.paths import from_root

BATCH = ["memit", "emmet", "alphaedit", "encore"]
TINY = {"layers": [1, 2], "stats_tokens": 3000, "v_steps": 3, "n_prefix_short": 2, "n_prefix_long": 1}


def _reqs():
    return [
        EditRequest(case_id=1, prompt="{} is located in", subject="The Eiffel Tower",
                    target_new="Rome", target_true="Paris"),
        EditRequest(case_id=2, prompt="The mother tongue of {} is", subject="Danielle Darrieux",
                    target_new="English", target_true="French"),
    ]


@pytest.fixture
def tiny(tiny_lm, monkeypatch, tmp_path):
    """tiny_lm with its statistics cached in a fresh folder and its weights restored afterwards."""
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path))
    saved = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    yield tiny_lm
    with torch.no_grad():
        for n, p in tiny_lm.model.named_parameters():
            p.copy_(saved[n])


@pytest.mark.parametrize("name", BATCH)
def test_batch_editor_changes_exactly_its_matrices(tiny, name):
    editor = make_editor(name, tiny, **TINY)
    assert editor.edited_matrices() == [(1, "mlp_down"), (2, "mlp_down")]
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    result = editor.apply(_reqs())
    assert len(result.info) == 2 and all(i["v_steps"] >= 1 for i in result.info)
    edited = {tiny.spec.matrix_path(l, m) + ".weight" for l, m in editor.edited_matrices()}
    for n, p in tiny.model.named_parameters():
        if n in edited:
            layer = int(n.split(".")[2])
            assert torch.allclose(p - before[n], result.deltas[f"{layer}:mlp_down"], atol=1e-6), n
            assert result.deltas[f"{layer}:mlp_down"].abs().max() > 0
        else:
            assert torch.equal(p, before[n]), f"{name} changed {n}"


def test_memit_batch_update_has_rank_at_most_batch_size(tiny):
    result = make_editor("memit", tiny, **TINY).apply(_reqs())
    for delta in result.deltas.values():
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= 2


def _restore(lm, saved):
    with torch.no_grad():
        for l, w in saved.items():
            lm.spec.weight(lm.model, l, "mlp_down").copy_(w)


@pytest.mark.parametrize("name", ["alphaedit", "encore"])
def test_earlier_keys_are_carried_and_resumable(tiny, name):
    """AlphaEdit and ENCORE keep earlier edits' keys per layer on the editor (not in globals), as
    their Gram matrix; a new editor loaded from the state dict makes the same next update as the
    original."""
    a = make_editor(name, tiny, **TINY)
    reqs = _reqs()
    a.apply(reqs[:1])
    assert sorted(a.prev_gram) == [1, 2] and a.n_prev_keys == 1
    for g in a.prev_gram.values():
        assert g.dtype == torch.float64 and torch.linalg.matrix_rank(g, rtol=1e-8) == 1
    b = make_editor(name, tiny, **TINY)
    b.load_state_dict(a.state_dict())
    assert b.n_prev_keys == 1
    fresh = make_editor(name, tiny, **TINY)
    assert fresh.prev_gram == {} and fresh.n_prev_keys == 0  # nothing leaks between editors
    saved = {l: tiny.spec.weight(tiny.model, l, "mlp_down").clone() for l in (1, 2)}
    da = a.apply(reqs[1:]).deltas
    _restore(tiny, saved)
    db = b.apply(reqs[1:]).deltas
    for key in da:
        assert torch.allclose(da[key], db[key], atol=1e-6)
    assert a.n_prev_keys == 2
    for g in a.prev_gram.values():
        assert torch.linalg.matrix_rank(g, rtol=1e-8) == 2


@pytest.mark.parametrize("name", ["alphaedit", "encore"])
def test_the_gram_is_the_product_of_the_kept_keys(tiny, name, monkeypatch):
    """The running Gram after several calls equals K_p K_pᵀ of all keys edited so far (to float64
    rounding), and a state written when the keys themselves were kept (``prev_keys``) loads into
    the same Gram and makes the same next update."""
    editor = make_editor(name, tiny, **TINY)
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    remember = editor._remember

    def spy(layer, K):
        seen[layer].append(K.double().clone())
        remember(layer, K)

    monkeypatch.setattr(editor, "_remember", spy)
    reqs = _reqs()
    editor.apply(reqs[:1])
    editor.apply(reqs[1:])
    assert editor.n_prev_keys == 2
    keys = {l: torch.cat(ks, 1) for l, ks in seen.items()}
    for l, K in keys.items():
        assert K.shape[1] == 2
        assert torch.allclose(editor.prev_gram[l], K @ K.T, rtol=1e-12, atol=0)
    old_format = {k: v for k, v in editor.state_dict().items() if k not in ("prev_gram", "n_prev_keys")}
    old_format["prev_keys"] = {l: K.clone() for l, K in keys.items()}
    b = make_editor(name, tiny, **TINY)
    b.load_state_dict(old_format)
    assert b.n_prev_keys == 2
    saved = {l: tiny.spec.weight(tiny.model, l, "mlp_down").clone() for l in (1, 2)}
    more = [EditRequest(case_id=3, prompt="{} plays", subject="Lionel Messi", target_new="tennis",
                        target_true="football")]
    da = editor.apply(more).deltas
    _restore(tiny, saved)
    db = b.apply(more).deltas
    for key in da:
        assert torch.allclose(da[key], db[key], atol=1e-6)
    with pytest.raises(ValueError, match="both"):
        make_editor(name, tiny, **TINY).load_state_dict({**editor.state_dict(), "prev_keys": keys})


def test_memit_keeps_only_its_context_prefixes(tiny):
    editor = make_editor("memit", tiny, **TINY)
    assert editor.state_dict() == {"templates": editor.templates}  # no keys: MEMIT forgets earlier edits
    with pytest.raises(ValueError):
        editor.load_state_dict({"prev_gram": {}})


def test_alphaedit_update_is_blind_to_the_preserved_subspace(tiny):
    editor = make_editor("alphaedit", tiny, **TINY)
    result = editor.apply(_reqs())
    for layer in (1, 2):
        P = editor.projector(layer)
        assert 0 < editor.null_dims[layer] < P.shape[0]
        delta = result.deltas[f"{layer}:mlp_down"].double()
        # rows of ΔW lie in the null space: ΔW (I − P) = 0
        assert (delta @ (torch.eye(P.shape[0], dtype=P.dtype) - P)).abs().max() < 1e-6 * delta.abs().max()


def test_bad_layers_are_refused(tiny):
    with pytest.raises(ValueError, match="increasing"):
        make_editor("memit", tiny, **{**TINY, "layers": [2, 1]})
    with pytest.raises(ValueError, match="within"):
        make_editor("memit", tiny, **{**TINY, "layers": [3, 4]})


# -- on the real model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_out():
    return select_requests(load_records(from_root("data/facts/smollm2-135m.json")), 3, seed=321, split="eval")


def test_mpes_stops_once_the_target_is_top1(smollm, held_out):
    """Most-probable early stopping ends as soon as every target token is the argmax on every
    prefixed prompt (plus the extra passes), earlier than the published loss threshold would."""
    req = held_out[0]
    kw = dict(steps=25, lr=0.5, weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0, nll_stop=0.05)
    layer, mtype = 1, smollm.spec.mlp_out
    prompts = ["{}".replace("{}", req.prompt), "The following is true. " + req.prompt]
    loss_run = optimize_value(smollm, layer, mtype, prompts, req.subject, req.target_new, **kw)
    mpes = optimize_value(smollm, layer, mtype, prompts, req.subject, req.target_new, **kw, early_stop="mpes")
    assert mpes.steps < loss_run.steps
    # at the stopping point the target is top-1 under the found v*
    from repro.core.scoring import logprobs_at
    from repro.core.hooks import edit_output

    batch = make_batch(smollm, prompts, req.subject, req.target_new)
    module = smollm.spec.matrix_module(smollm.model, layer, mtype)
    shift = mpes.v_star - mpes.v_init
    mask = torch.zeros(batch.input_ids.shape + (1,))
    mask[torch.arange(len(prompts)), batch.subject_idx] = 1.0
    with torch.no_grad(), edit_output(module, lambda out: out + mask * shift):
        lp = logprobs_at(smollm, batch, batch.loss_pos)
    top1 = (lp.argmax(-1) == batch.labels) | (batch.label_mask == 0)
    assert bool(top1[1:].all())  # the prefixed prompt: MPES does not count the plain one


def test_memit_batch_edit_on_smollm(smollm, restore_weights, held_out):
    """One MEMIT call with three facts makes all three prefer the new object."""
    editor = make_editor("memit", smollm, stats_tokens=20000, n_prefix_short=2, n_prefix_long=2)
    editor.apply(held_out)
    new, true = compare_targets(smollm, [r.text for r in held_out], [r.target_new for r in held_out],
                                [r.target_true for r in held_out])
    assert prefers_new(new, true).all(), (new, true)
    assert np.isfinite(new).all()


def test_norm_preimage_hits_a_reachable_output_and_approaches_an_unreachable_one(make_tiny):
    """The Levenberg-Marquardt preimage of a Gemma post-norm (random gains, some near zero): a target
    the norm can output is hit; for one it cannot, the output gets closer than where it started."""
    from repro.core.models import get_module
    from repro.editors.memit import norm_preimage

    lm = make_tiny("gemma3")
    norm = get_module(lm.model, lm.spec.residual_write_path(1, "mlp"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen) * 2)
        x0 = torch.randn(32, generator=gen)
        reachable = norm(x0 + 0.3 * torch.randn(32, generator=gen))
        x = norm_preimage(norm, x0, reachable)
        assert (norm(x) - reachable).norm() < 1e-4 * reachable.norm()
        off = norm(x0) + torch.randn(32, generator=gen)  # generally not an output of the norm
        start = (norm(x0) - off).norm()
        assert (norm(norm_preimage(norm, x0, off)) - off).norm() < 0.9 * start


@pytest.mark.parametrize("invert", [True, False])
def test_memit_through_a_post_norm_realises_its_residual(make_tiny, monkeypatch, tmp_path, invert):
    """On a family that normalises the MLP output before the residual stream (Gemma 3), a one-layer
    MEMIT edit with a reachable target z changes the layer's output at the subject by z − h when R
    is carried back through the norm (``post_norm_targets``), and misses by far when it is not."""
    from repro.core.hooks import StopForward, capture
    from repro.core.scoring import encode_rows, fill
    from repro.editors.locate import ValueResult

    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path))
    lm = make_tiny("gemma3")
    layer, req = 2, _reqs()[0]
    norm = lm.model.model.layers[layer].post_feedforward_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
    editor = make_editor("memit", lm, layers=[layer], stats_tokens=2000, mom2_weight=1e-6,
                         n_prefix_short=0, n_prefix_long=0, post_norm_targets=invert)
    assert editor.templates == ["{}"]  # keys from the plain prompt only: the update can be exact
    text, span = fill(req.prompt, req.subject)
    batch = encode_rows(lm, [text], [None], [span])
    with capture({"x": lm.spec.matrix_module(lm.model, layer, "mlp_down")}, stop_after="x") as got:
        try:
            lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        except StopForward:
            pass
    x = got["x"][0, batch.subject_idx[0]]
    h = editor._hidden_at_subject(layer, [req])[:, 0]
    with torch.no_grad():
        shift = (norm(x + 0.5 * x.norm() / 32 ** 0.5 * torch.randn(32, generator=torch.Generator().manual_seed(2)))
                 - norm(x)).double()
    monkeypatch.setattr(editor, "values", lambda reqs: [ValueResult(h + shift, h, 1, 0.0, 0.0)])
    editor.apply([req])
    realised = editor._hidden_at_subject(layer, [req])[:, 0] - h
    err = float((realised - shift).norm() / shift.norm())
    assert (err < 1e-3) if invert else (err > 0.3), err
