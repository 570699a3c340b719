"""repro.core.hooks: recording module inputs/outputs, cutting a forward pass short, editing outputs."""
from __future__ import annotations

import pytest
import torch

from repro.core.hooks import StopForward, capture, edit_output


class Pair(torch.nn.Module):
    def forward(self, x):
        return x + 1, x * 2


def test_capture_first_or_whole_output_and_stop():
    first, second = Pair(), torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(first, torch.nn.Identity())
    x = torch.ones(1, 2)
    with capture({"a": first}) as got:
        model(x)
    assert torch.equal(got["a"], x + 1)
    with capture({"a": first}, first=False) as got:
        model(x)
    assert isinstance(got["a"], tuple) and torch.equal(got["a"][1], x * 2)
    with capture({"a": first, "b": model[1]}, stop_after="a") as got:
        with pytest.raises(StopForward):
            model(x)
    assert set(got) == {"a"}  # the module after the stop never ran
    with capture({"in": second}, what="input") as got, edit_output(second, lambda out: out * 0):
        assert not second(x).any()
    assert torch.equal(got["in"], x)
    assert torch.equal(second(x), torch.nn.functional.linear(x, second.weight, second.bias))  # hooks removed
