"""Nonconvex smooth synthetic problems (torch, float64), registered into `cola_theory.problem_base.REGISTRY`.

Same contract as the convex ones (see `cola_theory.problem_base.Problem`): a planted W* = W0 + Delta* with
rank(Delta*) = k, exact gradients, and a certified smoothness constant beta, derived in each docstring as an
upper bound on the Hessian operator norm valid for every W. Two facts are used throughout:

(a) for any weights d_i with |d_i| <= D:  -D X^T X <= X^T diag(d) X <= D X^T X, so ||X^T diag(d) X|| <= D ||X||^2;
(b) for a symmetric Hessian H, ||H||_2 = sup_{||U||_F = 1} |<U, H U>|.

All losses are >= 0 and vanish at the noiseless planted W*, so lower_bound = f* = 0.
Importing `cola_theory.problems` imports this module, so the registry always holds both families.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from cola_theory.problem_base import DT, Problem, check_sizes, low_rank, register

Tensor = torch.Tensor
TANH2_MAX = 4 / (3 * math.sqrt(3))  # max |tanh''| = max |2 tanh sech^2|, at tanh = 1/sqrt(3)
SIGMOID2_MAX = 1 / (6 * math.sqrt(3))  # max |sigma''| = max |sigma (1 - sigma) (1 - 2 sigma)|


def _pretrained(m: int, n: int, k: int, scale: float, seed: int) -> tuple[torch.Generator, Tensor, Tensor]:
    """(generator, W0, W*): W0 ~ N(0, 1/n) entries, W* = W0 + a rank-k Delta* with singular values in [s/2, s]."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=DT) / math.sqrt(n)  # (m, n)
    return g, W0, W0 + low_rank(m, n, k, scale, g)


class RobustRegression(Problem):
    """Multi-output robust regression f(W) = 1/N sum_i sum_j rho((X W^T - Y)_ij), Y = X W*^T (noiseless).

    Subclasses give rho, rho' and a bound |rho''| <= 1. Hessian: <U, H U> = 1/N sum_j u_j^T X^T diag(rho''(r_.j)) X u_j
    (u_j the j-th row of U), so by (a) |<U, H U>| <= ||X||_2^2 ||U||_F^2 / N: beta = ||X||_2^2 / N, attained at
    W* where every rho''(0) = 1. Nonconvex: rho'' < 0 for large residuals (the loss flattens for outliers).
    """

    convex = False

    def __init__(self, m: int = 30, n: int = 40, k: int = 6, N: int = 400, scale: float = 3.0, c: float = 1.0,
                 seed: int = 0) -> None:
        check_sizes(type(self).__name__, m=m, n=n, k=k, N=N, scale=scale)
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"{type(self).__name__}: c={c!r} is invalid: the loss width needs a finite c > 0")
        g, W0, W_star = _pretrained(m, n, k, scale, seed)
        self.c = float(c)
        self.X = torch.randn(N, n, generator=g, dtype=DT)  # (N, n)
        self.Y = self.X @ W_star.T  # (N, m)
        beta = torch.linalg.matrix_norm(self.X, ord=2).item() ** 2 / N
        super().__init__(W0, W_star, beta, N, f_star=0.0)

    @abstractmethod
    def rho(self, r: Tensor) -> Tensor:
        """The robust loss of a residual, elementwise."""

    @abstractmethod
    def rho_prime(self, r: Tensor) -> Tensor:
        """Its derivative, elementwise."""

    def _rows(self, idx):
        return (self.X, self.Y) if idx is None else (self.X[idx], self.Y[idx])

    def _loss(self, W, idx):
        X, Y = self._rows(idx)
        return self.rho(X @ W.T - Y).sum() / X.shape[0]

    def _grad(self, W, idx):
        X, Y = self._rows(idx)
        return self.rho_prime(X @ W.T - Y).T @ X / X.shape[0]  # (m, b) @ (b, n)


@register("robust_cauchy")
class RobustCauchy(RobustRegression):
    """Cauchy loss rho(r) = (c^2/2) log(1 + r^2/c^2): rho' = r / (1 + r^2/c^2),
    rho'' = (1 - u) / (1 + u)^2 with u = r^2/c^2, in [-1/8, 1]; beta = ||X||_2^2 / N (see `RobustRegression`)."""

    name = "robust_cauchy"

    def rho(self, r):
        return 0.5 * self.c**2 * torch.log1p((r / self.c) ** 2)

    def rho_prime(self, r):
        return r / (1 + (r / self.c) ** 2)


@register("robust_geman_mcclure")
class RobustGemanMcClure(RobustRegression):
    """Geman-McClure loss rho(r) = (c^2/2) r^2 / (c^2 + r^2) (bounded by c^2/2): rho' = c^4 r / (c^2 + r^2)^2,
    rho'' = (1 - 3u) / (1 + u)^3 with u = r^2/c^2, in [-1/4, 1]; beta = ||X||_2^2 / N (see `RobustRegression`)."""

    name = "robust_geman_mcclure"

    def rho(self, r):
        return 0.5 * self.c**2 * r**2 / (self.c**2 + r**2)

    def rho_prime(self, r):
        return self.c**4 * r / (self.c**2 + r**2) ** 2


@register("two_layer")
class TwoLayer(Problem):
    """Two-layer tanh network f(W) = 1/(2N) ||tanh(X W^T) v - y||^2; the first layer W (m hidden x n inputs) is
    fine-tuned, v (m,) is fixed, y = tanh(X W*^T) v is planted (f* = 0).

    With z_i = W x_i, e_i = v^T tanh(z_i) - y_i, a_i = v * tanh'(z_i):
        <U, H U> = 1/N sum_i [ (a_i^T U x_i)^2 + e_i sum_j v_j tanh''(z_ij) (u_j^T x_i)^2 ].
    First term <= max_i ||a_i||^2 ||X U^T||_F^2 / N <= ||v||_2^2 ||X||_2^2 ||U||_F^2 / N   (|tanh'| <= 1);
    second <= E ||v||_inf (4 / (3 sqrt 3)) ||X||_2^2 ||U||_F^2 / N with E = ||v||_1 + max|y| >= |e_i|.
    beta = ||X||_2^2 / N * (||v||_2^2 + 4/(3 sqrt 3) ||v||_inf (||v||_1 + max|y|)).
    Nonconvex (tanh saturates: f is bounded along every ray).
    """

    name = "two_layer"
    convex = False

    def __init__(self, m: int = 30, n: int = 40, k: int = 6, N: int = 400, scale: float = 3.0,
                 seed: int = 0) -> None:
        check_sizes("TwoLayer", m=m, n=n, k=k, N=N, scale=scale)
        g, W0, W_star = _pretrained(m, n, k, scale, seed)
        self.X = torch.randn(N, n, generator=g, dtype=DT)  # (N, n); pre-activations W0 x ~ N(0, 1)
        self.v = torch.randn(m, generator=g, dtype=DT) / math.sqrt(m)  # (m,) fixed second layer
        self.y = torch.tanh(self.X @ W_star.T) @ self.v  # (N,)
        v = self.v.abs()
        E = v.sum().item() + self.y.abs().max().item()  # bound on |residual|
        beta = torch.linalg.matrix_norm(self.X, ord=2).item() ** 2 / N * (
            (v**2).sum().item() + TANH2_MAX * v.max().item() * E)
        super().__init__(W0, W_star, beta, N, f_star=0.0)

    def _rows(self, idx):
        return (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])

    def _loss(self, W, idx):
        X, y = self._rows(idx)
        return 0.5 * ((torch.tanh(X @ W.T) @ self.v - y) ** 2).mean()

    def _grad(self, W, idx):
        X, y = self._rows(idx)
        H = torch.tanh(X @ W.T)  # (b, m) hidden activations
        e = H @ self.v - y  # (b,) residuals
        return ((e[:, None] * self.v) * (1 - H**2)).T @ X / X.shape[0]  # (m, b) @ (b, n)


@register("sigmoid_sensing")
class SigmoidSensing(Problem):
    """Nonlinear sensing f(W) = 1/(2N) sum_i (sigma(<A_i, W>) - y_i)^2 with y_i = sigma(<A_i, W*>) (f* = 0).

    A_i (m x n) has i.i.d. N(0, s^2) entries with s = 2 / ||W*||_F, so <A_i, W*> ~ N(0, 4) (informative, not
    saturated). With the N x (m n) sensing matrix A (rows vec A_i), z = A vec(W), e = sigma(z) - y:
        Hess f = 1/N A^T diag(sigma'(z)^2 + e sigma''(z)) A,  |sigma'^2 + e sigma''| <= 1/16 + 1/(6 sqrt 3)
    (sigma' <= 1/4, |sigma''| <= 1/(6 sqrt 3), |e| <= 1), so by (a) beta = (1/16 + 1/(6 sqrt 3)) ||A||_2^2 / N.
    Nonconvex (sigma saturates: f is bounded along every ray).
    """

    name = "sigmoid_sensing"
    convex = False

    def __init__(self, m: int = 20, n: int = 30, k: int = 6, N: int = 800, scale: float = 3.0,
                 seed: int = 0) -> None:
        check_sizes("SigmoidSensing", m=m, n=n, k=k, N=N, scale=scale)
        g, W0, W_star = _pretrained(m, n, k, scale, seed)
        s = 2.0 / torch.linalg.norm(W_star).item()
        self.A = torch.randn(N, m * n, generator=g, dtype=DT) * s  # (N, m n), rows vec(A_i) (row-major)
        self.y = torch.sigmoid(self.A @ W_star.reshape(-1))  # (N,)
        beta = (1 / 16 + SIGMOID2_MAX) * torch.linalg.matrix_norm(self.A, ord=2).item() ** 2 / N
        super().__init__(W0, W_star, beta, N, f_star=0.0)

    def _rows(self, idx):
        return (self.A, self.y) if idx is None else (self.A[idx], self.y[idx])

    def _loss(self, W, idx):
        A, y = self._rows(idx)
        return 0.5 * ((torch.sigmoid(A @ W.reshape(-1)) - y) ** 2).mean()

    def _grad(self, W, idx):
        A, y = self._rows(idx)
        p = torch.sigmoid(A @ W.reshape(-1))  # (b,)
        return (((p - y) * p * (1 - p)) @ A / A.shape[0]).reshape(W.shape)  # (m, n)
