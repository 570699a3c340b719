"""Second-moment statistics: value, early stop of the forward pass, disk cache."""
from __future__ import annotations

import torch

from repro.editors import stats
from repro.data.text import load_text
from repro.core.hooks import StopForward, capture


def test_second_moment_matches_direct_computation(smollm):
    texts = load_text("train")[:3]
    C = stats.collect_second_moments(smollm, [2], "mlp_down", texts, n_tokens=50, progress=False)[2]
    # direct: inputs of layer 2's down_proj over the first 50 real tokens, sequence by sequence
    module = smollm.spec.matrix_module(smollm.model, 2, "mlp_down")
    rows = []
    for text in texts:
        ids = smollm.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        with capture({"k": module}, what="input") as got, torch.no_grad():
            smollm.model(**ids)
        rows.append(got["k"][0])
    K = torch.cat(rows)[:50].double()
    direct = K.T @ K / 50
    # float32 forward passes, batched and padded vs one by one, differ by ~1e-7 of the largest
    # entry (the first token's activations are huge); a wrong token set or count differs by far more
    torch.testing.assert_close(C, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))
    assert torch.allclose(C, C.T)
    assert torch.linalg.eigvalsh(C).min() > -1e-8


def test_forward_stops_after_the_layer(smollm):
    later = smollm.spec.matrix_module(smollm.model, 5, "mlp_down")
    calls = []
    handle = later.register_forward_hook(lambda *a: calls.append(1))
    try:
        stats.collect_second_moments(smollm, [1, 3], "mlp_down", load_text("train")[:2], 20, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_cache_is_keyed_and_reused(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMGROWTH_CACHE", str(tmp_path))
    texts = load_text("train")[:4]
    first = stats.second_moment(smollm, 3, corpus="unit", n_tokens=64, texts=texts, progress=False)
    path = stats.stats_path(smollm.name, "mlp_down", 3, "unit", 64)
    assert path.exists()

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(stats, "collect_second_moments", boom)
    again = stats.second_moment(smollm, 3, corpus="unit", n_tokens=64, progress=False)
    assert torch.equal(first, again)
    assert stats.stats_path(smollm.name, "mlp_down", 3, "unit", 65) != path


def test_stop_forward_is_raised_by_capture():
    lin = torch.nn.Linear(2, 2)
    with capture({"a": lin}, stop_after="a") as got:
        try:
            lin(torch.ones(1, 2))
            raise AssertionError("forward was not stopped")
        except StopForward:
            pass
    assert got["a"].shape == (1, 2)


def test_tiny_model_statistics_stay_in_the_session_cache(tiny_lm, test_cache):
    """The tests' random models cache their statistics in the session's folder, not the user's
    cache; the packaged models' statistics are the user's (linked in)."""
    texts = load_text("train")[:2]
    stats.second_moment(tiny_lm, 1, corpus="unit", n_tokens=16, texts=texts, progress=False)
    path = stats.stats_path(tiny_lm.name, "mlp_down", 1, "unit", 16)
    assert path.exists() and path.is_relative_to(test_cache)
    assert not (test_cache / "stats" / tiny_lm.name).is_symlink()
    assert (test_cache / "stats" / "smollm2-135m").is_symlink()
