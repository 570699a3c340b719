"""Reusing the frozen layers below the edited one gives the same value optimisation, on tiny
models of several families (each with the real SmolLM2 tokenizer)."""
from __future__ import annotations

import pytest
import torch

from repro.editors.locate import optimize_value
from repro.editors.prefix import frozen_prefix


KW = dict(steps=4, lr=0.5, weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=4.0, nll_stop=0.0)
PROMPTS = ["{} is located in the city of", "Yesterday it rained. {} is located in the city of"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("whole_layer", [False, True])
def test_reused_prefix_gives_the_same_value(make_tiny, family, whole_layer):
    lm = make_tiny(family)
    layer, mtype = 2, lm.spec.mlp_out
    module = lm.spec.layer_modules(lm.model)[layer] if whole_layer else None
    plain = optimize_value(lm, layer, mtype, PROMPTS, "The Eiffel Tower", "Rome", module=module, **KW)
    reused = optimize_value(lm, layer, mtype, PROMPTS, "The Eiffel Tower", "Rome", module=module,
                            reuse_prefix=True, **KW)
    assert plain.steps == reused.steps == 4
    assert torch.allclose(plain.v_init, reused.v_init, atol=1e-5)
    assert torch.allclose(plain.v_star, reused.v_star, atol=1e-4)
    assert not torch.allclose(plain.v_star, plain.v_init)  # the optimisation moved: the check can fail
    # the model is restored afterwards
    assert all(type(m).__name__ != "_Replay" for m in lm.spec.layer_modules(lm.model))


def test_replayed_layers_are_not_computed(make_tiny):
    lm = make_tiny("llama")
    enc = lm.tokenizer(["Paris is the capital of"], return_tensors="pt")
    calls = []
    first = lm.spec.layer_modules(lm.model)[0]
    handle = first.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ref = lm.model(**enc).logits
        calls.clear()
        with frozen_prefix(lm, dict(enc), 2):
            assert calls == [1]  # the one recording pass
            out = lm.model(**enc).logits
            assert calls == [1]  # the real layer 0 did not run again
    handle.remove()
    assert torch.allclose(ref, out, atol=1e-5)
    with pytest.raises(ValueError):
        with frozen_prefix(lm, dict(enc), 99):
            pass
