"""Convergence bounds as code: COLA's Theorem 4.1, classical convex Frank-Wolfe, RAC-LoRA.

Notation (paper): K = {Delta : ||Delta||_* <= tau}, D = 2 tau its diameter in ||.||_F, f beta-smooth
(||grad f(X) - grad f(Y)||_F <= beta ||X - Y||_F), g_t the Frank-Wolfe gap at Delta_t, eps_t the
oracle error of step t, M = f(Delta_1) - (a certified lower bound of f on K).
Each function validates its inputs and raises ValueError naming the field, its value and the fix.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "convex_fw_bound", "rac_lora_bound", "rac_lora_pl_rate", "sketch_lambda", "theorem41_bound",
    "theorem41_eta", "theorem41_stepsize_bound", "PAPER_FORM_CAPPED_LIMIT",
]

# In the capped case (eta = 1) the step-size form is <= the paper's form iff M / T <= this * beta D^2.
PAPER_FORM_CAPPED_LIMIT = 1.5 + math.sqrt(2.0)  # (1 + 1/sqrt(2))^2


def _need(name: str, value, ok: bool, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {fix}")


def _pos(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    _need(name, value, ok, f"need a finite number {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def _eps(value) -> float:
    """The oracle error eps >= 0; an exact oracle's eps can come out as -1e-15 by rounding: clamp that to 0."""
    if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and -1e-10 <= value < 0:
        return 0.0
    return _pos("eps", value, True)


def _steps(name: str, value, low: int = 1) -> np.ndarray:
    arr = np.asarray(value)
    ok = arr.size > 0 and np.issubdtype(arr.dtype, np.integer) and bool(np.all(arr >= low))
    _need(name, value, ok, f"need an integer (or integer array) >= {low}")
    return arr.astype(float)


def theorem41_bound(M: float, beta: float, D: float, T: int, eps: float = 0.0) -> float:
    """COLA Theorem 4.1 as stated: (1/T) sum_{t=1}^T g_t <= 2 sqrt(M beta) D / sqrt(T) + eps.

    It is the step-size form (`theorem41_stepsize_bound`) evaluated at `theorem41_eta` and rounded up;
    it is valid when that eta is not capped at 1, i.e. T >= 2M / (beta D^2) (see `theorem41_eta`).
    """
    M, beta, D, eps = _pos("M", M, True), _pos("beta", beta), _pos("D", D), _eps(eps)
    T = float(_steps("T", T))
    return 2.0 * math.sqrt(M * beta) * D / math.sqrt(T) + eps


def theorem41_stepsize_bound(M: float, beta: float, D: float, T: int, eta: float, eps: float = 0.0) -> float:
    """(1/T) sum_{t=1}^T g_t <= M/(eta T) + eta beta D^2 / 2 + eps, for Algorithm 2 with a fixed step eta.

    Derivation. Step t moves Delta_{t+1} = Delta_t + eta (V_t - Delta_t); both points lie in the
    convex set K, so ||V_t - Delta_t||_F <= ||V_t||_F + ||Delta_t||_F <= ||V_t||_* + ||Delta_t||_* <= D.
    beta-smoothness of f along the segment gives
        f(Delta_{t+1}) <= f(Delta_t) + eta <G_t, V_t - Delta_t> + eta^2 beta ||V_t - Delta_t||^2 / 2.
    By the oracle condition (1), <G_t, V_t> = min_K <G_t, .> + eps_t, and min_K <G_t, . - Delta_t> = -g_t, so
        f(Delta_{t+1}) <= f(Delta_t) - eta g_t + eta eps_t + eta^2 beta D^2 / 2.
    Summing over t = 1..T telescopes; f(Delta_{T+1}) >= lb (a lower bound of f on K) since Delta_{T+1} is in K:
        eta sum_t g_t <= f(Delta_1) - lb + eta sum_t eps_t + T eta^2 beta D^2 / 2.
    Divide by eta T; with M = f(Delta_1) - lb and eps = (1/T) sum_t eps_t this is the bound. It holds for
    every realization (no expectation): eps_t is measured with the exact gradient, whatever the oracle did.
    """
    M, beta, D, eps = _pos("M", M, True), _pos("beta", beta), _pos("D", D), _eps(eps)
    T = float(_steps("T", T))
    eta = _pos("eta", eta)
    _need("eta", eta, eta <= 1.0, "the step must lie in (0, 1] so that Delta_{t+1} stays in K")
    return M / (eta * T) + eta * beta * D * D / 2.0 + eps


def theorem41_eta(M: float, beta: float, D: float, T: int) -> float:
    """The step of Theorem 4.1: eta = min(1, sqrt(2M / (beta D^2 T))), the minimizer of the step-size form.

    Proof that the step-size form is <= the paper's form at this eta.
    Uncapped (2M <= beta D^2 T): M/(eta T) = eta beta D^2 / 2 = sqrt(M beta D^2 / (2T)), so the form equals
        sqrt(2 M beta D^2 / T) = sqrt(2) sqrt(M beta) D / sqrt(T) <= 2 sqrt(M beta) D / sqrt(T).
    Capped (eta = 1, 2M > beta D^2 T): with x = M/T, y = beta D^2 the form is x + y/2 (< 2x) while the paper's
        form is 2 sqrt(x y); x + y/2 <= 2 sqrt(xy) iff sqrt(x/y) <= 1 + 1/sqrt(2), i.e. x <= 2.914 y
        (`PAPER_FORM_CAPPED_LIMIT`). For even fewer steps the paper's form is NOT a valid bound (f linear with
        tiny beta: one step at eta = 1 has average gap M/T while 2 sqrt(M beta) D / sqrt(T) -> 0), so the
        theorem implicitly needs T >= M / (2.914 beta D^2); the step-size form stays valid always.
    M must be > 0: M = 0 means Delta_1 already minimizes f on K, the optimal step is 0 and lies outside (0, 1].
    """
    M, beta, D = _pos("M", M), _pos("beta", beta), _pos("D", D)
    T = float(_steps("T", T))
    return min(1.0, math.sqrt(2.0 * M / (beta * D * D * T)))


def convex_fw_bound(beta: float, D: float, t):
    """Classical Frank-Wolfe (Jaggi 2013, Thm 1): f(x^(t)) - min_K f <= 2 beta D^2 / (t + 2) for t >= 1.

    Indexing: x^(0) is the start, x^(t) the iterate after t steps with gamma_k = 2/(k+2), k = 0..t-1
    (`FWTrace.f[t]`). Jaggi states it with the curvature constant C_f <= beta D^2 (smoothness along
    segments of K, diam_F(K) = D). Proof: convexity gives h_{k+1} <= (1 - gamma_k) h_k + gamma_k^2 C_f / 2;
    gamma_0 = 1 gives h_1 <= C_f / 2 <= 2 C_f / 3, and induction on k >= 1 gives h_k <= 2 C_f / (k + 2).
    t = 0 is excluded: h_0 depends on the arbitrary start. Accepts an int or an integer array t.
    """
    beta, D = _pos("beta", beta), _pos("D", D)
    tt = _steps("t", t, low=1)
    out = 2.0 * beta * D * D / (tt + 2.0)
    return float(out) if out.ndim == 0 else out


def sketch_lambda(rank: int, size: int) -> float:
    """lambda_min(E[H]) = r / size for a Gaussian r x size sketch: E[H] = (r/size) I by rotation invariance."""
    _need("rank", rank, isinstance(rank, (int, np.integer)) and 1 <= rank <= size,
          f"need an integer 1 <= rank <= size (size={size}, the sketched side)")
    return rank / size


def rac_lora_bound(f0: float, f_star: float, lam: float, gamma: float, T: int) -> float:
    """RAC-LoRA (GD, smooth nonconvex): (1/T) sum_{t=0}^{T-1} E||grad f(W^t)||_F^2 <= 2 (f0 - f*) / (lam gamma T).

    Derivation (right sketch; the left one is the same with H G). W^{t+1} = W^t - gamma G_t H_t with
    H_t the orthogonal projection onto the row space of the random sketch A_t, so <G, G H> = ||G H||^2.
    beta-smoothness with gamma <= 1/beta:
        f(W^{t+1}) <= f(W^t) - gamma ||G_t H_t||^2 + beta gamma^2 ||G_t H_t||^2 / 2
                   <= f(W^t) - (gamma/2) ||G_t H_t||^2,
    and E_H ||G H||^2 = tr(G E[H] G^T) >= lam ||G||^2 with lam = lambda_min(E[H]) (= r/n for Gaussian A).
    Taking expectations and telescoping down to f* gives the bound. The check needs gamma <= 1/beta; here
    we only validate gamma > 0 (beta is not an argument): the caller states gamma = 1/beta or smaller.
    """
    f0 = float(f0)
    _need("f0", f0, math.isfinite(f0) and math.isfinite(float(f_star)) and f0 >= f_star,
          f"need finite f0 >= f_star (f_star={f_star!r}), a lower bound of f")
    _need("lam", lam, isinstance(lam, (int, float)) and 0 < lam <= 1, "need 0 < lam <= 1 (lam = r / n)")
    gamma = _pos("gamma", gamma)
    T = float(_steps("T", T))
    return 2.0 * (f0 - float(f_star)) / (lam * gamma * T)


def rac_lora_pl_rate(mu: float, lam: float, gamma: float, T):
    """RAC-LoRA under PL (1/2 ||grad f||^2 >= mu (f - f*)): E[f(W^T) - f*] <= (1 - gamma mu lam)^T (f(W^0) - f*).

    From the descent step above, E[f^{t+1} - f*] <= f^t - f* - (gamma lam / 2) ||G_t||^2
    <= (1 - gamma mu lam)(f^t - f*). Needs gamma <= 1/beta (then gamma mu lam <= mu/beta <= 1).
    Returns the factor (1 - gamma mu lam)^T; T may be an integer array (T >= 0).
    """
    mu, gamma = _pos("mu", mu), _pos("gamma", gamma)
    _need("lam", lam, isinstance(lam, (int, float)) and 0 < lam <= 1, "need 0 < lam <= 1 (lam = r / n)")
    q = 1.0 - gamma * mu * lam
    _need("gamma", gamma, 0.0 <= q < 1.0, f"need gamma * mu * lam <= 1 (gamma <= 1/beta <= 1/mu; mu={mu})")
    out = q ** _steps("T", T, low=0)
    return float(out) if out.ndim == 0 else out
