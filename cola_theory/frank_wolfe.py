"""Frank-Wolfe over the nuclear-norm ball K = {Delta : ||Delta||_* <= tau} (diameter D = 2 tau in ||.||_F).

The linear minimization oracle of K is a rank-one vertex: argmin_{||V||_* <= tau} <G, V> =
-tau u1 v1^T, with (u1, v1) the top singular pair of G. Small matrices use LAPACK (exact); large ones
use ARPACK (scipy `svds`, an iterative Lanczos solver) at a controlled relative tolerance `tol`
(`lmo_accuracy` reports the achieved accuracy against a brute-force SVD).

The solvers work on the change Delta = W - W0 of a `Problem` (f(Delta) := problem loss at W0 + Delta)
and start at Delta = 0. Indexing of a `FWTrace`: entry i is the i-th iterate, i.e. Jaggi's x^(i)
(i steps done) and the paper's Delta_{i+1} (Algorithm 2 starts at Delta_1 = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse.linalg as sla
import torch

if TYPE_CHECKING:
    from cola_theory.problem_base import Problem

Array = np.ndarray | torch.Tensor
StepFn = Callable[[int], float]  # t (0-based) -> eta_t
DirectionFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (t, Delta, G, vertex) -> V_t
EXACT_BELOW = 128  # min(m, n) below this: one LAPACK SVD is exact and faster than Lanczos
LANCZOS_NCV = 64  # Krylov subspace size: larger than ARPACK's 20 so clustered top singular values converge fast


def _as_numpy(G: Array) -> np.ndarray:
    return G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else np.asarray(G)


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float, np.floating)) and np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau={tau!r}: the nuclear-norm radius must be a finite number > 0")


def top_singular(G: Array, tol: float = 1e-10, seed: int = 0) -> tuple[float, np.ndarray, np.ndarray]:
    """(sigma_1, u_1, v_1) of G; exact SVD for small G, else Lanczos with relative accuracy `tol` on sigma_1.

    ARPACK stops when the residual ||G^T G v - theta v|| <= tol theta, so theta is within tol theta of an
    eigenvalue of G^T G (the top one, from a random start): sigma_1 and the LMO value u^T G v = sqrt(theta)
    are accurate to about tol / 2, relative. `lmo_accuracy` measures it against a full SVD.
    """
    Gn = _as_numpy(G).astype(np.float64, copy=False)
    if min(Gn.shape) < EXACT_BELOW or not np.any(Gn):  # ARPACK needs k < min(m, n); small: exact is faster
        U, s, Vt = np.linalg.svd(Gn, full_matrices=False)
        return float(s[0]), U[:, 0], Vt[0]
    v0 = np.random.default_rng(seed).standard_normal(min(Gn.shape))
    u, s, vt = sla.svds(Gn, k=1, tol=tol, v0=v0, ncv=min(min(Gn.shape) - 1, LANCZOS_NCV), solver="arpack")
    return float(s[0]), u[:, 0], vt[0]


def nuclear_lmo(G: Array, tau: float, tol: float = 1e-10) -> Array:
    """argmin_{||V||_* <= tau} <G, V> = -tau u1 v1^T, as a dense array of G's shape and kind."""
    _check_tau(tau)
    _, u, v = top_singular(G, tol)
    V = -tau * np.outer(u, v)
    if isinstance(G, torch.Tensor):
        return torch.as_tensor(V, dtype=G.dtype, device=G.device)
    return V.astype(np.asarray(G).dtype, copy=False)


def fw_gap(G: Array, W: Array, tau: float, tol: float = 1e-10) -> float:
    """Frank-Wolfe gap g = max_{||V||_* <= tau} <G, W - V> = <G, W> + tau sigma_1(G)."""
    _check_tau(tau)
    sigma, _, _ = top_singular(G, tol)
    return float((_as_numpy(G) * _as_numpy(W)).sum() + tau * sigma)


def nuclear_norm(W: Array) -> float:
    return float(np.linalg.svd(_as_numpy(W), compute_uv=False).sum())


def lmo_accuracy(G: Array, tau: float, tol: float = 1e-10) -> dict[str, float]:
    """Accuracy of `nuclear_lmo(G, tau, tol)` against a brute-force `numpy.linalg.svd` of G.

    sigma_rel_err: |sigma_1 - sigma_1^svd| / sigma_1^svd of `top_singular`;
    value_rel_err: (<G, V> - min_K <G, .>) / (tau sigma_1^svd) >= 0, the relative LMO suboptimality;
    norm_excess: ||V||_* / tau - 1 (V must stay in K; V is rank one, so ||V||_* = ||V||_F).
    """
    _check_tau(tau)
    Gn = _as_numpy(G).astype(np.float64, copy=False)
    s_exact = float(np.linalg.svd(Gn, compute_uv=False)[0])
    sigma, _, _ = top_singular(Gn, tol)
    V = _as_numpy(nuclear_lmo(Gn, tau, tol))
    scale = max(tau * s_exact, np.finfo(float).tiny)
    return {
        "sigma_rel_err": abs(sigma - s_exact) / max(s_exact, np.finfo(float).tiny),
        "value_rel_err": float((Gn * V).sum() + tau * s_exact) / scale,
        "norm_excess": float(np.linalg.norm(V)) / tau - 1.0,  # V = -tau u v^T is rank one: ||V||_* = ||V||_F
    }


def project_nuclear_ball(X: np.ndarray, tau: float) -> np.ndarray:
    """Euclidean projection onto K: project the singular values onto the l1 ball of radius tau."""
    _check_tau(tau)
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    if s.sum() <= tau:
        return X.copy()
    # l1-ball projection of s >= 0 (Duchi et al. 2008): s_i <- max(s_i - theta, 0), sum = tau
    css = np.cumsum(s)  # s is sorted descending
    k = np.nonzero(s - (css - tau) / np.arange(1, s.size + 1) > 0)[0][-1]
    theta = (css[k] - tau) / (k + 1)
    return (U * np.maximum(s - theta, 0.0)) @ Vt


# -- solvers -------------------------------------------------------------------------------------
@dataclass
class FWTrace:
    """Per-iterate record of a Frank-Wolfe-type run over K (T steps, T + 1 iterates)."""

    f: np.ndarray  # (T+1,) f(Delta) at every iterate, the last one included
    gap: np.ndarray  # (T+1,) exact FW gap g(Delta) = <G, Delta> + tau sigma_1(G), G the full gradient
    eps: np.ndarray  # (T,) oracle error of the direction used: <V_t, G_t> + tau sigma_1(G_t) >= 0
    eta: np.ndarray  # (T,) step sizes
    Delta: np.ndarray  # (m, n) final iterate
    tau: float
    iterates: list[np.ndarray] | None = None  # (T+1) x (m, n) if requested

    @property
    def T(self) -> int:
        return len(self.eta)

    def avg_gap(self) -> float:
        """(1/T) sum_{t=1}^T g_t over the paper's Delta_1..Delta_T (the final iterate excluded)."""
        return float(self.gap[:-1].mean())


class _Oracle:
    """f, gradient, exact FW gap and exact LMO at Delta, with Delta handled as a numpy (m, n) array."""

    def __init__(self, problem: Problem, tau: float, tol: float) -> None:
        _check_tau(tau)
        self.problem, self.tau, self.tol = problem, float(tau), tol

    def full(self, Delta: np.ndarray) -> tuple[float, np.ndarray, float, np.ndarray, np.ndarray]:
        W = self.problem.W0 + torch.from_numpy(Delta).to(self.problem.W0.dtype)
        f, G = self.problem.loss_grad(W)
        Gn = _as_numpy(G).astype(np.float64, copy=False)  # (m, n)
        sigma, u, v = top_singular(Gn, self.tol)
        gap = float((Gn * Delta).sum() + self.tau * sigma)
        return f, Gn, gap, sigma, -self.tau * np.outer(u, v)  # vertex: (m, n)

    def grad(self, Delta: np.ndarray, idx=None) -> np.ndarray:
        """grad f(Delta) over the samples `idx` (all if None), (m, n)."""
        W = self.problem.W0 + torch.from_numpy(Delta).to(self.problem.W0.dtype)
        return _as_numpy(self.problem.loss_grad(W, idx)[1]).astype(np.float64, copy=False)


def fw_loop(problem: Problem, tau: float, T: int, step: StepFn, direction: DirectionFn | None = None, *,
            keep_iterates: bool = False, tol: float = 1e-10) -> FWTrace:
    """Delta_{t+1} = Delta_t + eta_t (V_t - Delta_t) from Delta = 0, for t = 0..T-1 (0-based).

    step(t) -> eta_t; direction(t, Delta, G, vertex) -> V_t in K (None: the exact LMO vertex).
    The FW gap and eps_t are always measured with the exact full gradient and the exact LMO.
    """
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T={T!r}: the number of Frank-Wolfe steps must be an integer >= 1")
    oracle = _Oracle(problem, tau, tol)
    Delta = np.zeros(problem.shape)  # Delta_1 = 0 (in K)
    f, gap, eps, etas, its = [], [], [], [], []
    for t in range(T + 1):
        ft, G, gt, sigma, vertex = oracle.full(Delta)
        f.append(ft)
        gap.append(gt)
        if keep_iterates:
            its.append(Delta.copy())
        if t == T:
            break
        V = vertex if direction is None else direction(t, Delta, G, vertex)
        eps.append(float((G * V).sum() + oracle.tau * sigma))  # <V, G> - min_K <., G>
        eta = float(step(t))
        etas.append(eta)
        Delta = Delta + eta * (V - Delta)
    return FWTrace(np.array(f), np.array(gap), np.array(eps), np.array(etas), Delta, oracle.tau,
                   its if keep_iterates else None)


def convex_frank_wolfe(problem: Problem, tau: float, T: int, *, keep_iterates: bool = False,
                       tol: float = 1e-10) -> FWTrace:
    """Classical Frank-Wolfe (Jaggi 2013): x^(k+1) = x^(k) + 2/(k+2) (s_k - x^(k)), s_k the exact LMO vertex."""
    return fw_loop(problem, tau, T, lambda t: 2.0 / (t + 2), keep_iterates=keep_iterates, tol=tol)


def nonconvex_frank_wolfe(problem: Problem, tau: float, T: int, eta: float, *, keep_iterates: bool = False,
                          tol: float = 1e-10) -> FWTrace:
    """Nonconvex Frank-Wolfe with a fixed step eta in (0, 1] (Algorithm 2 with the exact oracle, eps_t ~ 0)."""
    if not 0 < eta <= 1:
        raise ValueError(f"eta={eta!r}: the Frank-Wolfe step must lie in (0, 1] so iterates stay in K")
    return fw_loop(problem, tau, T, lambda t: eta, keep_iterates=keep_iterates, tol=tol)


def minimize_over_ball(problem: Problem, tau: float, iters: int = 3000, tol: float = 1e-12) -> dict[str, float]:
    """min_K f for a CONVEX problem by accelerated projected gradient (FISTA, step 1/beta), with a certificate.

    Returns {"f_best": smallest f found (>= min_K f), "lower": certified lower bound <= min_K f,
    "certificate_gap": f_best - lower}. The certificate is the FW duality gap: for convex f and any
    Delta in K, min_K f >= f(Delta) + min_V <G, V - Delta> = f(Delta) - g(Delta); we keep the best one.
    """
    if not getattr(problem, "convex", False):
        raise ValueError(f"problem {problem.name!r} has convex=False: the FW-gap certificate needs convexity")
    oracle = _Oracle(problem, tau, tol)
    X = Y = np.zeros(problem.shape)
    step, a = 1.0 / problem.beta, 1.0
    f_best, lower = np.inf, -np.inf
    for it in range(iters):
        X_new = project_nuclear_ball(Y - step * oracle.grad(Y), tau)
        a_new = 0.5 * (1 + np.sqrt(1 + 4 * a * a))
        Y, X, a = X_new + ((a - 1) / a_new) * (X_new - X), X_new, a_new
        if it % 50 == 49 or it == iters - 1:
            fx, _, gx, _, _ = oracle.full(X)
            f_best, lower = min(f_best, fx), max(lower, fx - gx)
            if f_best - lower <= tol * max(1.0, abs(f_best)):
                break
    return {"f_best": float(f_best), "lower": float(lower), "certificate_gap": float(f_best - lower)}
