"""Frank-Wolfe over the nuclear-norm ball K = {Delta : ||Delta||_* <= tau}.

The linear minimization oracle of K is a rank-one vertex: argmin_{||V||_* <= tau} <G, V> =
-tau u1 v1^T, with (u1, v1) the top singular pair of G. We find it with ARPACK (scipy `svds`, an
iterative Lanczos solver) at a controlled tolerance instead of a full SVD.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch

Array = np.ndarray | torch.Tensor


def _as_numpy(G: Array) -> np.ndarray:
    return G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else np.asarray(G)


def top_singular(G: Array, tol: float = 1e-10, seed: int = 0) -> tuple[float, np.ndarray, np.ndarray]:
    """(sigma_1, u_1, v_1) of G by Lanczos (scipy svds, `tol` = relative accuracy of sigma_1)."""
    Gn = _as_numpy(G).astype(np.float64, copy=False)
    if min(Gn.shape) <= 2 or not np.any(Gn):  # ARPACK needs k < min(m, n); tiny matrices: exact
        U, s, Vt = np.linalg.svd(Gn)
        return float(s[0]), U[:, 0], Vt[0]
    v0 = np.random.default_rng(seed).standard_normal(min(Gn.shape))
    u, s, vt = sla.svds(Gn, k=1, tol=tol, v0=v0, solver="arpack")
    return float(s[0]), u[:, 0], vt[0]


def nuclear_lmo(G: Array, tau: float, tol: float = 1e-10) -> Array:
    """argmin_{||V||_* <= tau} <G, V> = -tau u1 v1^T, as a dense array of G's shape and kind."""
    if not tau > 0:
        raise ValueError(f"tau={tau!r}: the nuclear-norm radius must be > 0")
    _, u, v = top_singular(G, tol)
    V = -tau * np.outer(u, v)
    if isinstance(G, torch.Tensor):
        return torch.as_tensor(V, dtype=G.dtype, device=G.device)
    return V.astype(np.asarray(G).dtype, copy=False)


def fw_gap(G: Array, W: Array, tau: float, tol: float = 1e-10) -> float:
    """Frank-Wolfe gap g = max_{||V||_* <= tau} <G, W - V> = <G, W> + tau sigma_1(G)."""
    if not tau > 0:
        raise ValueError(f"tau={tau!r}: the nuclear-norm radius must be > 0")
    sigma, _, _ = top_singular(G, tol)
    return float((_as_numpy(G) * _as_numpy(W)).sum() + tau * sigma)


def nuclear_norm(W: Array) -> float:
    return float(np.linalg.svd(_as_numpy(W), compute_uv=False).sum())
