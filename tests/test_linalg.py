"""The closed-form updates on random matrices."""
from __future__ import annotations

import pytest
import torch

from repro.editors.linalg import (
    alphaedit_update,
    emmet_update,
    memit_update,
    null_space_projector,
    pack_symmetric,
    rank_one_update,
    solve_psd,
    threshold_from_spectrum,
    unpack_symmetric,
)


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


# -- batch editors: each update's defining property on random matrices -----------------------
def _problem(d_out=6, d_in=10, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(d_in, 4 * d_in, generator=g, dtype=torch.float64)
    C = X @ X.T / X.shape[1]
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return W, C, K, V


def test_memit_update_is_the_least_squares_optimum():
    """The gradient of λ·tr(ΔW C ΔWᵀ) + ‖(W+ΔW)K − V‖² vanishes at MEMIT's ΔW (and not elsewhere)."""
    W, C, K, V = _problem()
    lam = 3.0
    dW = memit_update(V - W @ K, K, C, lam).requires_grad_(True)

    def objective(D):
        return lam * torch.trace(D @ C @ D.T) + ((W + D) @ K - V).pow(2).sum()

    (grad,) = torch.autograd.grad(objective(dW), dW)
    assert grad.abs().max() < 1e-9
    moved = (dW.detach() + 1e-3 * torch.randn_like(dW)).requires_grad_(True)
    (grad2,) = torch.autograd.grad(objective(moved), moved)
    assert grad2.abs().max() > 1e-5  # the check can fail
    assert objective(moved) > objective(dW)


def test_encore_norm_penalty_shrinks_the_update_and_is_optimal():
    """ENCORE adds λ_n I (and earlier keys) to MEMIT's preserved term: ‖ΔW‖ gets smaller than
    MEMIT's on the same batch, and ΔW is the optimum of the penalised objective."""
    W, C, K, V = _problem(seed=1)
    lam, lam_n = 3.0, 2.0
    R = V - W @ K
    memit = memit_update(R, K, C, lam)
    encore = memit_update(R, K, C, lam, extra=lam_n * torch.eye(C.shape[0], dtype=C.dtype))
    assert encore.norm() < memit.norm()
    D = encore.clone().requires_grad_(True)
    obj = lam * torch.trace(D @ C @ D.T) + lam_n * D.pow(2).sum() + ((W + D) @ K - V).pow(2).sum()
    (grad,) = torch.autograd.grad(obj, D)
    assert grad.abs().max() < 1e-9


def test_emmet_update_satisfies_the_equality_constraints():
    """EMMET (η = 0): (W + ΔW) K = V for the whole batch; with η > 0 only approximately."""
    W, C, K, V = _problem(n=4, seed=2)
    dW = emmet_update(V - W @ K, K, C, eta=0.0)
    assert torch.allclose((W + dW) @ K, V, atol=1e-9)
    relaxed = emmet_update(V - W @ K, K, C, eta=10.0)
    assert not torch.allclose((W + relaxed) @ K, V, atol=1e-3)
    # among all exact solutions it has the least C-weighted norm: adding any Z with Z K = 0 costs
    Z = torch.randn_like(dW)
    Z = Z - Z @ K @ torch.linalg.pinv(K)
    cost = lambda D: torch.trace(D @ C @ D.T)  # noqa: E731
    assert cost(dW) < cost(dW + 0.1 * Z)


def test_alphaedit_update_leaves_preserved_keys_unchanged():
    """Keys in the span of C's large-eigenvalue directions are mapped as before (ΔW k0 ≈ 0 up to
    the threshold); the edited keys still move toward their targets."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out = 12, 5
    # preserved keys live mostly in an 8-dim subspace: C has 4 tiny eigenvalues
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0] * 8 + [1e-4] * 4, dtype=torch.float64)
    K0 = Q @ (scales[:, None] * torch.randn(d_in, 500, generator=g, dtype=torch.float64))
    C = K0 @ K0.T / K0.shape[1]
    P, evals = null_space_projector(C, threshold_from_spectrum(torch.linalg.eigvalsh(C), 1e-3))
    assert int(round(float(torch.trace(P)))) == 4
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, 2, generator=g, dtype=torch.float64)
    V = W @ K + torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    K_prev = torch.randn(d_in, 3, generator=g, dtype=torch.float64)
    dW = alphaedit_update(V - W @ K, K, P, alpha=1e-3, gram_prev=K_prev @ K_prev.T)
    rel = (dW @ K0).norm() / (W @ K0).norm()
    assert rel < 1e-3
    # the edit does something: the residual on the edited keys shrinks
    assert ((W + dW) @ K - V).norm() < 0.9 * (W @ K - V).norm()
    # without the projection (P = I) the preserved keys would move
    free = alphaedit_update(V - W @ K, K, torch.eye(d_in, dtype=torch.float64), alpha=1e-3)
    assert (free @ K0).norm() / (W @ K0).norm() > 1e-2


def test_alphaedit_update_from_a_running_gram_equals_from_the_gram_of_all_keys():
    g = torch.Generator().manual_seed(4)
    d_in, d_out = 9, 4
    P, _ = null_space_projector(torch.diag(torch.linspace(1e-3, 5, d_in, dtype=torch.float64)), 1.0)
    R = torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, 2, generator=g, dtype=torch.float64)
    K_prev = torch.randn(d_in, 30, generator=g, dtype=torch.float64)
    by_keys = alphaedit_update(R, K, P, 0.1, gram_prev=K_prev @ K_prev.T)
    by_gram = alphaedit_update(R, K, P, 0.1, gram_prev=K_prev[:, :10] @ K_prev[:, :10].T
                               + K_prev[:, 10:] @ K_prev[:, 10:].T)
    assert torch.allclose(by_keys, by_gram, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(by_keys, alphaedit_update(R, K, P, 0.1), rtol=1e-3)  # the earlier keys matter


@pytest.mark.parametrize("n", [1, 2, 7])
def test_pack_symmetric_round_trip(n):
    A = torch.randn(n, n, dtype=torch.float64)
    A = A + A.T
    packed = pack_symmetric(A)
    assert packed.shape == (n * (n + 1) // 2,)
    assert torch.equal(unpack_symmetric(packed), A)


def test_pack_symmetric_refuses_what_is_not_square_or_a_triangle():
    with pytest.raises(ValueError, match="square"):
        pack_symmetric(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="triangle"):
        unpack_symmetric(torch.zeros(5))


def test_threshold_from_spectrum_rejects_bad_energy():
    with pytest.raises(ValueError):
        threshold_from_spectrum(torch.ones(4), 1.5)
