"""ROME and r-ROME on the real default model (SmolLM2-135M)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.data.counterfact import load_records
from repro.editors import make_editor
from repro.data.splits import select_requests
from repro.measure.rewrite import compare_targets, prefers_new
from repro.core.paths import from_root

FACTS = from_root("data/facts/smollm2-135m.json")
CHEAP = {"stats_tokens": 4000}  # a rough C is enough to check the algebra


@pytest.fixture(scope="module")
def requests_():
    return select_requests(load_records(FACTS), 20, seed=123, split="eval")


@pytest.mark.parametrize("name", ["rome", "r-rome"])
def test_edit_maps_key_to_target_value(smollm, restore_weights, requests_, name):
    """After an edit the edited matrix maps the update key to v* (fp32 precision). ROME's key is
    the plain prompt's; r-ROME's is the prefix-averaged one."""
    editor = make_editor(name, smollm, v_steps=5, **CHEAP)
    layer, mtype = editor.edited_matrices()[0]
    w_before = smollm.spec.weight(smollm.model, layer, mtype).clone()
    result = editor.apply([requests_[0]])
    info = result.info[0]
    module = smollm.spec.matrix_module(smollm.model, layer, mtype)
    with torch.no_grad():
        out = module(info["key"][None])[0]
    assert torch.allclose(out, info["v_star"].float(), atol=1e-4 * info["v_star"].norm().item())
    delta = smollm.spec.weight(smollm.model, layer, mtype) - w_before
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) == 1
    assert torch.allclose(delta, result.deltas[f"{layer}:{mtype}"], atol=1e-6)


def test_rome_and_r_rome_keys_differ(smollm, restore_weights, requests_):
    keys = {}
    for name in ("rome", "r-rome"):
        editor = make_editor(name, smollm, v_steps=1, **CHEAP)
        keys[name] = editor.apply([requests_[1]]).info[0]["key"]
    assert not torch.allclose(keys["rome"], keys["r-rome"])


def test_single_edit_efficacy_on_10_facts(smollm, requests_):
    """Each of 10 held-out facts edited alone into the unedited model (default hyperparameters):
    the new object must beat the true one on the rewrite prompt for at least 90 % of them. (Ten,
    not the fixture's twenty: the published 21 templates make each edit about twice as costly;
    the committed single-edit efficacy runs measure every editor on more facts.)"""
    editor = make_editor("rome", smollm)
    layer, mtype = editor.edited_matrices()[0]
    w0 = smollm.spec.weight(smollm.model, layer, mtype).clone()
    wins = []
    try:
        for req in requests_[:10]:
            editor.apply([req])
            new, true = compare_targets(smollm, [req.text], [req.target_new], [req.target_true])
            wins.append(bool(prefers_new(new, true)[0]))
            with torch.no_grad():
                smollm.spec.weight(smollm.model, layer, mtype).copy_(w0)
    finally:
        with torch.no_grad():
            smollm.spec.weight(smollm.model, layer, mtype).copy_(w0)
    print(f"single-edit efficacy {np.mean(wins):.3f} over {len(wins)} facts, layer {layer}")
    assert len(wins) == 10 and np.mean(wins) >= 0.9
