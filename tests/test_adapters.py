"""repro.core.adapters.add_lora: seeded LoRA adapters on exactly the named matrices."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from repro.core.adapters import add_lora


def test_add_lora_wraps_the_named_matrices_with_a_seeded_init(tiny_lm):
    def wrap(seed):
        lm = dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model))
        add_lora(lm, [(1, "mlp_down"), (2, "mlp_down")], rank=2, alpha=4.0, dropout=0.0, seed=seed, adapter="x")
        return lm

    before = torch.get_rng_state()
    a, b, c = wrap(0), wrap(0), wrap(1)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    wrapped = sorted(n.removesuffix(".lora_A.x.weight") for n, _ in a.model.named_parameters() if "lora_A" in n)
    assert wrapped == [a.spec.matrix_path(1, "mlp_down"), a.spec.matrix_path(2, "mlp_down")]
    mod = lambda lm: lm.spec.matrix_module(lm.model, 1, "mlp_down")  # noqa: E731
    assert mod(a).lora_A["x"].weight.shape == (2, mod(a).in_features)
    assert float(mod(a).scaling["x"]) == 2.0
    assert torch.equal(mod(a).lora_A["x"].weight, mod(b).lora_A["x"].weight)
    assert not torch.equal(mod(a).lora_A["x"].weight, mod(c).lora_A["x"].weight)
    assert not mod(a).lora_B["x"].weight.any()  # B = 0: the wrapped model computes what it did
    with pytest.raises(ValueError, match="no matrices"):
        add_lora(a, [], rank=2, alpha=4.0, dropout=0.0, seed=0, adapter="y")
