"""Closed-form weight updates as pure functions on tensors (no model plumbing), so that each
editor's defining property can be tested on random matrices.

Convention: a weight W maps keys to values, W has shape (d_out, d_in), keys k are d_in vectors.
"""
from __future__ import annotations

import torch


def rank_one_update(residual: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one update ΔW = r uᵀ / (uᵀ k).

    With ``residual = v* − W k`` (or ``v* − (W k + b)``), the edited matrix maps the key exactly:
    (W + ΔW) k = v*. ``u`` is the update direction in key space, C⁻¹ k̄ for ROME.
    """
    denom = torch.dot(u, k)
    if denom.abs() < torch.finfo(denom.dtype).tiny:
        raise ValueError("update direction u is orthogonal to the key k; the rank-one update is undefined")
    return torch.outer(residual, u) / denom


def solve_psd(C: torch.Tensor, rhs: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Solve (C + ridge·mean(diag C)·I) x = rhs in float64 (C symmetric positive semi-definite)."""
    C64 = C.double()
    if ridge:
        C64 = C64 + ridge * C64.diagonal().mean() * torch.eye(C64.shape[0], dtype=C64.dtype, device=C64.device)
    return torch.linalg.solve(C64, rhs.double())


def _sym_solve_right(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """X = B A⁻¹ for a symmetric positive definite A (float64, via Cholesky when it succeeds)."""
    A64, B64 = A.double(), B.double()
    L, info = torch.linalg.cholesky_ex(A64)
    if int(info) == 0:
        return torch.cholesky_solve(B64.T, L).T
    return torch.linalg.solve(A64, B64.T).T


def memit_update(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT's batch update ΔW = R Kᵀ (λ C + [extra] + K Kᵀ)⁻¹ (Meng et al., 2023).

    R (d_out, n): residuals V − W K of the n edits; K (d_in, n): their keys; C (d_in, d_in): the
    second moment of keys to preserve; ``extra`` another (d_in, d_in) term to preserve, e.g. earlier
    edits' keys K_p K_pᵀ and/or a norm penalty λ_n I (ENCORE). ΔW minimises
    λ·tr(ΔW C ΔWᵀ) + ‖(W + ΔW) K − V‖² (+ tr(ΔW extra ΔWᵀ)); the gradient vanishes there.
    """
    K64 = K.double()
    A = lam * C.double() + K64 @ K64.T
    if extra is not None:
        A = A + extra.double()
    return _sym_solve_right(R.double() @ K64.T, A)


def emmet_update(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """EMMET's batch update with equality constraints (Gupta et al., 2024):
    ΔW = R (Kᵀ C⁻¹ K + η I)⁻¹ Kᵀ C⁻¹.

    For η = 0 it is the minimum of tr(ΔW C ΔWᵀ) subject to (W + ΔW) K = V exactly (K of full
    column rank); η > 0 relaxes the constraints when keys are nearly collinear.
    """
    C64, K64 = C.double(), K.double()
    CiK = torch.linalg.solve(C64, K64)  # C⁻¹ K, (d_in, n)
    G = K64.T @ CiK + eta * torch.eye(K64.shape[1], dtype=torch.float64, device=K64.device)
    return torch.linalg.solve(G, R.double().T).T @ CiK.T


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's projector P = U₀ U₀ᵀ onto the eigenvectors of C whose eigenvalues are below
    ``threshold`` (the directions preserved keys hardly use). Returns (P, eigenvalues ascending)."""
    evals, evecs = torch.linalg.eigh(C.double())
    U0 = evecs[:, evals < threshold]
    return U0 @ U0.T, evals


def threshold_from_spectrum(evals: torch.Tensor, energy: float) -> float:
    """The largest eigenvalue threshold τ such that the eigenvalues below τ hold at most a fraction
    ``energy`` of the trace: the null space then carries that share of the preserved keys' energy."""
    if not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), got {energy}")
    ev = torch.sort(evals.double().clamp_min(0)).values
    cum = torch.cumsum(ev, 0) / ev.sum()
    n = int((cum <= energy).sum())
    if n == 0:
        raise ValueError("no eigenvalue is small enough for the requested energy")
    # halfway between the last eigenvalue kept in the null space and the next one
    return float(ev[n - 1] + (ev[n] - ev[n - 1]) / 2) if n < len(ev) else float(ev[-1]) * 2


def alphaedit_update(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, alpha: float,
                     gram_prev: torch.Tensor | None = None) -> torch.Tensor:
    """AlphaEdit's null-space-constrained update (Fang et al., 2025):
    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹.

    Its rows lie in the range of P, so ΔW k = 0 for every key k with P k = 0 (the preserved
    keys, up to the eigenvalue threshold that built P). Earlier edits' keys, kept so new edits do
    not undo old ones, enter only through their Gram matrix ``gram_prev`` = K_p K_pᵀ (d_in, d_in).
    """
    K64, P64 = K.double(), P.double()
    S = K64 @ K64.T
    if gram_prev is not None:
        S = S + gram_prev.double()
    A = S @ P64 + alpha * torch.eye(P64.shape[0], dtype=torch.float64, device=P64.device)
    # ΔWᵀ = (P S + α I)⁻¹ P K Rᵀ  (A = S P + αI is not symmetric, so solve with Aᵀ = P S + α I)
    return torch.linalg.solve(A.T, P64 @ K64 @ R.double().T).T


def pack_symmetric(A: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric (n, n) matrix, row by row, as a flat (n(n+1)/2,) tensor:
    half the bytes of the matrix (see :func:`unpack_symmetric`)."""
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
    i, j = torch.triu_indices(A.shape[0], A.shape[0], device=A.device)
    return A[i, j]


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle :func:`pack_symmetric` gave."""
    m = packed.numel()
    n = int(round(((8 * m + 1) ** 0.5 - 1) / 2))
    if packed.ndim != 1 or n * (n + 1) // 2 != m:
        raise ValueError(f"{tuple(packed.shape)} is not a packed upper triangle")
    i, j = torch.triu_indices(n, n, device=packed.device)
    A = packed.new_zeros((n, n))
    A[i, j] = packed
    A[j, i] = packed
    return A
