"""Shared fixtures. The real default model is loaded once per session (seconds from the cache;
the first load on a fresh machine dequantizes the packaged GGUF, about half a minute)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm():
    from repro.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def restore_weights(smollm):
    """Snapshot every weight the test may edit and put it back afterwards."""
    saved = {n: p.detach().clone() for n, p in smollm.model.named_parameters() if "mlp" in n}
    yield
    with torch.no_grad():
        params = dict(smollm.model.named_parameters())
        for name, value in saved.items():
            params[name].copy_(value)
