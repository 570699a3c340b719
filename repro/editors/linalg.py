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
