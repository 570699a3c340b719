"""Comparing two point clouds of activations: principal subspaces, linear CKA, matched cosines, PCA.

Every function takes arrays of shape (n, d) (rows are points: one token's activation each), numpy
or torch, any float dtype, and computes in float64 with numpy/scipy. ``n < d`` is fine everywhere.

Definitions
-----------
- *principal subspace* of X (top k): the span of the first k right singular vectors of the
  column-centred Xc, i.e. of the top-k eigenvectors of its scatter matrix Xcᵀ Xc (computed from
  whichever of Xcᵀ Xc and Xc Xcᵀ is smaller).
- *principal angles* θ₁ ≤ … ≤ θ_k between two such subspaces with orthonormal bases A, B (d × k):
  cos θ_i are the singular values of Aᵀ B. Small angles are taken from the sines (the singular
  values of B − A AᵀB) where cos² θ ≥ 1/2, which keeps them accurate near 0 (as
  ``scipy.linalg.subspace_angles`` does).
- *subspace overlap*: mean cos² θ_i = ‖AᵀB‖_F² / k, 1 for the same subspace, 0 for orthogonal ones,
  about k/d for random ones.
- *linear CKA* (Kornblith et al. 2019) of matched rows: ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) with
  column-centred Xc, Yc; invariant to orthogonal transforms and isotropic scaling of either side.
- *mean cosine*: the average over rows of cos(x_i, y_i) of the raw (uncentred) vectors.

:class:`Reference` caches what depends only on the reference cloud (its mean, scatter norm, top-k
basis, PCA basis) so that comparing many checkpoints with one unedited model costs two (n × d)ᵀ(n × d)
products and one partial eigendecomposition per comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def as_float64(X) -> np.ndarray:
    """A 2-D float64 numpy array from a numpy array or a (CPU or device) torch tensor."""
    if hasattr(X, "detach"):  # torch.Tensor, without importing torch here
        X = X.detach().to("cpu").double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D (points, features) array, got shape {X.shape}")
    return X


def centre(X) -> np.ndarray:
    """X minus its column means, float64."""
    X = as_float64(X)
    return X - X.mean(axis=0, keepdims=True)


def _check_k(n: int, d: int, k: int) -> None:
    # centring removes one dimension: n centred points span at most n - 1 directions
    if not 1 <= k <= min(n - 1, d):
        raise ValueError(f"k={k} must lie in [1, min(n - 1, d)] = [1, {min(n - 1, d)}] for {n} points of dimension {d}")


def _scatter(Xc: np.ndarray) -> np.ndarray:
    """The smaller of Xcᵀ Xc (d × d) and Xc Xcᵀ (n × n): both have the same Frobenius norm."""
    n, d = Xc.shape
    return Xc.T @ Xc if n >= d else Xc @ Xc.T


def _top_basis(Xc: np.ndarray, k: int, scatter: np.ndarray | None = None) -> np.ndarray:
    """Orthonormal (d, k) basis of the top-k principal subspace of centred ``Xc``: its top-k right
    singular vectors.

    They are found from the smaller scatter matrix without a full SVD (LAPACK computes only the k
    wanted eigenpairs): with n ≥ d the top eigenvectors of Xcᵀ Xc; with n < d the top eigenvectors
    u of Xc Xcᵀ, mapped to Xcᵀ u and normalised. ``scatter`` is that matrix when already computed.
    """
    n, d = Xc.shape
    _check_k(n, d, k)
    G = _scatter(Xc) if scatter is None else scatter
    m = G.shape[0]
    _, vecs = scipy.linalg.eigh(G, subset_by_index=[m - k, m - 1])
    vecs = vecs[:, ::-1]
    if n >= d:
        return vecs
    V = Xc.T @ vecs
    return V / np.maximum(np.linalg.norm(V, axis=0), 1e-300)


def top_principal_directions(X, k: int) -> np.ndarray:
    """Orthonormal (d, k) basis of the top-k principal subspace of the mean-centred rows of X."""
    return _top_basis(centre(X), k)


def angles_between(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of orthonormal A, B (d × k)."""
    if A.shape != B.shape:
        raise ValueError(f"bases differ in shape: {A.shape} vs {B.shape}")
    M = A.T @ B
    cos = np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0)  # descending -> ascending angles
    sin = np.clip(np.linalg.svd(B - A @ M, compute_uv=False), 0.0, 1.0)[::-1]  # ascending
    return np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))


def principal_angles(X, Y, k: int) -> np.ndarray:
    """The k principal angles (radians, ascending) between the top-k principal subspaces of the
    mean-centred rows of X and of Y (both (n_x, d) and (n_y, d); the rows need not match)."""
    X, Y = as_float64(X), as_float64(Y)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"feature dimensions differ: {X.shape[1]} vs {Y.shape[1]}")
    return angles_between(top_principal_directions(X, k), top_principal_directions(Y, k))


def subspace_overlap(X, Y, k: int) -> float:
    """Mean cos² of the principal angles between the top-k principal subspaces of X and Y."""
    return float(np.mean(np.cos(principal_angles(X, Y, k)) ** 2))


def _cross_hsic(Xc: np.ndarray, Yc: np.ndarray) -> float:
    """‖Ycᵀ Xc‖_F² = ⟨Xc Xcᵀ, Yc Ycᵀ⟩_F, by whichever product is cheaper."""
    n, dx = Xc.shape
    dy = Yc.shape[1]
    if n * dx * dy <= n * n * (dx + dy):
        return float(np.sum((Yc.T @ Xc) ** 2))
    return float(np.sum((Xc @ Xc.T) * (Yc @ Yc.T)))


def linear_cka(X, Y) -> float:
    """Linear CKA of matched rows of X (n, d_x) and Y (n, d_y); NaN when either is constant."""
    Xc, Yc = centre(X), centre(Y)
    if Xc.shape[0] != Yc.shape[0]:
        raise ValueError(f"CKA needs matched rows: {Xc.shape[0]} vs {Yc.shape[0]}")
    denom = np.linalg.norm(_scatter(Xc)) * np.linalg.norm(_scatter(Yc))
    return _cross_hsic(Xc, Yc) / denom if denom > 0 else float("nan")


def row_cosines(X, Y, eps: float = 1e-12) -> np.ndarray:
    """cos(x_i, y_i) of each matched pair of rows (0 where a row is zero)."""
    X, Y = as_float64(X), as_float64(Y)
    if X.shape != Y.shape:
        raise ValueError(f"matched rows need equal shapes: {X.shape} vs {Y.shape}")
    num = np.einsum("ij,ij->i", X, Y)
    return num / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1), eps)


def mean_cosine(X, Y) -> float:
    """Mean cosine similarity of matched row vectors of X and Y (raw, not centred)."""
    return float(np.mean(row_cosines(X, Y)))


def pca_basis(X, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), components (k, d)) of the rows of X: the top-k principal directions, each with
    its sign fixed so that its largest-magnitude entry is positive (deterministic pictures)."""
    X = as_float64(X)
    mean = X.mean(axis=0)
    comps = _top_basis(X - mean, k).T.copy()
    idx = np.argmax(np.abs(comps), axis=1)
    comps *= np.sign(comps[np.arange(k), idx])[:, None]
    return mean, comps


def project(X, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Coordinates (n, k) of the rows of X in a PCA basis from :func:`pca_basis`."""
    return (as_float64(X) - mean) @ components.T


@dataclass
class Reference:
    """What the comparisons need from a fixed reference cloud X (the unedited model's activations).

    Built once by :meth:`of`; :meth:`compare` then measures any cloud Y with rows matched to X's.
    """

    X: object  # (n, d) as given (float32 stays float32: converted per comparison, not kept twice)
    mean: np.ndarray  # (d,)
    scatter_norm: float  # ‖Xcᵀ Xc‖_F
    basis: np.ndarray  # (d, k) top-k principal directions
    pca_mean: np.ndarray  # (d,)
    pca_components: np.ndarray  # (n_pc, d)

    @classmethod
    def of(cls, X, k: int, n_pc: int = 2) -> "Reference":
        X64 = as_float64(X)
        mean = X64.mean(axis=0)
        Xc = X64 - mean
        S = _scatter(Xc)
        basis = _top_basis(Xc, k, S)
        pm, pc = pca_basis(X64, n_pc)
        return cls(X, mean, float(np.linalg.norm(S)), basis, pm, pc)

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    def compare(self, Y) -> dict[str, np.ndarray | float]:
        """``angles`` (k,), ``overlap`` (mean cos²), ``cka`` and ``cosine`` of Y against X."""
        X, Y = as_float64(self.X), as_float64(Y)
        if Y.shape != X.shape:
            raise ValueError(f"rows must match the reference: {Y.shape} vs {X.shape}")
        Yc = Y - Y.mean(axis=0)
        S = _scatter(Yc)
        basis = _top_basis(Yc, self.k, S)
        angles = angles_between(self.basis, basis)
        denom = self.scatter_norm * float(np.linalg.norm(S))
        cka = _cross_hsic(X - self.mean, Yc) / denom if denom > 0 else float("nan")
        return {
            "angles": angles,
            "overlap": float(np.mean(np.cos(angles) ** 2)),
            "cka": cka,
            "cosine": mean_cosine(X, Y),
        }

    def project(self, Y) -> np.ndarray:
        """Coordinates of the rows of Y in the reference's PCA basis."""
        return project(Y, self.pca_mean, self.pca_components)
