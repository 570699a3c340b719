"""The closed-form updates on random matrices."""
from __future__ import annotations

import pytest
import torch

from repro.editors.linalg import rank_one_update, solve_psd


def test_rank_one_update_maps_key_to_value_exactly():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 11, generator=g, dtype=torch.float64)
    k = torch.randn(11, generator=g, dtype=torch.float64)
    v = torch.randn(7, generator=g, dtype=torch.float64)
    u = torch.randn(11, generator=g, dtype=torch.float64)
    delta = rank_one_update(v - W @ k, u, k)
    assert torch.allclose((W + delta) @ k, v, atol=1e-12)
    assert torch.linalg.matrix_rank(delta) == 1
    # keys orthogonal to u are untouched
    q = torch.randn(11, generator=g, dtype=torch.float64)
    q = q - (q @ u) / (u @ u) * u
    assert torch.allclose((W + delta) @ q, W @ q, atol=1e-12)


def test_rank_one_update_rejects_orthogonal_direction():
    with pytest.raises(ValueError, match="orthogonal"):
        rank_one_update(torch.ones(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))


def test_rome_direction_minimises_disturbance_under_C():
    """Among rank-one updates with (W+Δ)k = v, u = C⁻¹k minimises E‖Δx‖² = tr(Δ C Δᵀ)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    C = X.T @ X / 500
    k, r = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    cost = lambda d: torch.trace(d @ C @ d.T)  # noqa: E731
    best = cost(rank_one_update(r, solve_psd(C, k), k))
    for _ in range(20):
        other = rank_one_update(r, solve_psd(C, k) + 0.3 * torch.randn(6, generator=g, dtype=torch.float64), k)
        assert cost(other) >= best - 1e-12


def test_solve_psd_ridge():
    C = torch.diag(torch.tensor([1.0, 0.0]))
    x = solve_psd(C, torch.tensor([1.0, 1.0]), ridge=0.5)  # + 0.5 * mean(diag)=0.25
    assert torch.allclose(x, torch.tensor([1 / 1.25, 1 / 0.25], dtype=torch.float64))
