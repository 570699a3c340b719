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


@pytest.mark.parametrize("name", ["alphaedit", "encore"])
def test_earlier_keys_are_carried_and_resumable(tiny, name):
    """AlphaEdit and ENCORE keep every edited key per layer on the editor (not in globals); a new
    editor loaded from the state dict makes the same next update as the original."""
    a = make_editor(name, tiny, **TINY)
    reqs = _reqs()
    a.apply(reqs[:1])
    assert {l: k.shape[1] for l, k in a.prev_keys.items()} == {1: 1, 2: 1}
    b = make_editor(name, tiny, **TINY)
    b.load_state_dict(a.state_dict())
    assert make_editor(name, tiny, **TINY).prev_keys == {}  # nothing leaks between editors
    saved = {l: tiny.spec.weight(tiny.model, l, "mlp_down").clone() for l in (1, 2)}
    da = a.apply(reqs[1:]).deltas
    with torch.no_grad():
        for l, w in saved.items():
            tiny.spec.weight(tiny.model, l, "mlp_down").copy_(w)
    db = b.apply(reqs[1:]).deltas
    for key in da:
        assert torch.allclose(da[key], db[key], atol=1e-6)
    assert a.prev_keys[1].shape[1] == 2


def test_memit_keeps_no_state(tiny):
    editor = make_editor("memit", tiny, **TINY)
    assert editor.state_dict() == {}
    with pytest.raises(ValueError):
        editor.load_state_dict({"prev_keys": {}})


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
    prompt (plus the extra steps), earlier than the NLL threshold would."""
    req = held_out[0]
    kw = dict(steps=25, lr=0.5, weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0, nll_stop=0.05)
    layer, mtype = 1, smollm.spec.mlp_out
    prompts = ["{}".replace("{}", req.prompt), "The following is true. " + req.prompt]
    nll_run = optimize_value(smollm, layer, mtype, prompts, req.subject, req.target_new, **kw)
    mpes = optimize_value(smollm, layer, mtype, prompts, req.subject, req.target_new, **kw, early_stop="mpes")
    assert mpes.steps < nll_run.steps
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
    assert bool(top1.all())


def test_memit_batch_edit_on_smollm(smollm, restore_weights, held_out):
    """One MEMIT call with three facts makes all three prefer the new object."""
    editor = make_editor("memit", smollm, stats_tokens=20000, n_prefix_short=2, n_prefix_long=2)
    editor.apply(held_out)
    new, true = compare_targets(smollm, [r.text for r in held_out], [r.target_new for r in held_out],
                                [r.target_true for r in held_out])
    assert prefers_new(new, true).all(), (new, true)
    assert np.isfinite(new).all()
